import numpy as np
import pytest
from skimage.segmentation import felzenszwalb

from lrc_ray.errors import UserInputError
from lrc_ray.superpixels.felzenszwalb import FelzenszwalbParams, count_regions, superpixels_for_slice


def _phantom_slice(rng) -> tuple[np.ndarray, np.ndarray]:
    """Four flat quadrants with a little noise inside a square body."""
    image = np.zeros((64, 64))
    image[8:32, 8:32], image[8:32, 32:56], image[32:56, 8:32], image[32:56, 32:56] = 0.3, 0.5, 0.7, 0.9
    image += rng.normal(0, 0.01, image.shape)
    body = np.zeros_like(image, dtype=bool)
    body[8:56, 8:56] = True
    return np.clip(image, 0, 1), body


def test_same_partition_as_skimage_inside_the_body():
    image, _ = _phantom_slice(np.random.default_rng(0))
    params = FelzenszwalbParams(scale=100, sigma=0.5, min_size=10)
    ours = superpixels_for_slice(image, np.ones_like(image, dtype=bool), params)
    reference = felzenszwalb(image, scale=100, sigma=0.5, min_size=10, channel_axis=None)
    # Equal up to renaming: each of our ids maps to exactly one skimage id and back.
    pairs = set(zip(ours.ravel().tolist(), reference.ravel().tolist()))
    assert len(pairs) == len(np.unique(ours)) == len(np.unique(reference))
    assert ours.min() == 0 and count_regions(ours) == len(np.unique(reference))


def test_flat_quadrants_are_found_and_background_is_ignored():
    image, body = _phantom_slice(np.random.default_rng(1))
    regions = superpixels_for_slice(image, body, FelzenszwalbParams(scale=100, sigma=0.3, min_size=10))
    assert (regions[~body] == -1).all(), "the air around the body is one ignored region"
    assert count_regions(regions) == 4
    for rows, cols in [(slice(8, 32), slice(8, 32)), (slice(40, 56), slice(40, 56))]:
        assert len(np.unique(regions[rows, cols])) == 1, "a flat organ is one region"
    assert sorted(np.unique(regions[body])) == [0, 1, 2, 3], "ids are relabelled 0..R-1"


def test_region_mostly_outside_the_body_is_dropped():
    image = np.zeros((32, 32))
    image[:, 16:] = 1.0  # two flat halves
    body = np.zeros_like(image, dtype=bool)
    body[:, :16] = True
    body[:4, 16:] = True  # only an eighth of the right half is body
    regions = superpixels_for_slice(image, body, FelzenszwalbParams(scale=50, sigma=0.1, min_size=5))
    assert (regions[:, :16] == 0).all()
    assert (regions[:, 16:] == -1).all()


def test_larger_scale_gives_fewer_regions():
    rng = np.random.default_rng(2)
    image = np.clip(0.5 + rng.normal(0, 0.15, (64, 64)), 0, 1)
    body = np.ones_like(image, dtype=bool)
    counts = [count_regions(superpixels_for_slice(image, body, FelzenszwalbParams(scale=s, sigma=0.5, min_size=5)))
              for s in (10, 100, 1000)]
    assert counts[0] > counts[1] > counts[2]


@pytest.mark.parametrize("field", ["scale", "sigma", "min_size"])
@pytest.mark.parametrize("value", [0, -1, float("nan")])
def test_parameters_must_be_positive(field, value):
    with pytest.raises(UserInputError, match=f"{field}: expected a positive number"):
        FelzenszwalbParams(**{field: value})


def test_min_size_must_be_whole():
    with pytest.raises(UserInputError, match="min_size: expected a whole number"):
        FelzenszwalbParams(min_size=2.5)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\(8, 8\) and \(8, 9\)"):
        superpixels_for_slice(np.zeros((8, 8)), np.zeros((8, 9), bool), FelzenszwalbParams())
