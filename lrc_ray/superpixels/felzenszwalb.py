"""Super-pixels of one slice (LRC_METHOD.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.segmentation import felzenszwalb

from lrc_ray.errors import UserInputError

IGNORED_REGION = -1
# A region counts as body when at least this fraction of its pixels lie in the body mask.
MIN_INSIDE_FRACTION = 0.5


@dataclass(frozen=True)
class FelzenszwalbParams:
    """skimage's `felzenszwalb` settings. `scale` is in 8-bit intensity units (skimage divides it
    by 255 for float images): larger gives fewer, bigger regions."""

    scale: float = 100.0
    sigma: float = 0.8
    min_size: int = 20

    def __post_init__(self) -> None:
        for name, value in (("scale", self.scale), ("sigma", self.sigma), ("min_size", self.min_size)):
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise UserInputError(f"{name}: expected a positive number, got {value!r}")
        if int(self.min_size) != self.min_size:
            raise UserInputError(f"min_size: expected a whole number of pixels, got {self.min_size!r}")


def superpixels_for_slice(image01: np.ndarray, body: np.ndarray, params: FelzenszwalbParams) -> np.ndarray:
    """Felzenszwalb regions of a windowed slice, background regions dropped.

    Args:
        image01: float slice in [0, 1]. Shape: (H, W).
        body: boolean body mask. Shape: (H, W).

    Returns:
        int32 region ids, shape (H, W): 0..R-1 for regions mostly inside the body,
        -1 for regions mostly outside it.
    """
    if image01.ndim != 2 or image01.shape != body.shape:
        raise ValueError(f"expected a 2D slice and a mask of its shape, got {image01.shape} and {body.shape}")
    segments = felzenszwalb(
        image01, scale=params.scale, sigma=params.sigma, min_size=int(params.min_size), channel_axis=None
    )
    flat = segments.ravel()
    region_sizes = np.bincount(flat)
    inside_counts = np.bincount(flat, weights=body.ravel())
    keep = inside_counts >= MIN_INSIDE_FRACTION * np.maximum(region_sizes, 1)
    keep &= region_sizes > 0
    new_ids = np.where(keep, np.cumsum(keep) - 1, IGNORED_REGION).astype(np.int32)
    return new_ids[segments]


def count_regions(superpixels: np.ndarray) -> int:
    return int(superpixels.max(initial=IGNORED_REGION)) + 1
