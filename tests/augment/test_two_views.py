"""Two augmented views per slice (LRC_METHOD section 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from lrc_ray.augment import AugmentParams, TwoViewAugment, ViewGeometry, warp, warp_slice
from lrc_ray.errors import UserInputError

NO_INTENSITY = dict(contrast_range=(1.0, 1.0), gamma_range=(1.0, 1.0), noise_std=0.0, blur_prob=0.0)


def block_slice(size: int = 64, blocks: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A grid of blocks x blocks regions; region id k has the constant value (k + 1) / 20."""
    cell = size // blocks
    rows, cols = np.indices((size, size)) // cell
    regions = (rows * blocks + cols).astype(np.int32)
    return ((regions + 1) / 20).astype(np.float32), regions


def sparse_id_slice(size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Ids 0, 7, 14, ... in vertical stripes, with an ignored (-1) stripe: interpolated ids would show."""
    image = np.random.default_rng(0).random((size, size), dtype=np.float32)
    stripes = np.arange(size)[None, :].repeat(size, 0) // 5
    regions = np.where(stripes == 3, -1, stripes * 7).astype(np.int32)
    return image, regions


def test_views_have_the_documented_shapes_and_types():
    image, regions = sparse_id_slice()
    views = TwoViewAugment(AugmentParams(), output_size=24)(image, regions, np.random.default_rng(0))
    for view_image, view_regions in ((views.image1, views.regions1), (views.image2, views.regions2)):
        assert view_image.shape == (1, 24, 24) and view_image.dtype == torch.float32
        assert view_regions.shape == (24, 24) and view_regions.dtype == torch.int64
        assert type(view_image) is torch.Tensor and type(view_regions) is torch.Tensor


def test_views_differ_and_are_reproduced_by_the_generator_state():
    image, regions = sparse_id_slice()
    augment = TwoViewAugment(AugmentParams(), output_size=32)
    first = augment(image, regions, np.random.default_rng(5))
    again = augment(image, regions, np.random.default_rng(5))
    other = augment(image, regions, np.random.default_rng(6))
    assert not torch.equal(first.image1, first.image2)
    assert not torch.equal(first.regions1, first.regions2)
    for name in ("image1", "image2", "regions1", "regions2"):
        assert torch.equal(getattr(first, name), getattr(again, name))
        assert not torch.equal(getattr(first, name), getattr(other, name))


def test_each_view_draws_its_own_geometry(monkeypatch):
    """The MONAI pitfall: one random draw shared by both views would augment them identically."""
    augment = TwoViewAugment(AugmentParams(**NO_INTENSITY), output_size=32)
    drawn = []
    draw_geometry = augment.draw_geometry
    monkeypatch.setattr(augment, "draw_geometry", lambda *args: drawn.append(draw_geometry(*args)) or drawn[-1])
    image, regions = sparse_id_slice()
    for seed in range(6):
        views = augment(image, regions, np.random.default_rng(seed))
        assert not torch.equal(views.regions1, views.regions2)
    assert len(drawn) == 12
    for view1, view2 in zip(drawn[::2], drawn[1::2]):
        assert view1.center_offset != view2.center_offset and view1.angle != view2.angle


def test_each_view_draws_its_own_intensity_change():
    """Same (identity) geometry for both views, so any difference comes from intensity alone."""
    identity = dict(crop_scale=(1.0, 1.0), rotate_degrees=0.0, flip_prob=0.0)
    augment = TwoViewAugment(AugmentParams(**identity), output_size=40)
    image, regions = sparse_id_slice()
    views = augment(image, regions, np.random.default_rng(0))
    assert torch.equal(views.regions1, views.regions2)
    assert torch.equal(views.regions1, torch.from_numpy(regions).long())
    assert not torch.allclose(views.image1, views.image2, atol=1e-3)


@pytest.mark.parametrize("output_size", [40, 64, 96])
def test_region_ids_still_match_their_pixels(output_size):
    image, regions = block_slice()
    augment = TwoViewAugment(AugmentParams(rotate_degrees=30.0, **NO_INTENSITY), output_size=output_size)
    checked = 0
    for seed in range(4):
        views = augment(image, regions, np.random.default_rng(seed))
        for view_image, view_regions in ((views.image1[0], views.regions1), (views.image2[0], views.regions2)):
            for region in view_regions.unique().tolist():
                if region < 0:
                    continue
                # Bilinear sampling mixes neighbours at region borders; look only inside.
                interior = ndimage.binary_erosion((view_regions == region).numpy(), iterations=2, border_value=0)
                values = view_image.numpy()[interior]
                np.testing.assert_allclose(values, (region + 1) / 20, atol=1e-5)
                checked += values.size
    assert checked > 2 * output_size**2  # a quarter of the 8 views, not a vacuous pass


def test_ids_are_the_original_ids_or_ignored():
    image, regions = sparse_id_slice()
    allowed = set(np.unique(regions).tolist()) | {-1}
    augment = TwoViewAugment(AugmentParams(crop_scale=(0.2, 1.0), rotate_degrees=40.0), output_size=57)
    for seed in range(5):
        views = augment(image, regions, np.random.default_rng(seed))
        for view_regions in (views.regions1, views.regions2):
            assert set(view_regions.unique().tolist()) <= allowed


def test_pixels_from_outside_the_slice_are_ignored():
    size = 32
    image = np.ones((size, size), dtype=np.float32)
    regions = np.arange(size * size, dtype=np.int32).reshape(size, size)  # no pixel is ignored
    full = dict(center_offset=(0.0, 0.0), crop_size=(size, size), flip=(False, False))
    image_t, regions_t = torch.from_numpy(image), torch.from_numpy(regions)

    rotated_image, rotated = warp_slice(
        image_t, regions_t, ViewGeometry(angle=math.radians(45), **full), (size, size), index_fill=-1
    )
    for row, col in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        assert rotated[row, col] == -1 and rotated_image[0, row, col] == 0
    assert (rotated[size // 2 - 4 : size // 2 + 4, size // 2 - 4 : size // 2 + 4] >= 0).all()

    # A crop hanging half over the right edge: the right half of the view lies outside.
    shifted = ViewGeometry(**{**full, "center_offset": (0.0, size / 2), "angle": 0.0})
    _, shifted_regions = warp_slice(image_t, regions_t, shifted, (size, size), index_fill=-1)
    assert (shifted_regions[:, size // 2 :] == -1).all()
    assert torch.equal(shifted_regions[:, : size // 2], regions_t[:, size // 2 :].long())


def test_identity_geometry_and_flips_are_exact():
    image, regions = sparse_id_slice()
    image_t, regions_t = torch.from_numpy(image), torch.from_numpy(regions)
    geometry = ViewGeometry(center_offset=(0.0, 0.0), crop_size=image.shape, angle=0.0, flip=(False, True))
    warped_image, warped = warp_slice(image_t, regions_t, geometry, image.shape, index_fill=-1)
    assert torch.equal(warped, regions_t.flip(1).long())
    torch.testing.assert_close(warped_image[0], image_t.flip(1))


@pytest.mark.parametrize(
    "field, value",
    [
        ("crop_scale", (0.0, 1.0)),
        ("crop_scale", (0.6, 0.4)),
        ("crop_scale", (0.5, 1.5)),
        ("crop_scale", (0.5,)),
        ("crop_scale", "ab"),
        ("rotate_degrees", -1.0),
        ("rotate_degrees", 270.0),
        ("rotate_degrees", True),
        ("flip_prob", 1.5),
        ("contrast_range", (0.0, 1.2)),
        ("gamma_range", (-1.0, 1.0)),
        ("gamma_range", (1.0, float("inf"))),
        ("noise_std", -0.1),
        ("noise_std", float("nan")),
        ("noise_std", float("inf")),
        ("blur_prob", -0.1),
        ("blur_sigma_range", (0.0, 1.0)),
    ],
)
def test_bad_augment_params_name_the_field(field, value):
    with pytest.raises(UserInputError, match=rf"^augment\.{field}: "):
        AugmentParams(**{field: value})


def test_augment_params_accept_lists_from_yaml():
    params = AugmentParams(crop_scale=[0.5, 1], gamma_range=[1, 1])
    assert params.crop_scale == (0.5, 1.0) and params.gamma_range == (1.0, 1.0)
    hash(params)


@pytest.mark.parametrize("output_size", [0, 4, 32.0, True])
def test_bad_output_size_raises(output_size):
    with pytest.raises(UserInputError, match="output_size"):
        TwoViewAugment(AugmentParams(), output_size=output_size)


def test_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        TwoViewAugment(AugmentParams(), output_size=16)(np.zeros((8, 8)), np.zeros((8, 9)), np.random.default_rng(0))


def test_labels_follow_the_view_without_left_right_flips():
    """Left organs stay left: with a label, a view may flip front-back but never left-right."""
    image = np.zeros((32, 32), np.float32)
    image[:, :16], image[:, 16:] = 0.2, 0.8
    label = np.where(np.arange(32)[None, :] < 16, 1, 2).repeat(32, axis=0)
    regions = label - 1
    params = AugmentParams(crop_scale=(1.0, 1.0), rotate_degrees=0.0, flip_prob=1.0, contrast_range=(1, 1),
                           gamma_range=(1, 1), noise_std=0.0, blur_prob=0.0)
    augment = TwoViewAugment(params, output_size=32)
    unlabelled = augment(image, regions, np.random.default_rng(0))
    assert unlabelled.image1[0, :, :4].mean() > 0.7, "without labels, views flip left-right"
    labelled = augment(image, regions, np.random.default_rng(0), label=label)
    assert set(labelled.label1.unique().tolist()) <= {0, 1, 2} and labelled.label1.dtype == torch.int64
    assert (labelled.label1[:, :12] == 1).all() and (labelled.label1[:, 20:] == 2).all()
    assert labelled.image1[0, :, :12].max() < 0.3, "the image stays aligned with its label"
    assert torch.equal(labelled.regions1 + 1, labelled.label1), "super-pixels share the label's geometry"


def test_the_batched_warp_resamples_as_monai_does():
    """`grid_theta` carries MONAI's centred pixel convention (AffineGrid + Resample) over to
    torch's normalised grid: the same geometry gives the same pixels, on a non-square slice."""
    from monai.transforms import AffineGrid, Resample

    from lrc_ray.augment.two_views import view_affine

    rng = np.random.default_rng(0)
    image = rng.random((40, 52), dtype=np.float32)
    regions = (np.indices(image.shape)[0] // 5 * 20 + np.indices(image.shape)[1] // 4).astype(np.int64)
    augment = TwoViewAugment(AugmentParams(crop_scale=(0.3, 1.0), rotate_degrees=40.0), output_size=24)
    geometries = [augment.draw_geometry(image.shape, rng) for _ in range(6)]
    images = torch.from_numpy(np.stack([image] * 6))
    warped_images, warped_maps = warp(images, torch.from_numpy(regions)[None, None].repeat(6, 1, 1, 1), geometries,
                                      (24, 24), index_fills=[-1])
    for index, geometry in enumerate(geometries):
        grid, _ = AffineGrid(affine=view_affine(geometry, (24, 24)))(spatial_size=(24, 24))
        expected_image = Resample(mode="bilinear", padding_mode="zeros")(torch.from_numpy(image)[None], grid)
        expected_map = Resample(mode="nearest", padding_mode="zeros")(torch.from_numpy(regions + 1).float()[None], grid)
        torch.testing.assert_close(warped_images[index], expected_image.as_tensor(), atol=1e-4, rtol=0)
        assert torch.equal(warped_maps[index, 0], expected_map.as_tensor()[0].long() - 1)


def test_batched_intensity_changes_are_monais_per_slice():
    """Contrast, then MONAI's AdjustContrast (gamma) and GaussianSmooth (blur), each slice with its
    own draw; noise off so the rest can be compared exactly."""
    from monai.transforms import AdjustContrast, GaussianSmooth

    params = AugmentParams(noise_std=0.0, blur_prob=0.5, gamma_range=(0.5, 2.0))
    augment = TwoViewAugment(params, output_size=16)
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.random((8, 1, 16, 16), dtype=np.float32))
    draws = [augment.draw((16, 16), rng)[0] for _ in range(8)]
    assert {draw.blur_sigma is None for draw in draws} == {True, False}, "both blurred and sharp slices"
    adjusted = augment._adjust_intensity(images, draws)
    for index, draw in enumerate(draws):
        expected = images[index]
        mean = expected.mean()
        expected = ((expected - mean) * draw.contrast + mean).clamp(0.0, 1.0)
        expected = AdjustContrast(gamma=draw.gamma)(expected)
        if draw.blur_sigma is not None:
            expected = GaussianSmooth(sigma=draw.blur_sigma)(expected)
        torch.testing.assert_close(adjusted[index], torch.as_tensor(expected), atol=1e-5, rtol=0)


def test_a_batch_of_mixed_shapes_matches_its_slices_one_by_one():
    rng = np.random.default_rng(2)
    augment = TwoViewAugment(AugmentParams(), output_size=20)
    shapes = [(32, 32), (24, 40), (32, 32)]
    images = [rng.random(shape, dtype=np.float32) for shape in shapes]
    regions = [(np.indices(shape)[0] // 4 * 10 + np.indices(shape)[1] // 4).astype(np.int32) for shape in shapes]
    labels = [(region % 3).astype(np.int64) for region in regions]
    draws = [augment.draw(shape, np.random.default_rng(seed), with_label=True) for seed, shape in enumerate(shapes)]
    batch = augment.augment(images, regions, draws, labels=labels)
    for index in range(3):
        single = augment(images[index], regions[index], np.random.default_rng(index), label=labels[index])
        for name in ("image1", "image2", "regions1", "regions2", "label1", "label2"):
            assert torch.equal(batch[name][index], getattr(single, name)), (index, name)
    with pytest.raises(ValueError, match="slice 1: expected a 2D image and maps of its shape"):
        augment.augment(images, [regions[0]] * 3, draws)
