"""NIfTI reading and writing in one fixed orientation.

lrc_ray works on axial slices in the radiological display convention, whatever the
file's affine says:

    volume[z, row, col]   z: inferior -> superior, row: anterior -> posterior,
                          col: patient right -> patient left (image left = patient right)

On disk we write RAS+ arrays (nibabel's canonical orientation); on reading, any affine
is first brought to the closest canonical (RAS+) orientation, then to display order.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from lrc_ray.atomic import atomic_write_path
from lrc_ray.errors import DataValidationError


@dataclass(frozen=True)
class Volume:
    """A volume in display order. Shape: (Z, H, W). `spacing_mm` is (z, row, col)."""

    array: np.ndarray
    spacing_mm: tuple[float, float, float]


def display_to_ras(volume_zhw: np.ndarray) -> np.ndarray:
    """(Z, H, W) display order -> (X, Y, Z) RAS+ array (x to the right, y anterior)."""
    return np.ascontiguousarray(volume_zhw.transpose(2, 1, 0)[::-1, ::-1, :])


def ras_to_display(volume_xyz: np.ndarray) -> np.ndarray:
    """(X, Y, Z) RAS+ array -> (Z, H, W) display order. Inverse of `display_to_ras`."""
    return np.ascontiguousarray(volume_xyz[::-1, ::-1, :].transpose(2, 1, 0))


def write_volume(path: str | Path, volume_zhw: np.ndarray, spacing_mm: tuple[float, float, float]) -> None:
    """Write a display-order volume as a RAS+ NIfTI file, atomically (temp file, then rename).

    `spacing_mm` is (z, row, col) as in `Volume`. The array's dtype is kept (e.g. int16 HU,
    uint8 labels).
    """
    path = Path(path)
    spacing_z, spacing_row, spacing_col = (float(s) for s in spacing_mm)
    ras = display_to_ras(volume_zhw)
    affine = np.diag([spacing_col, spacing_row, spacing_z, 1.0])
    # Centre the volume on the world origin, as scanners roughly do.
    affine[:3, 3] = -0.5 * np.array(ras.shape) * np.array([spacing_col, spacing_row, spacing_z])
    image = nib.Nifti1Image(ras, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_write_path(path) as tmp:
        nib.save(image, tmp)


def write_like(path: str | Path, volume_zhw: np.ndarray, reference: str | Path) -> None:
    """Write a display-order volume (e.g. predicted labels) on the grid of the file `reference`,
    atomically: the array is brought back from display order to the reference's own axis order,
    so the file has the reference's exact shape, affine, qform and sform; its dtype is the array's.

    Raises ValueError when the volume's shape is not the reference's in display order.
    """
    image = nib.load(str(reference))
    canonical_shape = nib.as_closest_canonical(image).shape[:3]
    expected = (canonical_shape[2], canonical_shape[1], canonical_shape[0])
    if tuple(volume_zhw.shape) != expected:
        raise ValueError(f"expected a volume of display shape {expected} for {reference}, got {volume_zhw.shape}")
    # as_closest_canonical reorients by io_orientation(affine); apply the inverse transform.
    to_file_axes = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                   nib.orientations.io_orientation(image.affine))
    array = nib.orientations.apply_orientation(display_to_ras(volume_zhw), to_file_axes).reshape(image.shape)
    header = image.header.copy()
    header.set_data_dtype(array.dtype)
    header.set_slope_inter(1.0, 0.0)  # the stored values are the labels themselves
    written = type(image)(np.ascontiguousarray(array), image.affine, header=header)
    written.set_qform(image.get_qform(), code=int(image.header["qform_code"]))
    written.set_sform(image.get_sform(), code=int(image.header["sform_code"]))
    with atomic_write_path(path) as tmp:
        nib.save(written, tmp)


def is_3d_shape(shape: tuple[int, ...]) -> bool:
    """A volume's stored shape: (X, Y, Z), or (X, Y, Z, 1) as some tools write 3D images."""
    return len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)


def read_header(path: str | Path) -> tuple[tuple[int, ...], int]:
    """The stored array shape and the number of axial slices, from the header alone."""
    try:
        image = nib.load(str(path))
    except FileNotFoundError:
        raise DataValidationError(f"{path}: file not found") from None
    except Exception as exc:  # nibabel raises many types for unreadable headers
        raise DataValidationError(f"{path}: not a readable NIfTI file ({_one_line(exc)})") from None
    shape = tuple(int(n) for n in image.shape)
    if len(shape) < 3:
        return shape, 0
    check_orientation(image, path)
    axis_codes = nib.aff2axcodes(image.affine)
    axial_axis = next((axis for axis, code in enumerate(axis_codes) if code in "SI"), 2)
    return shape, shape[axial_axis]


def read_volume(path: str | Path, *, dtype: type = np.float32) -> Volume:
    """Read a 3D NIfTI volume into display order, checking it is 3D, complete and finite."""
    try:
        image = nib.load(str(path))
    except FileNotFoundError:
        raise DataValidationError(f"{path}: file not found") from None
    except Exception as exc:
        raise DataValidationError(f"{path}: not a readable NIfTI file ({_one_line(exc)})") from None
    shape = tuple(image.shape)
    if len(shape) == 4 and shape[3] == 1:
        image = image.slicer[..., 0]
    elif len(shape) != 3:
        raise DataValidationError(f"{path}: expected a 3D volume, got shape {shape}")
    check_orientation(image, path)
    canonical = nib.as_closest_canonical(image)
    try:
        array = np.asarray(canonical.dataobj, dtype=dtype)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError) as exc:
        raise DataValidationError(f"{path}: corrupt or truncated NIfTI data ({_one_line(exc)})") from None
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        count = int((~np.isfinite(array)).sum())
        raise DataValidationError(f"{path}: {count} voxels are NaN or infinite; expected finite values")
    zooms = canonical.header.get_zooms()[:3]
    spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
    return Volume(array=ras_to_display(array), spacing_mm=spacing)


def check_orientation(image: nib.Nifti1Image, path: str | Path) -> None:
    """Refuse a file whose axes' directions are unknown, instead of guessing them.

    With qform_code and sform_code both 0, nibabel falls back to an ANALYZE-style affine that
    may mirror left and right; a singular affine has no orientation at all.
    Raises DataValidationError naming the file.
    """
    header = image.header
    if "qform_code" in header and int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        raise DataValidationError(
            f"{path}: orientation cannot be determined (qform_code and sform_code are both 0); "
            "expected a NIfTI file with a scanner or aligned affine"
        )
    rotation = np.asarray(image.affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(rotation, axis=0)
    if not np.isfinite(rotation).all() or norms.min() == 0 or abs(np.linalg.det(rotation)) < 1e-3 * norms.prod():
        raise DataValidationError(
            f"{path}: orientation cannot be determined (the affine's axes are degenerate: "
            f"{np.round(rotation, 4).tolist()}); expected three independent axis directions"
        )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
