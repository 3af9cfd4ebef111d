"""Two independently augmented views of one slice and its super-pixel map (LRC_METHOD section 3).

Each view draws its own parameters from the caller's `numpy` generator, so the two views never
share a random draw (the MONAI pitfall of one random dict transform called once for both) and a
view is reproduced exactly from the generator's state. The geometry of a view (random resized
crop, rotation, flips) is one affine matrix, resampled once on one grid: bilinear for the image,
nearest for the map, so the map keeps exact integer ids. Intensity changes touch the image only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from monai.transforms import AdjustContrast, AffineGrid, GaussianSmooth, Resample
from monai.utils import convert_to_tensor

from lrc_ray.config import AugmentParams
from lrc_ray.errors import UserInputError
from lrc_ray.superpixels.felzenszwalb import IGNORED_REGION

BACKGROUND_LABEL = 0


@dataclass(frozen=True)
class ViewGeometry:
    """Where a view's pixels come from in the input slice (input pixel units, (row, col) order)."""

    center_offset: tuple[float, float]  # crop centre relative to the slice centre
    crop_size: tuple[float, float]  # crop height and width
    angle: float  # radians, about the crop centre
    flip: tuple[bool, bool]  # mirror rows, mirror columns


def view_affine(geometry: ViewGeometry, output_shape: tuple[int, int]) -> np.ndarray:
    """The 3x3 matrix taking centred output pixel coordinates to centred input ones (MONAI's grid
    convention: coordinate 0 is the middle of the slice)."""
    row_scale = geometry.crop_size[0] / output_shape[0] * (-1.0 if geometry.flip[0] else 1.0)
    col_scale = geometry.crop_size[1] / output_shape[1] * (-1.0 if geometry.flip[1] else 1.0)
    cos, sin = math.cos(geometry.angle), math.sin(geometry.angle)
    return np.array(
        [
            [cos * row_scale, -sin * col_scale, geometry.center_offset[0]],
            [sin * row_scale, cos * col_scale, geometry.center_offset[1]],
            [0.0, 0.0, 1.0],
        ]
    )


_BILINEAR = Resample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)
_NEAREST = Resample(mode="nearest", padding_mode="zeros", dtype=torch.float32)


def warp_slice(
    image: torch.Tensor,
    index_map: torch.Tensor,
    geometry: ViewGeometry,
    output_shape: tuple[int, int],
    *,
    index_fill: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample a slice and its integer map through one affine grid.

    Args:
        image: float image. Shape: (H, W).
        index_map: integer ids (super-pixels or organ labels). Shape: (H, W).
        index_fill: id given to output pixels that come from outside the slice.

    Returns:
        The image, shape (1, *output_shape), float32 (0 outside the slice), and the map,
        shape output_shape, int64, with exactly the input's ids plus `index_fill`.
    """
    grid, _ = AffineGrid(affine=view_affine(geometry, output_shape))(spatial_size=output_shape)
    # grid_sample pads with zeros; shifting ids by -index_fill makes that zero mean index_fill.
    # Nearest sampling copies values, and float32 holds integers exactly up to 2**24.
    shifted_map = (index_map.to(torch.int64) - index_fill).to(torch.float32)
    warped_image = _BILINEAR(image[None], grid)
    warped_map = _NEAREST(shifted_map[None], grid)
    warped_map = convert_to_tensor(warped_map, track_meta=False)[0].to(torch.int64) + index_fill
    return convert_to_tensor(warped_image, track_meta=False), warped_map


@dataclass(frozen=True)
class TwoViews:
    """Two augmentations of one slice. Shapes: images (1, S, S) float32; regions (S, S) int64, -1 = ignored;
    labels (S, S) int64 (background outside the slice), only when the slice's label was given."""

    image1: torch.Tensor
    image2: torch.Tensor
    regions1: torch.Tensor
    regions2: torch.Tensor
    label1: torch.Tensor | None = None
    label2: torch.Tensor | None = None


class TwoViewAugment:
    """Slice + super-pixel map -> two views, each with its own draw from the caller's generator."""

    def __init__(self, params: AugmentParams, *, output_size: int) -> None:
        if isinstance(output_size, bool) or not isinstance(output_size, int) or output_size < 8:
            raise UserInputError(f"output_size: expected a whole number of pixels >= 8, got {output_size!r}")
        self.params = params
        self.output_size = output_size

    def __call__(
        self, image: np.ndarray, superpixels: np.ndarray, rng: np.random.Generator, label: np.ndarray | None = None
    ) -> TwoViews:
        """Args: image float in [0, 1], superpixels int ids with -1 = ignored, optional organ label;
        all shape (H, W). The label follows each view's geometry, without left-right flips, which
        would put left-side organs on the right while their labels keep the side."""
        if image.ndim != 2 or image.shape != superpixels.shape or (label is not None and label.shape != image.shape):
            raise ValueError(
                f"expected a 2D image and maps of its shape, got {image.shape}, {superpixels.shape}"
                + ("" if label is None else f" and {label.shape}")
            )
        # Copies: arrays decoded from Arrow are read-only, which torch warns about.
        image_t = torch.from_numpy(np.array(image, dtype=np.float32))
        regions_t = torch.from_numpy(np.array(superpixels, dtype=np.int64))
        label_t = None if label is None else torch.from_numpy(np.array(label, dtype=np.int64))
        image1, regions1, label1 = self._view(image_t, regions_t, label_t, rng)
        image2, regions2, label2 = self._view(image_t, regions_t, label_t, rng)
        return TwoViews(image1, image2, regions1, regions2, label1, label2)

    def draw_geometry(self, input_shape: tuple[int, int], rng: np.random.Generator) -> ViewGeometry:
        """A square random resized crop that fits in the slice, a rotation about its centre, flips."""
        height, width = input_shape
        area_fraction = rng.uniform(*self.params.crop_scale)
        side = min(math.sqrt(area_fraction * height * width), height, width)
        center_offset = (rng.uniform(-0.5, 0.5) * (height - side), rng.uniform(-0.5, 0.5) * (width - side))
        angle = math.radians(rng.uniform(-self.params.rotate_degrees, self.params.rotate_degrees))
        flip = (bool(rng.random() < self.params.flip_prob), bool(rng.random() < self.params.flip_prob))
        return ViewGeometry(center_offset=center_offset, crop_size=(side, side), angle=angle, flip=flip)

    def _view(
        self, image: torch.Tensor, regions: torch.Tensor, label: torch.Tensor | None, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        geometry = self.draw_geometry(tuple(image.shape), rng)
        if label is not None:
            geometry = replace(geometry, flip=(geometry.flip[0], False))  # keep left organs on the left
        output_shape = (self.output_size, self.output_size)
        warped_image, warped_regions = warp_slice(image, regions, geometry, output_shape, index_fill=IGNORED_REGION)
        warped_label = None
        if label is not None:
            _, warped_label = warp_slice(image, label, geometry, output_shape, index_fill=BACKGROUND_LABEL)
        return self._adjust_intensity(warped_image, rng), warped_regions, warped_label

    def _adjust_intensity(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Contrast, gamma, blur, noise on a (1, S, S) image. Every draw is made, used or not,
        so the generator advances the same way whichever options are switched off."""
        params = self.params
        contrast = rng.uniform(*params.contrast_range)
        gamma = rng.uniform(*params.gamma_range)
        blur = rng.random() < params.blur_prob
        blur_sigma = rng.uniform(*params.blur_sigma_range)
        noise = rng.standard_normal(image.shape, dtype=np.float32)

        mean = image.mean()
        # Clipping saturates what the contrast pushed past the ends of the window, as the window itself does.
        image = ((image - mean) * contrast + mean).clamp(0.0, 1.0)
        if gamma != 1.0:
            image = AdjustContrast(gamma=gamma)(image)
        if blur:
            image = GaussianSmooth(sigma=blur_sigma)(image)
        image = image + params.noise_std * torch.from_numpy(noise)
        return convert_to_tensor(image, dtype=torch.float32, track_meta=False)
