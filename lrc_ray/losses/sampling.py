"""Region and pixel sampling for the contrastive sampling loss (LRC_METHOD section 5).

Per image, among the super-pixel regions visible in BOTH views, draw S regions uniformly
without replacement (all of them when fewer than S are shared); for each drawn region and
each view draw M pixels of that region uniformly without replacement where the region has
at least M pixels in that view (a pixel paired with itself would be a trivially identical
positive); a region of n < M pixels gives each of its pixels floor(M/n) or ceil(M/n) times. The loss then only ever sees these B * 2*S*M
sampled embeddings, never the whole feature map, so its cost does not depend on the image
size.

Every random number is keyed by the image's seed (`lrc_ray.keyed_random`), so an image's
samples depend on its region maps and its seed alone: the same in any batch, split over any
number of data-parallel workers, on any device. Everything is vectorised over the batch with
tensor ops (no Python loop over images, regions or pixels):

- regions: every (image, region id) gets a uniform random key; ids not shared by both
  views get key -1; the top-S keys per image are a uniform random subset of the shared ids.
- pixels: every pixel of a drawn region gets a uniform random key; a region's M pixels of
  smallest key are a uniform random M-subset of it. Only the few pixels whose key falls
  below a per-region threshold, set so that about 2M + 4 sqrt(M) + 10 of them pass, are
  sorted (sorting all B*H*W pixels costs 1-5 ms a 256 x 256 slice on a CPU core). Where
  fewer than M passed although the region has M pixels (about once in 10^6 regions), the
  batch is drawn again with every pixel of the drawn regions kept, so the draw stays exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lrc_ray.keyed_random import keyed_uniform

__all__ = ["RegionSamples", "gather_embeddings", "sample_region_pixels"]

# Streams of an image's keyed random numbers: region keys; pixel keys per view.
_REGION_STREAM, _PIXEL_STREAMS = 0, (1, 2)


@dataclass(frozen=True)
class RegionSamples:
    """Sampled pixel positions in two views of each image, with their region ids.

    With S = regions_per_image and M = pixels_per_region:

    - `view1_index`, `view2_index`: long, Shape: (B, S*M). Flat pixel indices h*W + w into
      each view's (H, W) grid, slot-major: samples s*M .. s*M+M-1 belong to the s-th drawn
      region. Padded slots (an image with fewer than S shared regions) hold index 0.
    - `region_ids`: long, Shape: (B, 2*S*M). Region id of every sample in the order
      [view1 samples, view2 samples], the order `gather` returns embeddings in; -1 marks
      padded slots, which the contrastive sampling loss ignores.
    """

    view1_index: Tensor
    view2_index: Tensor
    region_ids: Tensor

    def gather(self, features_view1: Tensor, features_view2: Tensor) -> Tensor:
        """Embeddings of all samples, in the order of `region_ids`.

        Shape: features (B, D, H, W) per view (H, W may differ between views) -> (B, 2*S*M, D).
        Raises ValueError on shape mismatches (see `gather_embeddings`).
        """
        return torch.cat(
            [gather_embeddings(features_view1, self.view1_index), gather_embeddings(features_view2, self.view2_index)],
            dim=1,
        )


def gather_embeddings(feature_map: Tensor, flat_index: Tensor) -> Tensor:
    """Pick per-pixel feature vectors by flat pixel index.

    Shape: feature_map (B, D, H, W), flat_index (B, K) integer in [0, H*W) -> (B, K, D).
    Raises ValueError when feature_map is not 4-D, flat_index is not 2-D and integer, or the
    batch sizes differ. Indices out of range raise in `torch.gather` itself (not checked here,
    which would force a device sync on GPU).
    """
    if feature_map.ndim != 4:
        raise ValueError(f"feature_map must have shape (B, D, H, W), got {tuple(feature_map.shape)}")
    if flat_index.ndim != 2 or flat_index.dtype.is_floating_point or flat_index.dtype == torch.bool:
        raise ValueError(
            f"flat_index must be an integer tensor of shape (B, K), got {tuple(flat_index.shape)} {flat_index.dtype}"
        )
    if flat_index.shape[0] != feature_map.shape[0]:
        raise ValueError(
            f"batch sizes differ: feature_map {tuple(feature_map.shape)} vs flat_index {tuple(flat_index.shape)}"
        )
    batch, dim = feature_map.shape[:2]
    flat_features = feature_map.reshape(batch, dim, -1)
    index = flat_index.long().unsqueeze(1).expand(batch, dim, flat_index.shape[1])
    return flat_features.gather(2, index).transpose(1, 2)


def sample_region_pixels(
    region_maps_view1: Tensor,
    region_maps_view2: Tensor,
    *,
    regions_per_image: int,
    pixels_per_region: int,
    seeds: Tensor,
    num_ids: int | None = None,
) -> RegionSamples:
    """Draw S shared regions per image and M pixels per region and view.

    Shape: region maps are integer tensors (B, H1, W1) and (B, H2, W2) (the views may differ
    in size); ids >= 0 are super-pixel regions (the same id in both views is the same
    region), -1 marks ignored pixels (no other negative id is allowed). Returns a `RegionSamples` with
    indices (B, S*M) per view and region ids (B, 2*S*M).

    Randomness comes only from `seeds` (int64, shape (B,), one per image, on the maps' device):
    image b's samples are a function of its two maps and seeds[b]. Memory is O(B * num_ids + B * H * W): ids are expected to be
    relabelled 0..R-1 per slice, as the super-pixel stage does. `num_ids` (more than the
    largest id, e.g. the largest region count of the batch's slices) spares a read of the
    maps' maximum, which on a GPU waits for everything queued before it.

    Raises ValueError when S or M is below 1, a map is not a 3-D integer tensor, or the
    batch sizes of the two views (and of the seeds) differ.
    """
    for name, value in (("regions_per_image", regions_per_image), ("pixels_per_region", pixels_per_region)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name, region_map in (("region_maps_view1", region_maps_view1), ("region_maps_view2", region_maps_view2)):
        if region_map.ndim != 3 or region_map.dtype.is_floating_point or region_map.dtype == torch.bool:
            raise ValueError(
                f"{name} must be an integer tensor of shape (B, H, W), got {tuple(region_map.shape)} {region_map.dtype}"
            )
    if not region_maps_view1.shape[0] == region_maps_view2.shape[0] == seeds.shape[0] or seeds.ndim != 1:
        raise ValueError(
            "the two views and the seeds have different batch sizes: "
            f"{tuple(region_maps_view1.shape)} vs {tuple(region_maps_view2.shape)} vs seeds {tuple(seeds.shape)}"
        )
    seeds = seeds.to(torch.int64)
    maps = (region_maps_view1, region_maps_view2)
    if num_ids is None:
        num_ids = max([-1] + [int(region_map.max()) for region_map in maps if region_map.numel()]) + 1
    # Bin 0 of each image holds its ignored pixels; id r goes to bin r + 1. Views that are one map
    # (no augmentation) share their bins, counts and candidate pixels, and draw only their own pixels.
    bins = [_pixel_bins(region_maps_view1, num_ids)]
    counts = [_bin_counts(bins[0], region_maps_view1.shape[0], num_ids)]
    if region_maps_view2 is region_maps_view1:
        bins, counts = bins * 2, counts * 2
    else:
        bins.append(_pixel_bins(region_maps_view2, num_ids))
        counts.append(_bin_counts(bins[1], region_maps_view2.shape[0], num_ids))
    slot_ids = _draw_shared_regions(counts[0][:, 1:] > 0, counts[1][:, 1:] > 0, regions_per_image, seeds)
    candidates = [_drawn_region_pixels(bins[0], counts[0], slot_ids)]
    candidates.append(candidates[0] if bins[1] is bins[0] else _drawn_region_pixels(bins[1], counts[1], slot_ids))
    view_indices = [
        _draw_pixels(pixels, pixels_per_region, seeds, view) for view, pixels in enumerate(candidates)
    ]
    sample_ids = slot_ids.repeat_interleave(pixels_per_region, dim=1)
    return RegionSamples(
        view1_index=view_indices[0],
        view2_index=view_indices[1],
        region_ids=torch.cat([sample_ids, sample_ids], dim=1),
    )


def _pixel_bins(region_map: Tensor, num_ids: int) -> Tensor:
    """Each pixel's (image, region) bin, image b's bins being b*(num_ids+1) .. +num_ids, its
    ignored pixels in the first. Shape: (B, H, W) -> (B, H*W) int32 (int64 past 2**31 bins)."""
    batch = region_map.shape[0]
    dtype = torch.int32 if batch * (num_ids + 1) < 2**31 else torch.int64
    first_bin = torch.arange(batch, device=region_map.device, dtype=dtype).unsqueeze(1) * (num_ids + 1) + 1
    return torch.add(first_bin, region_map.reshape(batch, -1))


def _bin_counts(pixel_bins: Tensor, batch: int, num_ids: int) -> Tensor:
    """Pixels per (image, bin): column 0 the ignored ones, column r + 1 region r's.
    Shape: (B, P) bins -> (B, num_ids + 1) long."""
    return _count(pixel_bins.reshape(-1), batch * (num_ids + 1)).view(batch, num_ids + 1)


def _draw_shared_regions(
    visible_view1: Tensor, visible_view2: Tensor, regions_per_image: int, seeds: Tensor
) -> Tensor:
    """Uniform subset (without replacement) of the ids visible in both views.

    Shape: visibility masks (B, N) bool -> region id per slot (B, S), -1 for padded slots.
    """
    shared = visible_view1 & visible_view2
    batch, num_ids = shared.shape
    keys = keyed_uniform(seeds.unsqueeze(1), _REGION_STREAM, torch.arange(num_ids, device=shared.device))
    keys = torch.where(shared, keys, torch.full_like(keys, -1.0))
    num_drawn = min(regions_per_image, num_ids)
    top_keys, top_ids = keys.topk(num_drawn, dim=1)
    slot_ids = torch.full((batch, regions_per_image), -1, dtype=torch.long, device=shared.device)
    slot_ids[:, :num_drawn] = torch.where(top_keys >= 0, top_ids, torch.full_like(top_ids, -1))
    return slot_ids


# A drawn region keeps its pixels of key below (2M + 4 sqrt(M) + 10) / n: M + 4 standard deviations
# and more pass on average, so fewer than M pass in about one region in 10**6.
def _key_threshold(pixels_per_region: int, region_pixels: Tensor) -> Tensor:
    kept_on_average = 2 * pixels_per_region + 4 * math.sqrt(pixels_per_region) + 10
    return (kept_on_average / region_pixels.clamp(min=1).double()).clamp(max=1.0)


@dataclass(frozen=True)
class _RegionPixels:
    """The pixels of one view that lie in a drawn region: the candidates of its pixel draw."""

    flat_index: Tensor  # (K,) flat index b*P + p into the view's (B, P) pixels
    image: Tensor  # (K,) its image b
    slot: Tensor  # (K,) its slot b*S + s
    region_pixels: Tensor  # (B, S) pixels of each slot's region in the view; 0 for padded slots
    valid_slot: Tensor  # (B, S) bool: the slot holds a region
    num_pixels: int  # P


def _drawn_region_pixels(pixel_bins: Tensor, counts: Tensor, slot_ids: Tensor) -> _RegionPixels:
    """Shape: pixel_bins (B, P) and counts (B, N + 1) from `_pixel_bins` and `_bin_counts`, slot_ids (B, S)."""
    batch, num_pixels = pixel_bins.shape
    slots = slot_ids.shape[1]
    device = pixel_bins.device
    valid_slot = slot_ids >= 0
    drawn_bins = torch.where(valid_slot, slot_ids + 1, 0)
    region_pixels = torch.where(valid_slot, counts.gather(1, drawn_bins), 0)  # (B, S)
    # Slot of every bin, and whether it was drawn: a pixel's is one lookup of its bin.
    slot_of_bin = torch.zeros(counts.shape, dtype=torch.long, device=device)
    slot_of_bin.scatter_(1, drawn_bins, torch.arange(slots, device=device).expand(batch, -1))
    drawn = torch.zeros(counts.shape, dtype=torch.bool, device=device)
    drawn.scatter_(1, drawn_bins, True)
    drawn[:, 0] = False  # ignored pixels, and padded slots pointed at bin 0
    in_drawn_region = _flat_nonzero(drawn.view(-1).index_select(0, pixel_bins.reshape(-1)))
    image = in_drawn_region // num_pixels
    candidate_bins = pixel_bins.reshape(-1)[in_drawn_region].long()
    slot = slot_of_bin.view(-1)[candidate_bins] + image * slots  # image * S + slot
    return _RegionPixels(in_drawn_region, image, slot, region_pixels, valid_slot, num_pixels)


def _draw_pixels(pixels: _RegionPixels, pixels_per_region: int, seeds: Tensor, view: int) -> Tensor:
    """M pixels per slot within the slot's region: without replacement where it has >= M pixels,
    else each of its n pixels floor(M/n) or ceil(M/n) times.

    Shape: the candidates of (B, S) slots -> flat pixel indices (B, S*M); padded slots get index 0.
    """
    batch, slots = pixels.region_pixels.shape
    device = pixels.flat_index.device
    region_pixels, candidate_slot = pixels.region_pixels, pixels.slot
    keys = keyed_uniform(seeds[pixels.image], _PIXEL_STREAMS[view], pixels.flat_index - pixels.image * pixels.num_pixels)
    for threshold in (_key_threshold(pixels_per_region, region_pixels), torch.ones_like(region_pixels, dtype=torch.float64)):
        kept = _flat_nonzero(keys < threshold.view(-1)[candidate_slot])
        kept_slot = candidate_slot[kept]
        kept_per_slot = _count(kept_slot, batch * slots)
        if not bool((kept_per_slot.view(batch, slots) < region_pixels.clamp(max=pixels_per_region)).any()):
            break
    # Sorted by (slot, key), each slot's kept pixels are a run in random order.
    order = kept[(kept_slot.double() + keys[kept]).argsort()]
    run_start = (kept_per_slot.cumsum(0) - kept_per_slot).view(batch, slots, 1)
    # The run's first M pixels; a region of n < M pixels cycles through its (randomly ordered) run,
    # so each pixel comes floor(M/n) or ceil(M/n) times.
    first_m = torch.arange(pixels_per_region, device=device).view(1, 1, -1)
    offset = first_m % region_pixels.clamp(min=1).unsqueeze(-1)
    position = (run_start + offset).clamp(max=max(order.numel() - 1, 0))
    flat_pixel = pixels.flat_index[order[position]] if order.numel() else torch.zeros_like(position)
    index = flat_pixel - torch.arange(batch, device=device).view(batch, 1, 1) * pixels.num_pixels
    return torch.where(pixels.valid_slot.unsqueeze(-1), index, torch.zeros_like(index)).reshape(batch, -1)


# Two primitives differ in speed by device.
def _count(values: Tensor, length: int) -> Tensor:
    """How often each of 0..length-1 occurs in a 1-D integer tensor, int64. On a CPU `bincount`
    (1.5x faster than scatter_add, and it takes int32); on a GPU scatter_add, since CUDA's
    bincount reads the maximum back to the host, stalling the queue."""
    if values.device.type == "cpu":
        return torch.bincount(values, minlength=length)
    counts = torch.zeros(length, dtype=torch.long, device=values.device)
    return counts.scatter_add_(0, values.long(), torch.ones_like(values, dtype=torch.long))


def _flat_nonzero(mask: Tensor) -> Tensor:
    """Indices of the True entries of a 1-D mask, int64. On a CPU numpy's is about 4x faster than
    torch's single-threaded `nonzero` (0.04 against 0.19 ms for a 256 x 256 mask, measured)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().squeeze(1)
