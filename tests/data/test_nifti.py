import gzip

import nibabel as nib
import numpy as np
import pytest

from lrc_ray.data.nifti import display_to_ras, ras_to_display, read_header, read_volume, write_volume
from lrc_ray.errors import DataValidationError


def _volume(rng, shape=(5, 7, 9)):
    return rng.integers(-1000, 1000, size=shape).astype(np.int16)


def test_round_trip_keeps_array_dtype_and_spacing(tmp_path):
    volume = _volume(np.random.default_rng(0))
    path = tmp_path / "a.nii.gz"
    write_volume(path, volume, (3.0, 0.75, 0.8))
    read = read_volume(path, dtype=np.int16)
    np.testing.assert_array_equal(read.array, volume)
    np.testing.assert_allclose(read.spacing_mm, (3.0, 0.75, 0.8), rtol=1e-6)
    assert nib.load(path).get_data_dtype() == np.int16
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file is left behind"


def test_display_and_ras_orders_are_inverse():
    volume = _volume(np.random.default_rng(1))
    np.testing.assert_array_equal(ras_to_display(display_to_ras(volume)), volume)


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("P", "S", "R"), ("S", "L", "A")])
def test_any_orientation_reads_as_the_same_axial_slices(tmp_path, codes):
    """The same anatomy stored with another axis order and direction reads back identically."""
    volume = _volume(np.random.default_rng(2))
    ras = display_to_ras(volume)
    # Re-store the RAS array in the target orientation, with an affine saying so.
    target = nib.orientations.axcodes2ornt(codes)
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), target)
    image = nib.Nifti1Image(ras, np.diag([0.8, 0.9, 3.0, 1.0])).as_reoriented(transform)
    assert nib.aff2axcodes(image.affine) == codes
    path = tmp_path / "reoriented.nii.gz"
    nib.save(image, path)
    read = read_volume(path, dtype=np.int16)
    np.testing.assert_array_equal(read.array, volume)
    np.testing.assert_allclose(read.spacing_mm, (3.0, 0.9, 0.8), rtol=1e-6)
    assert read_header(path)[1] == volume.shape[0], "axial slice count found from the affine"


def test_non_3d_image_is_rejected(tmp_path):
    path = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.int16), np.eye(4)), path)
    with pytest.raises(DataValidationError, match=r"flat.nii.gz: expected a 3D volume"):
        read_volume(path)


def test_nan_voxels_are_rejected(tmp_path):
    volume = np.zeros((3, 4, 4), np.float32)
    volume[1, 2, 2] = np.nan
    volume[0, 0, 0] = np.inf
    path = tmp_path / "nan.nii.gz"
    write_volume(path, volume, (1, 1, 1))
    with pytest.raises(DataValidationError, match=r"nan.nii.gz: 2 voxels are NaN or infinite"):
        read_volume(path)


def test_truncated_file_is_rejected(tmp_path):
    path = tmp_path / "cut.nii.gz"
    write_volume(path, _volume(np.random.default_rng(3), (8, 32, 32)), (1, 1, 1))
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DataValidationError, match=r"cut.nii.gz: corrupt or truncated"):
        read_volume(path)


def test_garbage_file_is_rejected(tmp_path):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti file at all" * 10))
    with pytest.raises(DataValidationError, match=r"junk.nii.gz: not a readable NIfTI file"):
        read_volume(path)
