"""Two-view augmentation: slice by slice vs one batched pass, slices/s, side by side in one run.

The same cached super-pixel slices (compact arrays, as pre-training holds them) and the same
draws, three ways (rounds interleaved, best of the rounds; machines here are noisy):
- slice by slice: `TwoViewAugment(...)(image, regions, rng)` on the CPU, one slice at a time
  (how a Train worker augmented before the batched pass);
- batched CPU: `augment_batch` of the whole batch, one batched `grid_sample` per view;
- batched GPU (when CUDA is there): the same on the GPU, the raw slices copied over first,
  synchronised before the clock stops.
Each at one torch thread (a Ray Train worker owns one CPU), at each `--sizes` (64: quickstart,
256: full.yaml). A slice's views are the same however they are made (tests/augment show it).

    .venv/bin/python bench/augmentation.py [--sizes 64 256] [--batch-size 16] [--batches 8]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lrc_ray import api
from lrc_ray.augment import TwoViewAugment
from lrc_ray.config import RunConfig
from lrc_ray.data.shard import compact_slices
from lrc_ray.distributed.runtime import ray_session
from lrc_ray.superpixels.cache import read_entry_table


def slices_per_second(augment_batch, batches: list[np.ndarray]) -> float:
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    augment_batch(batches[0])  # warm-up
    synchronize()
    started = time.perf_counter()
    for rows in batches:
        augment_batch(rows)
    synchronize()
    return sum(len(rows) for rows in batches) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="lrc_augment_bench_"))
    with ray_session(num_cpus=2):
        for size in args.sizes:
            data_dir = api.make_synthetic_data(out=workdir / f"data{size}", cases=4, unlabeled=2, size=size,
                                               slices=24, seed=0)
            config = RunConfig().replace(data={"data_dir": str(data_dir), "cache_root": str(workdir / "cache"),
                                               "size": size})
            arrays = compact_slices(read_entry_table(api.superpixels_for(config.data).entry))
            augment = TwoViewAugment(config.augment, output_size=size)
            order = np.random.default_rng(0).permutation(len(arrays["row_key"]))
            batches = [order[start : start + args.batch_size]
                       for start in range(0, len(order) - args.batch_size + 1, args.batch_size)][: args.batches]

            def draws(rows):
                return [augment.draw((size, size), np.random.default_rng(int(row))) for row in rows]

            def slice_by_slice(rows):
                for row in rows:
                    augment(arrays["image"][row] / np.float32(255.0), arrays["regions"][row],
                            np.random.default_rng(int(row)))

            def batched(device):
                def run(rows):
                    augment.augment_batch(torch.from_numpy(arrays["image"][rows]).to(device),
                                          torch.from_numpy(arrays["regions"][rows]).to(device), draws(rows))
                return run

            ways = {"slice by slice": slice_by_slice, "batched CPU": batched("cpu")}
            if torch.cuda.is_available():
                ways["batched GPU"] = batched("cuda")
            best = {name: 0.0 for name in ways}
            for _ in range(args.rounds):
                for name, way in ways.items():
                    best[name] = max(best[name], slices_per_second(way, batches))
            line = ", ".join(f"{name} {rate:.0f}" for name, rate in best.items())
            first = next(iter(best))
            ratios = ", ".join(f"{name}/{first} {rate / best[first]:.2f}" for name, rate in best.items() if name != first)
            print(f"{size} x {size}, batch {args.batch_size}, slices/s (best of {args.rounds}): {line}; {ratios}",
                  flush=True)


if __name__ == "__main__":
    main()
