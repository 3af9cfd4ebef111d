import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ResizeWithPadOrCrop, Spacing
from scipy import ndimage

from lrc_ray.data.geometry import SliceGeometry, plan_geometry, put_back, to_working_grid
from lrc_ray.errors import UserInputError


@pytest.mark.parametrize(
    "native_shape, native_spacing, spacing, size, resampled, offset",
    [
        ((512, 512), (0.98, 0.98), 1.5625, 256, (321, 321), (-32, -32)),  # a 500 mm field: cropped
        ((256, 300), (1.43, 1.43), 1.5625, 256, (234, 275), (11, -9)),  # padded rows, cropped columns
        ((40, 60), (2.0, 2.0), None, None, (40, 60), (0, 0)),  # kept as it is
        ((40, 60), (2.0, 2.0), None, 64, (40, 60), (12, 2)),  # centred, not resized
        ((40, 60), (1.0, 3.0), 2.0, None, (20, 90), (0, 0)),  # anisotropic pixels become square
    ],
)
def test_plan_table(native_shape, native_spacing, spacing, size, resampled, offset):
    geometry = plan_geometry(native_shape, native_spacing, spacing_mm=spacing, size=size)
    assert geometry.resampled_shape == resampled and geometry.offset == offset
    assert geometry.working_shape == ((size, size) if size else resampled)


def test_resampled_shape_is_monai_spacing_with_scale_extent():
    image = np.random.default_rng(0).random((1, 57, 40), dtype=np.float32)
    native = (0.8, 0.7)
    monai_out = Spacing(pixdim=(1.5, 1.5), scale_extent=True)(
        MetaTensor(torch.from_numpy(image), affine=torch.diag(torch.tensor([*native, 1.0, 1.0], dtype=torch.float64)))
    )
    assert plan_geometry((57, 40), native, spacing_mm=1.5, size=None).resampled_shape == tuple(monai_out.shape[1:])


@pytest.mark.parametrize("size", [3, 4, 6, 8, 9])  # crop both, crop one and pad the other, pad both
def test_crop_and_pad_match_monai_resize_with_pad_or_crop(size):
    array = np.arange(1, 36, dtype=np.float32).reshape(1, 5, 7)
    geometry = plan_geometry((5, 7), (1.0, 1.0), spacing_mm=None, size=size)
    expected = np.asarray(ResizeWithPadOrCrop((size, size))(array))
    np.testing.assert_array_equal(to_working_grid(array, geometry, order=0), expected)


def _label_map(shape, spacing):
    """Three organs as discs and an ellipse, placed in mm so they are the same anatomy at any spacing."""
    rows, cols = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    height, width = shape[0] * spacing[0], shape[1] * spacing[1]
    labels = np.zeros(shape, np.uint8)
    labels[(rows - 0.4 * height) ** 2 + (cols - 0.3 * width) ** 2 < 30**2] = 1
    labels[(rows - 0.6 * height) ** 2 / 4 + (cols - 0.7 * width) ** 2 < 20**2] = 2
    labels[(rows - 0.5 * height) ** 2 + (cols - 0.5 * width) ** 2 < 8**2] = 3
    return labels


@pytest.mark.parametrize(
    "native_shape, native_spacing, spacing, size",
    [
        ((300, 360), (0.8, 0.8), 1.5625, 256),  # downsampled, padded
        ((96, 128), (3.9, 3.9), 1.5625, 256),  # upsampled, cropped
        ((200, 150), (0.7, 1.1), 1.25, 128),  # anisotropic, cropped on both axes
        ((120, 120), (2.0, 2.0), 2.0, 128),  # no resampling: crop and pad only
    ],
)
def test_put_back_lands_each_organ_where_it_was(native_shape, native_spacing, spacing, size):
    labels = _label_map(native_shape, native_spacing)[None]  # one slice: (1, H, W)
    geometry = plan_geometry(native_shape, native_spacing, spacing_mm=spacing, size=size)
    working = to_working_grid(labels, geometry, order=0)
    assert working.shape == (1, size, size) and working.dtype == np.uint8
    restored = put_back(working, geometry, order=0)
    assert restored.shape == labels.shape and restored.dtype == np.uint8
    for organ in (1, 2, 3):
        before, after = labels[0] == organ, restored[0] == organ  # every organ lies inside the working field
        shift = np.subtract(ndimage.center_of_mass(before), ndimage.center_of_mass(after))
        assert np.all(np.abs(shift) <= 1.0), f"organ {organ} moved by {shift} voxels"
        dice = 2 * (before & after).sum() / (before.sum() + after.sum())
        assert dice > 0.9


def test_crop_and_pad_alone_round_trip_exactly():
    array = np.random.default_rng(1).integers(0, 9, (3, 50, 70)).astype(np.uint8)
    geometry = plan_geometry((50, 70), (1.0, 1.0), spacing_mm=1.0, size=64)  # pad rows, crop columns
    assert not geometry.resampled
    restored = put_back(to_working_grid(array, geometry, order=0), geometry)
    np.testing.assert_array_equal(restored[:, :, 3:67], array[:, :, 3:67])
    assert not restored[:, :, :3].any() and not restored[:, :, 67:].any(), "cropped columns come back as fill"


def test_logits_put_back_keep_leading_axes():
    geometry = plan_geometry((90, 90), (1.0, 1.0), spacing_mm=1.5, size=64)
    logits = np.random.default_rng(2).random((4, 3, 64, 64), dtype=np.float32)  # (Z, C, S, S)
    restored = put_back(logits, geometry, order=1)
    assert restored.shape == (4, 3, 90, 90) and restored.dtype == np.float32


def test_geometry_round_trips_through_json_values():
    geometry = plan_geometry((512, 512), (0.98, 0.98), spacing_mm=1.5625, size=256)
    assert SliceGeometry.from_dict(geometry.as_dict()) == geometry


def test_bad_shapes_and_spacings():
    geometry = plan_geometry((40, 60), (1.0, 1.0), spacing_mm=2.0, size=32)
    with pytest.raises(ValueError, match=r"native shape \(40, 60\), got shape \(1, 40, 61\)"):
        to_working_grid(np.zeros((1, 40, 61)), geometry, order=0)
    with pytest.raises(ValueError, match=r"working shape \(32, 32\)"):
        put_back(np.zeros((40, 60)), geometry)
    with pytest.raises(UserInputError, match=r"data.spacing_mm: expected a positive"):
        plan_geometry((40, 60), (1.0, 1.0), spacing_mm=-1.0, size=None)
    with pytest.raises(UserInputError, match=r"scan spacing"):
        plan_geometry((40, 60), (0.0, 1.0), spacing_mm=1.0, size=None)


@pytest.mark.parametrize(
    "native_shape, native_spacing, spacing, size",
    [
        ((120, 100), (0.8, 0.8), 1.5, 64),  # finer native grid: cropped rows, padded columns
        ((50, 70), (1.0, 1.0), None, 64),  # no resampling: crop and pad alone
    ],
)
def test_probabilities_put_back_with_torch_as_put_back_does(native_shape, native_spacing, spacing, size):
    from lrc_ray.data.geometry import put_back_probabilities

    geometry = plan_geometry(native_shape, native_spacing, spacing_mm=spacing, size=size)
    probabilities = torch.softmax(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)), dim=1)
    fast = put_back_probabilities(probabilities, geometry)
    reference = put_back(probabilities.numpy(), geometry, order=1, fill=0.0)
    assert fast.shape == (2, 3, *native_shape)
    np.testing.assert_allclose(fast.numpy(), reference, atol=1e-5)
