"""Per-trial overhead of a sweep on a running Ray: wall time minus the trials' own compute.

A small grid (3 methods x 2 label fractions, 64 x 64 slices) runs inside a Ray instance started
beforehand, with its super-pixel cache built beforehand, one trial at a time, twice: with
`workers_per_trial: 0` (each trial pre-trains and fine-tunes in its own process: Train's local
mode) and with `workers_per_trial: 1` (a TorchTrainer worker group per pre-training, a Ray task
per fine-tuning). Own compute = the pre-training epochs a trial trained, their probes, and its
fine-tuning with evaluation (what the trials report; imports are not counted). The rest (Tune's
scheduling, trial and worker start-up, Ray Data stream set-up, result handling) divided by the
number of trials is the per-trial overhead. Target: <= 3 s per trial. A second table splits a
finished trial's overhead by stage, from the wall times each trial reports (`wall_seconds/*`);
what is left of the per-trial figure is Tune's and the trial process's own.

    .venv/bin/python bench/sweep_overhead.py
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
from pathlib import Path

from sweep_common import (
    base_config, built_in_data, own_compute_seconds, stage_overheads, timed_sweep, trial_reports, with_sweep_settings,
)

from lrc_ray import api
from lrc_ray.distributed.runtime import ray_session
from lrc_ray.distributed.tune import TRIAL_SLOT
from lrc_ray.search_space import parse_search_space

SPACE = {
    "description": "overhead benchmark: 3 methods x 2 label fractions",
    "data": {"cases": 6, "unlabeled": 2, "slices": 12},
    "base": {"data": {"size": 64}, "pretrain": {"epochs": 2, "batch_size": 16, "queue_size": 128},
             "finetune": {"epochs": 4, "batch_size": 8}},
    "space": {"pretrain.method": {"choice": ["scratch", "global", "lrc"]},
              "finetune.label_fraction": {"choice": [0.5, 1.0]}},
}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="lrc_sweep_overhead_"))
    space = parse_search_space(SPACE, source="bench/sweep_overhead.py")
    base = base_config(space, built_in_data(space, workdir), workdir / "cache")
    rows = []
    with ray_session(num_cpus=2, resources={TRIAL_SLOT: os.cpu_count() or 1}):
        api.superpixels_for(base.data)  # warm cache: the overhead measured is the sweep's own
        for workers in (0, 1):
            space_for = with_sweep_settings(space, workers_per_trial=workers)
            name = f"overhead_{workers}_workers"
            wall = timed_sweep(space_for, base=base, storage=workdir / "sweeps", name=name, search="grid")
            reports = trial_reports(workdir / "sweeps" / name)
            compute = sum(own_compute_seconds(lines) for lines in reports.values())
            stages = [overheads for lines in reports.values() if (overheads := stage_overheads(lines))]
            rows.append((workers, len(reports), wall, compute, stages))
    print("\nworkers_per_trial | trials | sweep wall s | own compute s | per-trial overhead s | overhead share")
    for workers, trials, wall, compute, _ in rows:
        print(f"{workers:>17} | {trials:>6} | {wall:>12.1f} | {compute:>13.1f} | {(wall - compute) / trials:>20.2f} | "
              f"{(wall - compute) / wall:>14.2f}")
    print("target: per-trial overhead <= 3 s")
    print("\nwhere it goes, mean s per finished trial beyond its own compute (super-pixels: reading the warm cache):")
    print("workers_per_trial | finished | super-pixels | pre-training | fine-tuning")
    for workers, _, _, _, stages in rows:
        means = {stage: statistics.fmean(trial[stage] for trial in stages) for stage in stages[0]} if stages else {}
        print(f"{workers:>17} | {len(stages):>8} | " + " | ".join(
            f"{means.get(stage, float('nan')):>{len(header)}.2f}"
            for stage, header in (("superpixels", "super-pixels"), ("pretrain", "pre-training"), ("finetune", "fine-tuning"))))


if __name__ == "__main__":
    main()
