"""Two independently augmented views of one slice and its super-pixel map (LRC_METHOD section 3).

Each view draws its own parameters from the caller's `numpy` generator, so the two views never
share a random draw (the MONAI pitfall of one random dict transform called once for both) and a
view is reproduced exactly from the generator's state. The geometry of a view (random resized
crop, rotation, flips) is one affine matrix, resampled once on one grid: bilinear for the image,
nearest for the map, so the map keeps exact integer ids. Intensity changes touch the image only.

Drawing and applying are separate steps: the draws are a few numbers per slice, made on the host,
and `TwoViewAugment.augment` applies a whole batch's draws at once with batched `grid_sample` on
whatever device the batch goes to. On a GPU the augmentation then runs there, next to the model,
instead of starving it from one host thread; on a CPU one batched call replaces a few hundred
small per-slice ones. A slice comes out the same whether it is augmented alone or in a batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers.convutils import gaussian_1d

from lrc_ray.config import AugmentParams
from lrc_ray.errors import UserInputError
from lrc_ray.keyed_random import keyed_normal
from lrc_ray.superpixels.felzenszwalb import IGNORED_REGION

BACKGROUND_LABEL = 0
_GAMMA_EPSILON = 1e-7  # MONAI AdjustContrast's
_NOISE_STREAM = 0


@dataclass(frozen=True)
class ViewGeometry:
    """Where a view's pixels come from in the input slice (input pixel units, (row, col) order)."""

    center_offset: tuple[float, float]  # crop centre relative to the slice centre
    crop_size: tuple[float, float]  # crop height and width
    angle: float  # radians, about the crop centre
    flip: tuple[bool, bool]  # mirror rows, mirror columns


@dataclass(frozen=True)
class ViewDraw:
    """Everything random about one view, drawn on the host before the batch is augmented."""

    geometry: ViewGeometry
    contrast: float
    gamma: float
    blur_sigma: float | None  # None: no blur
    noise_seed: int


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


_ROW_COL_TO_X_Y = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def grid_theta(geometry: ViewGeometry, input_shape: tuple[int, int], output_shape: tuple[int, int]) -> np.ndarray:
    """`view_affine` for `torch.nn.functional.affine_grid` (align_corners=False): there a pixel
    centre's coordinate is 2 * centred / size, in (x, y) = (column, row) order. Shape (2, 3)."""
    output_to_pixels = np.diag([output_shape[0] / 2, output_shape[1] / 2, 1.0])
    pixels_to_input = np.diag([2 / input_shape[0], 2 / input_shape[1], 1.0])
    row_col = pixels_to_input @ view_affine(geometry, output_shape) @ output_to_pixels
    return (_ROW_COL_TO_X_Y @ row_col @ _ROW_COL_TO_X_Y)[:2]


def warp(
    images: torch.Tensor,
    index_maps: torch.Tensor,
    geometries: Sequence[ViewGeometry],
    output_shape: tuple[int, int],
    *,
    index_fills: Sequence[int],
    index_dtype: torch.dtype = torch.int64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample a batch of slices and their integer maps, each slice through its own affine grid.

    Args:
        images: float images. Shape: (B, H, W).
        index_maps: integer ids (super-pixels, organ labels), K maps per slice. Shape: (B, K, H, W).
        geometries: one per slice.
        index_fills: per map, the id given to output pixels that come from outside the slice.

    Returns:
        The images, shape (B, 1, *output_shape), float32 (0 outside the slice), and the maps,
        shape (B, K, *output_shape), `index_dtype`, with exactly the input's ids plus the fills.
    """
    input_shape = tuple(images.shape[-2:])
    thetas = np.stack([grid_theta(geometry, input_shape, output_shape) for geometry in geometries])
    thetas = torch.as_tensor(thetas, dtype=torch.float32, device=images.device)
    grid = F.affine_grid(thetas, [len(geometries), 1, *output_shape], align_corners=False)
    warped_images = F.grid_sample(images[:, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # grid_sample pads with zeros; shifting ids by -fill makes that zero mean the fill.
    # Nearest sampling copies values, and float32 holds integers exactly up to 2**24.
    fills = torch.as_tensor(list(index_fills), dtype=torch.int64, device=images.device).view(1, -1, 1, 1)
    shifted_maps = (index_maps.to(torch.int64) - fills).to(torch.float32)
    warped_maps = F.grid_sample(shifted_maps, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return warped_images, warped_maps.to(index_dtype) + fills.to(index_dtype)


def warp_slice(
    image: torch.Tensor,
    index_map: torch.Tensor,
    geometry: ViewGeometry,
    output_shape: tuple[int, int],
    *,
    index_fill: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`warp` for one slice and one map, shapes (H, W); returns the image (1, *output_shape) and
    the map `output_shape`."""
    images, maps = warp(image[None], index_map[None, None], [geometry], output_shape, index_fills=[index_fill])
    return images[0], maps[0, 0]


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
    """Slices + super-pixel maps -> two views each, each view with its own draw from the caller's generator."""

    def __init__(self, params: AugmentParams, *, output_size: int) -> None:
        if isinstance(output_size, bool) or not isinstance(output_size, int) or output_size < 8:
            raise UserInputError(f"output_size: expected a whole number of pixels >= 8, got {output_size!r}")
        self.params = params
        self.output_size = output_size

    def __call__(
        self, image: np.ndarray, superpixels: np.ndarray, rng: np.random.Generator, label: np.ndarray | None = None
    ) -> TwoViews:
        """One slice: image float in [0, 1], superpixels int ids with -1 = ignored, optional organ
        label; all shape (H, W). The label follows each view's geometry, without left-right flips,
        which would put left-side organs on the right while their labels keep the side."""
        draws = self.draw(image.shape, rng, with_label=label is not None)
        views = self.augment([image], [superpixels], [draws], labels=None if label is None else [label])
        return TwoViews(**{name: value[0] for name, value in views.items()})

    def draw(
        self, input_shape: tuple[int, ...], rng: np.random.Generator, *, with_label: bool = False
    ) -> tuple[ViewDraw, ViewDraw]:
        """Both views' draws for one slice of `input_shape`, the first view's first. Every draw is
        made, used or not, so the generator advances the same way whichever options are off."""
        return self._draw_view(tuple(input_shape), rng, with_label), self._draw_view(tuple(input_shape), rng, with_label)

    def draw_geometry(self, input_shape: tuple[int, int], rng: np.random.Generator) -> ViewGeometry:
        """A square random resized crop that fits in the slice, a rotation about its centre, flips."""
        height, width = input_shape
        area_fraction = rng.uniform(*self.params.crop_scale)
        side = min(math.sqrt(area_fraction * height * width), height, width)
        center_offset = (rng.uniform(-0.5, 0.5) * (height - side), rng.uniform(-0.5, 0.5) * (width - side))
        angle = math.radians(rng.uniform(-self.params.rotate_degrees, self.params.rotate_degrees))
        flip = (bool(rng.random() < self.params.flip_prob), bool(rng.random() < self.params.flip_prob))
        return ViewGeometry(center_offset=center_offset, crop_size=(side, side), angle=angle, flip=flip)

    def _draw_view(self, input_shape: tuple[int, ...], rng: np.random.Generator, with_label: bool) -> ViewDraw:
        if len(input_shape) != 2:
            raise ValueError(f"expected a 2D slice, got shape {input_shape}")
        params = self.params
        geometry = self.draw_geometry(input_shape, rng)
        if with_label:
            geometry = replace(geometry, flip=(geometry.flip[0], False))  # keep left organs on the left
        contrast = rng.uniform(*params.contrast_range)
        gamma = rng.uniform(*params.gamma_range)
        blur = rng.random() < params.blur_prob
        blur_sigma = rng.uniform(*params.blur_sigma_range)
        noise_seed = int(rng.integers(2**62))
        return ViewDraw(geometry, float(contrast), float(gamma), float(blur_sigma) if blur else None, noise_seed)

    @torch.no_grad()
    def augment(
        self,
        images: Sequence[np.ndarray],
        superpixels: Sequence[np.ndarray],
        draws: Sequence[tuple[ViewDraw, ViewDraw]],
        *,
        labels: Sequence[np.ndarray] | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Apply each slice's draws (from `draw`) to a list of numpy slices, on `device` (default CPU).

        Slices may differ in shape; each shape is warped as one batch by `augment_batch`.
        Returns image1, image2 (B, 1, S, S) float32 and regions1, regions2 (B, S, S) int64,
        -1 = ignored; with `labels`, also label1, label2 (B, S, S) int64.
        """
        count = len(images)
        if len(superpixels) != count or len(draws) != count or (labels is not None and len(labels) != count):
            raise ValueError(f"expected as many super-pixel maps, draws and labels as the {count} images")
        for index, image in enumerate(images):
            shapes = [image.shape, superpixels[index].shape] + ([] if labels is None else [labels[index].shape])
            if image.ndim != 2 or len(set(shapes)) != 1:
                raise ValueError(f"slice {index}: expected a 2D image and maps of its shape, got shapes {shapes}")
        device = torch.device(device if device is not None else "cpu")
        by_shape: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            by_shape.setdefault(tuple(image.shape), []).append(index)
        groups = []
        for members in by_shape.values():
            group = self.augment_batch(
                _to_device(np.stack([images[i] for i in members]), np.float32, device),
                _to_device(np.stack([superpixels[i] for i in members]), np.int32, device),
                [draws[i] for i in members],
                labels=None if labels is None else _to_device(np.stack([labels[i] for i in members]), np.int32, device),
            )
            groups.append((members, {name: value if value.is_floating_point() else value.long()
                                     for name, value in group.items()}))
        if len(groups) == 1:  # the usual batch, one shape: the group is the whole batch
            return groups[0][1]
        views = {name: value.new_empty((count, *value.shape[1:])) for name, value in groups[0][1].items()}
        for members, group in groups:
            for name, value in group.items():
                views[name][members] = value
        return views

    @torch.no_grad()
    def augment_batch(
        self,
        images: torch.Tensor,
        regions: torch.Tensor,
        draws: Sequence[tuple[ViewDraw, ViewDraw]],
        *,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Apply each slice's draws to a batch of slices of one shape, on the batch's device.

        Args:
            images: uint8 (value / 255 in [0, 1], as cached) or float in [0, 1]. Shape: (B, H, W).
            regions: integer region ids, -1 = ignored. Shape: (B, H, W).
            draws: one (view 1, view 2) pair per slice, from `draw`.
            labels: integer organ ids, or None. Shape: (B, H, W).

        Returns image1, image2 (B, 1, S, S) float32; regions1, regions2 (B, S, S) int32, -1 =
        ignored; with `labels`, label1, label2 (B, S, S) int32, background outside the slice.
        """
        if images.dtype == torch.uint8:
            images = images.float() / 255.0  # as `data.slices.dequantise`, bit for bit
        maps = regions.unsqueeze(1) if labels is None else torch.stack([regions, labels.to(regions.dtype)], dim=1)
        fills = [IGNORED_REGION] + ([] if labels is None else [BACKGROUND_LABEL])
        size = (self.output_size, self.output_size)
        views: dict[str, torch.Tensor] = {}
        for view in (0, 1):
            view_draws = [pair[view] for pair in draws]
            warped_images, warped_maps = warp(images, maps, [draw.geometry for draw in view_draws], size,
                                              index_fills=fills, index_dtype=torch.int32)
            views[f"image{view + 1}"] = self._adjust_intensity(warped_images, view_draws)
            views[f"regions{view + 1}"] = warped_maps[:, 0]
            if labels is not None:
                views[f"label{view + 1}"] = warped_maps[:, 1]
        names = ["image1", "image2", "regions1", "regions2"] + ([] if labels is None else ["label1", "label2"])
        return {name: views[name] for name in names}

    def _adjust_intensity(self, images: torch.Tensor, draws: Sequence[ViewDraw]) -> torch.Tensor:
        """Contrast, gamma, blur, noise on a batch of (1, S, S) images, each with its own draw."""
        per_slice = dict(dtype=images.dtype, device=images.device)
        contrast = torch.tensor([draw.contrast for draw in draws], **per_slice).view(-1, 1, 1, 1)
        gamma = torch.tensor([draw.gamma for draw in draws], **per_slice).view(-1, 1, 1, 1)

        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        # Clipping saturates what the contrast pushed past the ends of the window, as the window itself does.
        images = ((images - mean) * contrast + mean).clamp(0.0, 1.0)
        # MONAI AdjustContrast's gamma, with each slice's own range and gamma (it has no batched form).
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        span = images.amax(dim=(1, 2, 3), keepdim=True) - low
        # torch.where returns a new tensor, so blurring into it below leaves the caller's intact.
        images = torch.where(gamma == 1.0, images, ((images - low) / (span + _GAMMA_EPSILON)) ** gamma * span + low)
        blurred = [index for index, draw in enumerate(draws) if draw.blur_sigma is not None]
        if blurred:
            images[blurred] = gaussian_blur(images[blurred], [draws[index].blur_sigma for index in blurred])
        if self.params.noise_std == 0:
            return images
        # Each slice's noise is keyed by its own draw's seed: the same alone or in any batch, on any device.
        seeds = torch.tensor([draw.noise_seed for draw in draws], dtype=torch.int64, device=images.device)
        pixels = torch.arange(images[0].numel(), device=images.device)
        noise = keyed_normal(seeds.unsqueeze(1), _NOISE_STREAM, pixels, dtype=images.dtype).view(images.shape)
        return images + self.params.noise_std * noise


def gaussian_blur(images: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """MONAI GaussianSmooth's filter (`gaussian_1d`, "erf", truncated at 4 sigma, zero padding), each
    slice with its own sigma, in two grouped convolutions for the whole batch.

    Shape: images (B, 1, H, W), one sigma per slice -> (B, 1, H, W).
    """
    kernels = [gaussian_1d(torch.tensor(float(sigma)), truncated=4.0, approx="erf") for sigma in sigmas]
    tail = max(len(kernel) for kernel in kernels) // 2
    # Shorter kernels are padded with zeros to the longest, which adds only zero terms.
    weights = torch.stack([F.pad(kernel, (tail - len(kernel) // 2,) * 2) for kernel in kernels]).to(images)
    channels = images.reshape(1, len(kernels), *images.shape[-2:])  # one channel per slice
    rows = F.conv2d(F.pad(channels, (0, 0, tail, tail)), weights.view(-1, 1, 2 * tail + 1, 1), groups=len(kernels))
    both = F.conv2d(F.pad(rows, (tail, tail, 0, 0)), weights.view(-1, 1, 1, 2 * tail + 1), groups=len(kernels))
    return both.view(images.shape)


def _to_device(array: np.ndarray, dtype: type, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)).to(device, non_blocking=True)
