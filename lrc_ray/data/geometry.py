"""From a scan's own in-plane grid to the working grid, and back.

Scanners differ in pixel spacing (0.5-1 mm at 512 x 512, and more in thick-slice series), so
resizing every slice to one pixel size makes the same organ a different number of pixels on
each scanner, and Felzenszwalb's `scale` and `min_size` (pixels) mean different things. Like
nnU-Net and MONAI's `Spacingd`, lrc_ray first resamples each slice to one physical spacing,
then fits it to the working size by a centred crop or pad, never a resize, so the aspect ratio
is kept. `SliceGeometry` records both steps for one volume, and `put_back` undoes them, so a
prediction on the working grid lands on the scan's own grid.

Conventions (those of nnU-Net's `resample_data_or_seg` and of MONAI's
`Spacing(scale_extent=True)`): the resampled grid covers the same physical extent as the
native one, with round(pixels * native spacing / spacing) pixels per axis; interpolation is
skimage's `resize` (pixel-edge aligned). Crop and pad put floor(difference / 2) pixels
before, as MONAI's `ResizeWithPadOrCrop` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np
from skimage.transform import resize

from lrc_ray.errors import UserInputError

if TYPE_CHECKING:  # torch is imported where it is used: slice preparation runs without it
    import torch

# The field a working slice covers when no spacing is set: an adult abdomen is 300-350 mm wide
# (scanners fit their 350-500 mm field of view to it), so 400 mm keeps the organs and most of the
# body wall in view. At data.size 256 that is 1.5625 mm per pixel, coarser than the ~0.8 mm median
# of BTCV/AMOS-like data that nnU-Net would pick, because at lrc_ray's working sizes (64-256 px)
# a finer spacing would crop the abdomen; at the quick start's 64 px it is 6.25 mm.
DEFAULT_FIELD_OF_VIEW_MM = 400.0


def default_spacing_mm(size: int) -> float:
    """The working in-plane spacing (mm) when none is set: `size` pixels span 400 mm."""
    return DEFAULT_FIELD_OF_VIEW_MM / size


@dataclass(frozen=True)
class SliceGeometry:
    """How the axial slices of one volume went from the scan's grid to the working grid.

    native_shape: (H, W) of the scan's slices; native_spacing_mm: their (row, col) spacing.
    resampled_shape: (h, w) after resampling (equal to native_shape when not resampled).
    offset: (row, col) of the resampled slice's first pixel on the working grid: > 0 where it
        was padded before, < 0 where it was cropped before.
    working_shape: (S_row, S_col) of the slices the network sees.
    """

    native_shape: tuple[int, int]
    native_spacing_mm: tuple[float, float]
    resampled_shape: tuple[int, int]
    offset: tuple[int, int]
    working_shape: tuple[int, int]

    @property
    def resampled(self) -> bool:
        return self.resampled_shape != self.native_shape

    def as_dict(self) -> dict:
        """Plain lists and numbers (JSON), read back by `from_dict`."""
        return {name: list(getattr(self, name)) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, values: dict) -> "SliceGeometry":
        return cls(
            native_shape=_pair(values["native_shape"], int),
            native_spacing_mm=_pair(values["native_spacing_mm"], float),
            resampled_shape=_pair(values["resampled_shape"], int),
            offset=_pair(values["offset"], int),
            working_shape=_pair(values["working_shape"], int),
        )


def plan_geometry(
    native_shape: tuple[int, int],
    native_spacing_mm: tuple[float, float],
    *,
    spacing_mm: float | None,
    size: int | None,
) -> SliceGeometry:
    """The geometry for slices of `native_shape` at `native_spacing_mm` (row, col).

    `spacing_mm` None keeps the native grid; `size` None keeps the resampled shape (no crop or pad).
    Raises UserInputError for a non-positive spacing (naming which).
    """
    native_shape = _pair(native_shape, int)
    native_spacing_mm = _pair(native_spacing_mm, float)
    if min(native_spacing_mm) <= 0 or not np.isfinite(native_spacing_mm).all():
        raise UserInputError(f"scan spacing: expected positive in-plane spacings in mm, got {native_spacing_mm}")
    if spacing_mm is None:
        resampled = native_shape
    else:
        if not (np.isfinite(spacing_mm) and spacing_mm > 0):
            raise UserInputError(f"data.spacing_mm: expected a positive number of mm, got {spacing_mm!r}")
        resampled = tuple(max(1, round(n * s / spacing_mm)) for n, s in zip(native_shape, native_spacing_mm))
    working = resampled if size is None else (size, size)
    offset = tuple(_centred_offset(r, w) for r, w in zip(resampled, working))
    return SliceGeometry(native_shape, native_spacing_mm, resampled, offset, working)


def to_working_grid(array: np.ndarray, geometry: SliceGeometry, *, order: int, fill: float = 0) -> np.ndarray:
    """Resample the last two axes to the working spacing, then centre-crop or pad them.

    Shape: (..., H, W) native -> (..., S_row, S_col) working; the dtype is kept.
    `order` 1 (linear, smoothed first where it shrinks) for images, 0 (nearest) for labels and
    masks; `fill` is the value of padded pixels (e.g. air for HU, 0 for background).
    Raises ValueError when the array's last two axes are not the geometry's native shape.
    """
    _check_shape(array, geometry.native_shape, "native")
    resampled = _resample(array, geometry.resampled_shape, order)
    return _place(resampled, geometry.offset, geometry.working_shape, fill)


def put_back(array: np.ndarray, geometry: SliceGeometry, *, order: int = 0, fill: float = 0) -> np.ndarray:
    """The inverse of `to_working_grid`: undo the crop or pad, then resample to the scan's grid.

    Shape: (..., S_row, S_col) working -> (..., H, W) native; the dtype is kept. `order` 0
    (nearest) for label maps; 1 for logits or probabilities (then take the argmax). Pixels that
    the crop cut off get `fill` (e.g. background).
    Raises ValueError when the array's last two axes are not the geometry's working shape.
    """
    _check_shape(array, geometry.working_shape, "working")
    uncropped = _place(array, tuple(-o for o in geometry.offset), geometry.resampled_shape, fill)
    return _resample(uncropped, geometry.native_shape, order)


def put_back_probabilities(probabilities: "torch.Tensor", geometry: SliceGeometry) -> "torch.Tensor":
    """`put_back(..., order=1, fill=0)` for class probabilities as a torch tensor, on its device.

    Shape: (B, C, S_row, S_col) working -> (B, C, H, W) native. The same mapping as `put_back`
    (pixel-edge aligned, edge values held: torch's bilinear with align_corners=False is
    skimage's linear `resize`), at a cost a whole scan can afford: skimage resamples
    (B, C, H, W) as a 4D array, 29x slower (8 slices x 14 classes, 256 -> 512 px, one thread).
    Where the native grid is coarser, torch's anti-aliasing filter (a widened triangle) stands in
    for skimage's Gaussian.
    Pixels that the crop cut off get probability 0 for every class.
    Raises ValueError when the last two axes are not the geometry's working shape.
    """
    import torch.nn.functional as F

    _check_shape(probabilities, geometry.working_shape, "working")
    (top, left), (rows, cols) = (-o for o in geometry.offset), geometry.resampled_shape
    # negative padding crops: this is `_place` at -offset on the resampled grid
    uncropped = F.pad(probabilities, (left, cols - probabilities.shape[-1] - left, top, rows - probabilities.shape[-2] - top))
    if tuple(uncropped.shape[-2:]) == tuple(geometry.native_shape):
        return uncropped
    shrinks = any(n < r for n, r in zip(geometry.native_shape, geometry.resampled_shape))
    return F.interpolate(uncropped, size=geometry.native_shape, mode="bilinear", align_corners=False, antialias=shrinks)


def _centred_offset(length: int, target: int) -> int:
    """Where a `length` axis starts on a centred `target` axis (MONAI's ResizeWithPadOrCrop)."""
    return (target - length) // 2 if target >= length else -((length - target) // 2)


def _place(array: np.ndarray, offset: tuple[int, int], shape: tuple[int, int], fill: float) -> np.ndarray:
    """A (..., *shape) array holding `array` with its first pixel at `offset` (may be negative)."""
    out = np.full(array.shape[:-2] + tuple(shape), fill, dtype=array.dtype)
    source, target = [], []
    for start, length, out_length in zip(offset, array.shape[-2:], shape):
        low, high = max(start, 0), min(start + length, out_length)
        target.append(slice(low, high))
        source.append(slice(low - start, high - start))
    out[(..., *target)] = array[(..., *source)]
    return out


def _resample(array: np.ndarray, shape: tuple[int, int], order: int) -> np.ndarray:
    if tuple(array.shape[-2:]) == tuple(shape):
        return array
    out_shape = array.shape[:-2] + tuple(shape)
    # Anti-aliasing smooths only the axes that shrink (skimage's sigma is 0 on the others).
    resampled = resize(array, out_shape, order=order, anti_aliasing=order > 0, preserve_range=True, mode="edge")
    if np.issubdtype(array.dtype, np.integer) and order > 0:
        resampled = np.rint(resampled)
    return resampled.astype(array.dtype, copy=False)


def _check_shape(array: np.ndarray, shape: tuple[int, int], which: str) -> None:
    if array.ndim < 2 or tuple(array.shape[-2:]) != tuple(shape):
        raise ValueError(f"expected an array ending in the {which} shape {tuple(shape)}, got shape {array.shape}")


def _pair(values, kind: type) -> tuple:
    first, second = values
    return kind(first), kind(second)
