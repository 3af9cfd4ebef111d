"""Ray Train overhead: pre-training steps/s of TorchTrainer with 1 worker vs the plain loop.

Both run the same config on the same cached super-pixels, side by side in one run (rounds
interleaved; machines here are noisy), each with one torch thread (a Ray Train worker owns
one CPU). Printed per round and as the best of the rounds:
- steady-state steps/s: steps / seconds of the epochs after the first (the Train worker
  streams its shard from Parquet through Ray Data and augments in the worker);
- end-to-end: steps / wall seconds of the whole call, including Ray Train's start-up.
Target: Train / plain >= 0.9 in steady state. Ray itself is started once (a running cluster).

    .venv/bin/python bench/train_overhead.py [--epochs 4] [--rounds 2] [--size 64]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from lrc_ray import api
from lrc_ray.config import RunConfig
from lrc_ray.distributed.runtime import ray_session
from lrc_ray.engine.checkpoint import load_checkpoint


def steady_rate(history: list[dict]) -> float:
    later = history[1:] or history
    return sum(entry["steps"] for entry in later) / sum(entry["seconds"] for entry in later)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--slices", type=int, default=24)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    workdir = Path(tempfile.mkdtemp(prefix="lrc_train_bench_"))
    data_dir = api.make_synthetic_data(out=workdir / "data", cases=args.cases, unlabeled=4, size=args.size,
                                       slices=args.slices, seed=0)
    config = RunConfig().replace(
        data={"data_dir": str(data_dir), "cache_root": str(workdir / "cache"), "size": args.size},
        pretrain={"method": "global+lrc", "epochs": args.epochs, "batch_size": 16, "queue_size": 256},
    )
    rows = []
    with ray_session(num_cpus=2):
        api.superpixels_for(config.data)
        for round_index in range(args.rounds):
            for runner in ("plain", "train"):
                out = workdir / f"{runner}-{round_index}"
                started = time.perf_counter()
                checkpoint = api.pretrain(config=config, out_dir=out, workers=0 if runner == "plain" else 1,
                                          progress=False)
                wall = time.perf_counter() - started
                history = load_checkpoint(checkpoint)["history"]
                steps = sum(entry["steps"] for entry in history)
                rows.append((round_index, runner, steady_rate(history), steps / wall, wall))
                print(f"round {round_index} {runner:>5}: steady {rows[-1][2]:.2f} steps/s, "
                      f"end-to-end {rows[-1][3]:.2f} steps/s ({wall:.1f} s, {steps} steps)", flush=True)

    def best(runner: str, column: int) -> float:
        return max(row[column] for row in rows if row[1] == runner)

    print(f"\n{args.epochs} epochs of global+lrc at {args.size}x{args.size}, batch 16, 1 torch thread each")
    print(f"steady state: plain {best('plain', 2):.2f} steps/s, Ray Train {best('train', 2):.2f} steps/s, "
          f"ratio Train/plain {best('train', 2) / best('plain', 2):.2f} (target >= 0.9)")
    print(f"end to end:   plain {best('plain', 3):.2f} steps/s, Ray Train {best('train', 3):.2f} steps/s, "
          f"ratio Train/plain {best('train', 3) / best('plain', 3):.2f} (includes Ray Train start-up)")


if __name__ == "__main__":
    main()
