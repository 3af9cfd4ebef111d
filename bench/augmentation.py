"""Two-view augmentation: item by item vs one batched pass, slices/s, side by side in one run.

The same cached super-pixel slices and the same draws, three ways (rounds interleaved, best of
the rounds; machines here are noisy):
- items: `dataset[i]` one slice at a time, then collated, on the CPU (how a DataLoader fetched a
  batch before `__getitems__`, and how a Train worker augmented before the batched pass);
- batched CPU: `dataset.augmented_batch(indices)`, one batched `grid_sample` per view;
- batched GPU (when CUDA is there): the same on the GPU, the raw slices copied over first,
  synchronised before the clock stops.
Each at one torch thread (a Ray Train worker owns one CPU), at each `--sizes` (64: quickstart,
256: full.yaml). The views are equal however they are made (tests/data show it).

    .venv/bin/python bench/augmentation.py [--sizes 64 256] [--batch-size 16] [--batches 8]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate

from lrc_ray import api
from lrc_ray.augment import TwoViewAugment
from lrc_ray.config import RunConfig
from lrc_ray.data.superpixel_dataset import TwoViewSliceDataset
from lrc_ray.distributed.runtime import ray_session
from lrc_ray.superpixels.cache import read_parquet_dir


def cached_dataset(config: RunConfig, rows: int | None = None) -> TwoViewSliceDataset:
    """The cached slices of `config.data` (its entry built already), the first `rows` of them, as a
    two-view data set at seed 0."""
    table = read_parquet_dir(Path(api.find_superpixels(config.data).path))
    table = table if rows is None else table.slice(0, rows)
    return TwoViewSliceDataset(table, TwoViewAugment(config.augment, output_size=config.data.size), seed=0)


def item_by_item(dataset: TwoViewSliceDataset, indices: list[int]) -> dict[str, torch.Tensor]:
    """A batch as a DataLoader fetched it before `__getitems__`: each slice augmented alone, then
    collated."""
    return default_collate([dataset[i] for i in indices])


def slices_per_second(augment_batch, batches: list[list[int]]) -> float:
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    augment_batch(batches[0])  # warm-up
    synchronize()
    started = time.perf_counter()
    for indices in batches:
        augment_batch(indices)
    synchronize()
    return sum(len(indices) for indices in batches) / (time.perf_counter() - started)


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

    ways = {
        "items": item_by_item,
        "batched CPU": lambda dataset, indices: dataset.augmented_batch(indices),
    }
    if torch.cuda.is_available():
        ways["batched GPU"] = lambda dataset, indices: dataset.augmented_batch(indices, device="cuda")
    with ray_session(num_cpus=2):
        for size in args.sizes:
            data_dir = api.make_synthetic_data(out=workdir / f"data{size}", cases=4, unlabeled=2, size=size,
                                               slices=24, seed=0)
            config = RunConfig().replace(data={"data_dir": str(data_dir), "cache_root": str(workdir / "cache"),
                                               "size": size})
            api.superpixels_for(config.data)
            dataset = cached_dataset(config)
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
            batches = [order[start : start + args.batch_size]
                       for start in range(0, len(order) - args.batch_size + 1, args.batch_size)][: args.batches]
            best = {name: 0.0 for name in ways}
            for _ in range(args.rounds):
                for name, way in ways.items():
                    rate = slices_per_second(lambda indices: way(dataset, indices), batches)
                    best[name] = max(best[name], rate)
            line = ", ".join(f"{name} {rate:.0f}" for name, rate in best.items())
            ratios = ", ".join(f"{name}/items {rate / best['items']:.2f}" for name, rate in best.items() if name != "items")
            print(f"{size} x {size}, batch {args.batch_size}, slices/s (best of {args.rounds}): {line}; {ratios}",
                  flush=True)


if __name__ == "__main__":
    main()
