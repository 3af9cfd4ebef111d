"""From a CT volume to training slices: HU window, body mask, optional resize.

All functions work on display-order arrays (Z, H, W) or single slices (H, W); see
`lrc_ray.data.nifti`. Windowed images are quantised to uint8 (value / 255 in [0, 1]):
425 HU over 255 steps is 1.7 HU a step, well below CT noise, and it halves the cache
size against float16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.transform import resize

from lrc_ray.errors import UserInputError

DEFAULT_WINDOW_HU = (-175.0, 250.0)
BODY_THRESHOLD_HU = -500.0


@dataclass(frozen=True)
class SliceParams:
    """How slices are made from volumes. `size` None keeps the volume's in-plane size."""

    window_hu: tuple[float, float] = DEFAULT_WINDOW_HU
    size: int | None = None

    def __post_init__(self) -> None:
        low, high = self.window_hu
        if not low < high:
            raise UserInputError(f"window: expected low < high HU, got [{low}, {high}]")
        if self.size is not None and self.size < 8:
            raise UserInputError(f"size: expected a working size >= 8 pixels, got {self.size}")


@dataclass(frozen=True)
class PreparedSlices:
    """Slices of one volume. Shapes: (Z, h, w); `labels` is None for unlabelled volumes."""

    image_u8: np.ndarray
    body_mask: np.ndarray
    labels: np.ndarray | None


def window_to_unit(hu: np.ndarray, window_hu: tuple[float, float]) -> np.ndarray:
    """Clip HU to the window and scale to [0, 1] (float32)."""
    low, high = window_hu
    return ((np.clip(hu, low, high) - low) / (high - low)).astype(np.float32)


def quantise_unit(image01: np.ndarray) -> np.ndarray:
    return np.rint(image01 * 255.0).astype(np.uint8)


def dequantise(image_u8: np.ndarray) -> np.ndarray:
    return image_u8.astype(np.float32) / 255.0


def body_mask(hu_slice: np.ndarray, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """The patient's body on one slice: HU > threshold, largest connected component, holes filled."""
    foreground = hu_slice > threshold_hu
    components, count = ndimage.label(foreground)
    if count == 0:
        return foreground
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(components == int(np.argmax(sizes)))


def prepare_slices(hu: np.ndarray, labels: np.ndarray | None, params: SliceParams) -> PreparedSlices:
    """Window, mask and (optionally) resize every axial slice of a (Z, H, W) HU volume."""
    image01 = window_to_unit(hu, params.window_hu)
    mask = np.stack([body_mask(hu_slice) for hu_slice in hu])
    if params.size is not None and hu.shape[1:] != (params.size, params.size):
        shape = (hu.shape[0], params.size, params.size)
        # Only the in-plane axes change size, so the z axis is interpolated at its own grid points.
        image01 = resize(image01, shape, order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)
        mask = resize(mask, shape, order=0, anti_aliasing=False).astype(bool)
        if labels is not None:
            labels = resize(labels, shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.uint8)
    return PreparedSlices(image_u8=quantise_unit(image01), body_mask=mask, labels=labels)
