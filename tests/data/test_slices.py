import numpy as np
import pytest

from lrc_ray.data.slices import SliceParams, body_mask, dequantise, prepare_slices, window_to_unit
from lrc_ray.errors import UserInputError


def test_window_clips_and_scales():
    hu = np.array([-1000.0, -175.0, 37.5, 250.0, 3000.0])
    np.testing.assert_allclose(window_to_unit(hu, (-175, 250)), [0, 0, 0.5, 1, 1])


def test_body_mask_keeps_largest_component_and_fills_holes():
    hu = np.full((40, 40), -1000.0)
    hu[5:35, 5:35] = 40.0  # the body
    hu[15:20, 15:20] = -1000.0  # air inside (bowel gas): a hole to fill
    hu[0:2, 38:40] = 40.0  # the table: a smaller component to drop
    mask = body_mask(hu)
    assert mask[5:35, 5:35].all()
    assert not mask[0:2, 38:40].any()
    assert mask.sum() == 30 * 30


def test_body_mask_of_empty_slice_is_empty():
    assert not body_mask(np.full((8, 8), -1000.0)).any()


def test_prepare_keeps_native_size_by_default_and_resizes_on_request():
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 100, (3, 40, 50)).astype(np.float32)
    labels = rng.integers(0, 3, (3, 40, 50)).astype(np.uint8)
    native = prepare_slices(hu, labels, SliceParams())
    assert native.image_u8.shape == native.body_mask.shape == native.labels.shape == (3, 40, 50)
    np.testing.assert_allclose(dequantise(native.image_u8), window_to_unit(hu, (-175, 250)), atol=0.5 / 255 + 1e-6)
    resized = prepare_slices(hu, labels, SliceParams(size=32))
    assert resized.image_u8.shape == resized.labels.shape == (3, 32, 32)
    assert set(np.unique(resized.labels)) <= {0, 1, 2}, "labels are resized by nearest neighbour"


@pytest.mark.parametrize("kwargs", [dict(window_hu=(100, -100)), dict(size=2)])
def test_bad_slice_params(kwargs):
    with pytest.raises(UserInputError):
        SliceParams(**kwargs)
