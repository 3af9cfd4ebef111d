"""Per-trial overhead of a sweep on a running Ray: wall time minus the trials' own compute.

A small grid (3 methods x 2 label fractions, 64 x 64 slices) runs inside a Ray instance started
beforehand, with its super-pixel cache built beforehand, one trial at a time. Own compute = the
pre-training epochs a trial trained, their probes, and its fine-tuning with evaluation (what
the trials report). The rest (Tune's scheduling, Train worker-group start-up, Ray Data stream
set-up, result handling) divided by the number of trials is the per-trial overhead.
Target: <= 3 s per trial.

    .venv/bin/python bench/sweep_overhead.py
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from sweep_common import base_config, built_in_data, own_compute_seconds, timed_sweep, trial_reports

from lrc_ray import api
from lrc_ray.distributed.runtime import ray_session
from lrc_ray.distributed.tune import TRIAL_SLOT
from lrc_ray.search_space import parse_search_space

SPACE = {
    "description": "overhead benchmark: 3 methods x 2 label fractions",
    "sweep": {"workers_per_trial": 1},
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
    with ray_session(num_cpus=2, resources={TRIAL_SLOT: os.cpu_count() or 1}):
        api.superpixels_for(base.data)  # warm cache: the overhead measured is the sweep's own
        wall = timed_sweep(space, base=base, storage=workdir / "sweeps", name="overhead", search="grid")
    reports = trial_reports(workdir / "sweeps" / "overhead")
    compute = sum(own_compute_seconds(lines) for lines in reports.values())
    trials = len(reports)
    print(f"\n{trials} trials, one at a time: sweep wall {wall:.1f} s, trials' own compute {compute:.1f} s")
    print(f"per-trial overhead: {(wall - compute) / trials:.2f} s (target <= 3 s); "
          f"overhead share of wall time {(wall - compute) / wall:.2f}")


if __name__ == "__main__":
    main()
