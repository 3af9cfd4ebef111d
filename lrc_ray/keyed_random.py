"""Random numbers that are a function of (seed, stream, counter) alone: counter-based, in tensor ops.

A slice's random draws (the pixels the loss samples, the noise added to a view) then depend on
that slice's seed only, not on which other slices share its batch, how a batch is split over
data-parallel workers, or the device: a worker with batch B on each of 2 ranks draws exactly
what one worker with batch 2B draws. A `torch.Generator` gives one stream for a whole batch,
so the same slice drew differently in each of those cases (and a generator per slice would be
a Python loop of small kernels per batch).

The mixing function is SplitMix64's finaliser (Steele, Lea and Flood 2014, the generator that
seeds xoshiro), computed in int64 with wrap-around multiplication; the shifts are logical,
emulated by masking the arithmetic shift's sign extension.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["keyed_normal", "keyed_uniform", "mix64"]

_GOLDEN = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15 as a signed int64
_MULTIPLIER_1 = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9
_MULTIPLIER_2 = -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 values (torch's `>>` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: Tensor) -> Tensor:
    """SplitMix64's finaliser: a bijection of int64 whose outputs look independent for nearby inputs."""
    x = (x ^ _shift_right(x, 30)) * _MULTIPLIER_1
    x = (x ^ _shift_right(x, 27)) * _MULTIPLIER_2
    return x ^ _shift_right(x, 31)


def keyed_uniform(seeds: Tensor, stream: int, counters: Tensor) -> Tensor:
    """Uniform float64 in [0, 1), one per counter: the `counters`-th numbers of stream `stream` of each seed.

    Shape: seeds and counters int64, broadcast together (e.g. seeds (B, 1), counters (B, K) or (K,))
    -> their broadcast shape. Equal (seed, stream, counter) give equal numbers on any device.
    """
    key = mix64(seeds * _GOLDEN + stream)
    bits = mix64(key + counters * _GOLDEN)
    return _shift_right(bits, 11).double() * 2.0**-53  # the top 53 bits: every double in [0, 1) on the grid


def keyed_normal(seeds: Tensor, stream: int, counters: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal numbers, one per counter, by Box-Muller from two keyed uniforms. Shapes as
    `keyed_uniform`."""
    radius = torch.sqrt(-2.0 * torch.log1p(-keyed_uniform(seeds, stream, 2 * counters)))  # log(1 - u): u may be 0
    angle = (2.0 * math.pi) * keyed_uniform(seeds, stream, 2 * counters + 1)
    return (radius * torch.cos(angle)).to(dtype)
