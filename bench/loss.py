"""Benchmark of the contrastive sampling loss (CPU): speed and memory.

Run: .venv/bin/python bench/loss.py   (about a minute on 2 cores)

1. Forward+backward time of the vectorised `contrastive_sampling_loss` against a naive loop
   over anchors at B=16, S=32, M=16 (K = 2*S*M = 1024), D=128.
2. Peak memory of the vectorised loss as B and K vary: it should scale with B*K^2.
3. Sampling + gather + loss as the image grows with B, S, M fixed: the loss only sees the
   B*K sampled embeddings, so its memory must not change with H*W. The sampling's own time
   (O(B*H*W): a permutation and a sort of the pixels) is printed beside the loss's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from lrc_ray.losses import contrastive_sampling_loss, sample_region_pixels

TEMPERATURE = 0.1
DIM = 128


def naive_loss(embeddings: torch.Tensor, region_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Section 6 with a Python loop over anchors, each anchor vectorised over its image's samples.

    A fair baseline: it works on per-image views (`unbind`), so each anchor's backward
    touches only its image's (K, D) block.
    """
    terms = []
    for z, image_region_ids, image_ids in zip(
        F.normalize(embeddings, dim=-1).unbind(0), region_ids, region_ids.tolist()
    ):
        valid = image_region_ids >= 0
        for anchor, anchor_id in enumerate(image_ids):
            if anchor_id < 0 or image_ids.count(anchor_id) < 2:
                continue
            others = valid.clone()
            others[anchor] = False
            positive = others & (image_region_ids == anchor_id)
            logits = z @ z[anchor] / temperature
            terms.append(torch.logsumexp(logits[others], dim=0) - logits[positive].mean())
    return torch.stack(terms).mean()


def sampled_inputs(batch: int, num_samples: int, regions: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, num_samples, DIM, generator=generator)
    region_ids = torch.arange(regions).repeat_interleave(num_samples // regions).expand(batch, -1).contiguous()
    return embeddings, region_ids


def median_seconds(step: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of `step` over `repeats` calls (after one warm-up call), and what the last call returned."""
    result = step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def forward_backward(loss_fn, embeddings: torch.Tensor, region_ids: torch.Tensor) -> Callable[[], float]:
    """One forward+backward of `loss_fn` from a fresh leaf; the step returns the loss."""

    def step() -> float:
        leaf = embeddings.detach().requires_grad_()
        loss = loss_fn(leaf, region_ids, TEMPERATURE)
        loss.backward()
        return loss.item()

    return step


def peak_bytes(step: Callable[[], None]) -> int:
    """Peak of live CPU tensor bytes allocated inside `step`, at operator boundaries.

    From torch.profiler(profile_memory=True): every operator's net allocation (self, without
    children) is accumulated in start order; the maximum of the running sum is the peak.
    Allocations made and freed inside one operator are not seen, so this is a lower bound
    on the allocator's true peak, but it counts every tensor that outlives an operator,
    including the ones autograd saves for backward.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda event: event.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def saved_for_backward_bytes(step: Callable[[], None]) -> int:
    """Bytes of distinct tensors autograd keeps for backward (hooked while `step` runs)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


def mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:8.1f}"


def time_against_naive() -> None:
    batch, regions, pixels, naive_images = 16, 32, 16, 4
    num_samples = 2 * regions * pixels
    embeddings, region_ids = sampled_inputs(batch, num_samples, regions)
    vectorised_s, vectorised_loss = median_seconds(forward_backward(contrastive_sampling_loss, embeddings, region_ids),
                                                  repeats=5)
    # The naive loop runs one iteration per anchor, so its time is linear in the number of
    # images (all images here have the same layout): it is timed on a few and scaled, which
    # keeps the bench short.
    subset = embeddings[:naive_images], region_ids[:naive_images]
    naive_subset_s, naive_value = median_seconds(forward_backward(naive_loss, *subset), repeats=2)
    naive_s = naive_subset_s * batch / naive_images
    subset_value = contrastive_sampling_loss(*subset, TEMPERATURE).item()
    print(f"1. forward+backward, B={batch} S={regions} M={pixels} K={num_samples} D={DIM}, "
          f"{torch.get_num_threads()} threads, median")
    print(f"   naive loop timed on {naive_images} of the {batch} images ({naive_subset_s:.2f} s) and scaled "
          f"x{batch // naive_images};")
    print(f"   on those images: loss {naive_value:.6f} (naive) vs {subset_value:.6f} (vectorised)")
    print(f"   {'vectorised (s)':>15} {'naive loop (s)':>15} {'speed-up':>9}")
    print(f"   {vectorised_s:15.3f} {naive_s:15.3f} {naive_s / vectorised_s:8.0f}x")


def memory_against_batch_and_samples() -> None:
    print("\n2. vectorised loss, forward+backward memory (MiB) against B and K, D=128")
    print("   peak: live tensor bytes at operator boundaries (torch.profiler); saved: kept for backward")
    print(f"   {'B':>3} {'K':>5} {'B*K^2 (M)':>10} {'peak':>8} {'saved':>8} {'peak/(B*K^2) bytes':>19}")
    for batch, num_samples in [(4, 256), (16, 256), (4, 512), (16, 512), (4, 1024), (16, 1024)]:
        embeddings, region_ids = sampled_inputs(batch, num_samples, regions=32)
        step = forward_backward(contrastive_sampling_loss, embeddings, region_ids)
        pairs = batch * num_samples**2
        peak = peak_bytes(step)
        saved = saved_for_backward_bytes(step)
        print(f"   {batch:3d} {num_samples:5d} {pairs / 1e6:10.1f} {mib(peak)} {mib(saved)} {peak / pairs:19.1f}")


def memory_against_image_size() -> None:
    batch, regions, pixels = 8, 32, 16
    num_samples = 2 * regions * pixels
    print(f"\n3. sampling + loss as the image grows, B={batch} S={regions} M={pixels} K={num_samples} D={DIM} (MiB)")
    print("   sampling: sample_region_pixels (integer work, O(B*H*W)); loss: forward+backward from the")
    print("   gathered (B, K, D) embeddings; feature map: the network's (B, D, H, W) output, for scale;")
    print("   times: median of 5 runs")
    print(f"   {'H x W':>9} {'sampling':>9} {'loss':>8} {'feature map':>12} {'sampling ms':>12} {'loss ms':>8}")
    for size in (64, 128, 256, 512):
        generator = torch.Generator().manual_seed(0)
        # Square super-pixels of 8x8 pixels; view 2 is a shifted copy of view 1.
        blocks = torch.arange((size // 8) ** 2).reshape(size // 8, size // 8)
        view1 = blocks.repeat_interleave(8, 0).repeat_interleave(8, 1).expand(batch, -1, -1).contiguous()
        view2 = view1.roll(shifts=(5, 3), dims=(1, 2))
        features = torch.randn(batch, DIM, size, size, generator=generator)

        def sample():
            return sample_region_pixels(
                view1, view2, regions_per_image=regions, pixels_per_region=pixels, generator=generator
            )

        samples = sample()
        embeddings = samples.gather(features, features)
        loss_step = forward_backward(contrastive_sampling_loss, embeddings, samples.region_ids)
        sampling_peak = peak_bytes(sample)
        loss_peak = peak_bytes(loss_step)
        sampling_ms, loss_ms = (1000 * median_seconds(step, repeats=5)[0] for step in (sample, loss_step))
        print(f"   {f'{size}x{size}':>9} {mib(sampling_peak):>9} {mib(loss_peak)} {mib(features.nbytes):>12} "
              f"{sampling_ms:12.1f} {loss_ms:8.1f}")


if __name__ == "__main__":
    time_against_naive()
    memory_against_batch_and_samples()
    memory_against_image_size()
