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


def test_prepare_keeps_the_native_grid_without_size_or_spacing():
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 100, (3, 40, 50)).astype(np.float32)
    labels = rng.integers(0, 3, (3, 40, 50)).astype(np.uint8)
    native = prepare_slices(hu, labels, SliceParams(), native_spacing_mm=(0.8, 0.8))
    assert native.image_u8.shape == native.body_mask.shape == native.labels.shape == (3, 40, 50)
    np.testing.assert_allclose(dequantise(native.image_u8), window_to_unit(hu, (-175, 250)), atol=0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(native.labels, labels)
    assert not native.geometry.resampled


def test_prepare_resamples_to_the_spacing_then_crops_or_pads_keeping_the_aspect_ratio():
    hu = np.full((2, 40, 60), -1000.0, np.float32)
    hu[:, 10:30, 10:50] = 40.0  # a 20 x 40 px box at 2 mm: 40 x 80 mm
    labels = (hu > 0).astype(np.uint8)
    prepared = prepare_slices(hu, labels, SliceParams(size=64, spacing_mm=2.5), native_spacing_mm=(2.0, 2.0))
    assert prepared.image_u8.shape == prepared.labels.shape == (2, 64, 64)
    rows, cols = np.nonzero(prepared.labels[0])
    # 40 x 80 mm at 2.5 mm: 16 x 32 px, the same 1:2 shape (a resize to 64 x 64 would make it 32 x 43)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (16, 32)
    geometry = prepared.geometry
    assert geometry.resampled_shape == (32, 48) and geometry.offset == (16, 8)
    assert prepared.image_u8[:, :16].max() == 0 and not prepared.body_mask[:, :16].any(), "padding is air"


def test_size_without_spacing_means_a_400_mm_field():
    assert SliceParams(size=64).working_spacing_mm == 6.25
    assert SliceParams(size=256).working_spacing_mm == 1.5625
    assert SliceParams(size=64, spacing_mm=5.0).working_spacing_mm == 5.0
    assert SliceParams().working_spacing_mm is None


@pytest.mark.parametrize("kwargs", [dict(window_hu=(100, -100)), dict(size=2), dict(spacing_mm=0.0), dict(spacing_mm=float("nan"))])
def test_bad_slice_params(kwargs):
    with pytest.raises(UserInputError):
        SliceParams(**kwargs)
