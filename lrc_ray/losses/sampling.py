"""Region and pixel sampling for the contrastive sampling loss (LRC_METHOD section 5).

Per image, among the super-pixel regions visible in BOTH views, draw S regions uniformly
without replacement (all of them when fewer than S are shared); for each drawn region and
each view draw M pixels of that region uniformly with replacement. The loss then only
ever sees these B * 2*S*M sampled embeddings, never the whole feature map, so its cost
does not depend on the image size.

Everything is vectorised over the batch with tensor ops (no Python loop over images,
regions or pixels):

- regions: every (image, region id) gets a uniform random key; ids not shared by both
  views get key -1; the top-S keys per image are a uniform random subset of the shared ids.
- pixels: the valid pixels of a view are sorted by (image, region id), so each region's
  pixels are one contiguous run; a uniform draw j in [0, count) picks run start + j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RegionSamples", "gather_embeddings", "sample_region_pixels"]


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
    generator: torch.Generator | None = None,
) -> RegionSamples:
    """Draw S shared regions per image and M pixels per region and view.

    Shape: region maps are integer tensors (B, H1, W1) and (B, H2, W2) (the views may differ
    in size); ids >= 0 are super-pixel regions (the same id in both views is the same
    region), any negative id (-1 by convention) is ignored. Returns a `RegionSamples` with
    indices (B, S*M) per view and region ids (B, 2*S*M).

    Randomness comes only from `generator` (on the maps' device), so a seeded generator
    gives reproducible samples. Memory is O(B * (max id + 1) + B * H * W): ids are expected
    to be relabelled 0..R-1 per slice, as the super-pixel stage does.

    Raises ValueError when S or M is below 1, a map is not a 3-D integer tensor, or the
    batch sizes of the two views differ.
    """
    for name, value in (("regions_per_image", regions_per_image), ("pixels_per_region", pixels_per_region)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name, region_map in (("region_maps_view1", region_maps_view1), ("region_maps_view2", region_maps_view2)):
        if region_map.ndim != 3 or region_map.dtype.is_floating_point or region_map.dtype == torch.bool:
            raise ValueError(
                f"{name} must be an integer tensor of shape (B, H, W), got {tuple(region_map.shape)} {region_map.dtype}"
            )
    if region_maps_view1.shape[0] != region_maps_view2.shape[0]:
        raise ValueError(
            "the two views have different batch sizes: "
            f"{tuple(region_maps_view1.shape)} vs {tuple(region_maps_view2.shape)}"
        )

    maps = (region_maps_view1.long(), region_maps_view2.long())
    num_ids = max([-1] + [int(region_map.max()) for region_map in maps if region_map.numel()]) + 1

    counts = [_region_pixel_counts(region_map, num_ids) for region_map in maps]
    slot_ids = _draw_shared_regions(counts[0] > 0, counts[1] > 0, regions_per_image, generator)
    view_indices = [
        _draw_pixels(region_map, count, slot_ids, pixels_per_region, generator)
        for region_map, count in zip(maps, counts)
    ]
    sample_ids = slot_ids.repeat_interleave(pixels_per_region, dim=1)
    return RegionSamples(
        view1_index=view_indices[0],
        view2_index=view_indices[1],
        region_ids=torch.cat([sample_ids, sample_ids], dim=1),
    )


def _region_pixel_counts(region_map: Tensor, num_ids: int) -> Tensor:
    """Pixels per (image, region id). Shape: (B, H, W) -> (B, num_ids) long."""
    batch = region_map.shape[0]
    flat = region_map.reshape(batch, -1)
    counts = torch.zeros(batch, num_ids + 1, dtype=torch.long, device=region_map.device)
    # Ignored pixels (negative ids) are counted in a spare last column, then dropped.
    column = torch.where(flat >= 0, flat, num_ids)
    counts.scatter_add_(1, column, torch.ones_like(column))
    return counts[:, :num_ids]


def _draw_shared_regions(
    visible_view1: Tensor, visible_view2: Tensor, regions_per_image: int, generator: torch.Generator | None
) -> Tensor:
    """Uniform subset (without replacement) of the ids visible in both views.

    Shape: visibility masks (B, N) bool -> region id per slot (B, S), -1 for padded slots.
    """
    shared = visible_view1 & visible_view2
    batch, num_ids = shared.shape
    keys = torch.rand(batch, num_ids, generator=generator, device=shared.device)
    keys = torch.where(shared, keys, torch.full_like(keys, -1.0))
    num_drawn = min(regions_per_image, num_ids)
    top_keys, top_ids = keys.topk(num_drawn, dim=1)
    slot_ids = torch.full((batch, regions_per_image), -1, dtype=torch.long, device=shared.device)
    slot_ids[:, :num_drawn] = torch.where(top_keys >= 0, top_ids, torch.full_like(top_ids, -1))
    return slot_ids


def _draw_pixels(
    region_map: Tensor, counts: Tensor, slot_ids: Tensor, pixels_per_region: int, generator: torch.Generator | None
) -> Tensor:
    """M pixels per slot, uniform with replacement within the slot's region.

    Shape: region_map (B, H, W), counts (B, N), slot_ids (B, S) -> flat indices (B, S*M);
    padded slots (id -1) get index 0.
    """
    batch, num_ids = counts.shape
    if num_ids == 0:  # no region in any image: every slot is padding
        return torch.zeros(batch, slot_ids.shape[1] * pixels_per_region, dtype=torch.long, device=region_map.device)
    pixels_per_image = region_map.shape[1] * region_map.shape[2]
    flat = region_map.reshape(-1)
    image_of_pixel = torch.arange(batch, device=flat.device).repeat_interleave(pixels_per_image)
    # Sort key (image, id); ignored pixels go past the end of every run.
    sort_key = torch.where(flat >= 0, image_of_pixel * num_ids + flat, batch * num_ids)
    pixels_by_region = sort_key.argsort(stable=True)
    flat_counts = counts.reshape(-1)
    run_starts = torch.cumsum(flat_counts, 0) - flat_counts

    valid_slot = slot_ids >= 0
    run = torch.arange(batch, device=flat.device).unsqueeze(1) * num_ids + slot_ids.clamp(min=0)
    run_length = flat_counts[run].unsqueeze(-1)  # (B, S, 1)
    uniform = torch.rand(
        (*slot_ids.shape, pixels_per_region), generator=generator, device=flat.device, dtype=torch.float64
    )
    # floor(u * n) is uniform on 0..n-1; the clamp guards the rounding edge u * n == n.
    offset = torch.minimum((uniform * run_length).long(), (run_length - 1).clamp(min=0))
    position = pixels_by_region[(run_starts[run].unsqueeze(-1) + offset).clamp(max=flat.numel() - 1)]
    index = position - torch.arange(batch, device=flat.device).view(batch, 1, 1) * pixels_per_image
    index = torch.where(valid_slot.unsqueeze(-1), index, torch.zeros_like(index))
    return index.reshape(batch, -1)
