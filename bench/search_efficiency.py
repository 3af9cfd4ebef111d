"""Search efficiency on the quick-start space: TPE + ASHA vs the exhaustive grid, in one run.

Both searches run the same space (search_spaces/quickstart.yaml, every parameter a choice) on
the same data and super-pixel cache, one trial at a time in one Ray instance; each pays for its
own pre-training (pre-trained checkpoints are shared only within a sweep). Compute = the trials'
own compute (pre-training epochs trained, probes, fine-tuning), read from Tune's stored reports.
Targets: best Dice of TPE + ASHA >= 0.98 x the grid's best, with <= 0.35 of its compute.
The grid alone takes the better part of an hour on 2 cores.

    .venv/bin/python bench/search_efficiency.py [--space search_spaces/quickstart.yaml] [--samples N]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from sweep_common import base_config, best_metric, built_in_data, own_compute_seconds, timed_sweep, trial_reports

from lrc_ray import api
from lrc_ray.distributed.runtime import ray_session
from lrc_ray.distributed.tune import TRIAL_SLOT
from lrc_ray.search_space import grid_points, load_search_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", type=Path, default=Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml")
    parser.add_argument("--samples", type=int, default=None, help="TPE trials (default: the space's num_samples)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    space = load_search_space(args.space)
    workdir = Path(tempfile.mkdtemp(prefix="lrc_search_efficiency_"))
    base = base_config(space, built_in_data(space, workdir), workdir / "cache")
    walls = {}
    with ray_session(num_cpus=2, resources={TRIAL_SLOT: os.cpu_count() or 1}):
        api.superpixels_for(base.data)
        for search in ("tpe", "grid"):
            walls[search] = timed_sweep(space, base=base, storage=workdir / "sweeps", name=search, search=search,
                                        num_samples=args.samples)
    summary = {}
    for search in ("tpe", "grid"):
        reports = trial_reports(workdir / "sweeps" / search)
        finished = sum(any("dice_mean" in line for line in lines) for lines in reports.values())
        compute = sum(own_compute_seconds(lines) for lines in reports.values())
        summary[search] = (best_metric(reports), compute)
        print(f"{search:>4}: {len(reports)} trials ({finished} fine-tuned), best Dice {summary[search][0]:.4f}, "
              f"own compute {compute:.0f} s, wall {walls[search]:.0f} s")
    print(f"\nspace {args.space.name}: grid of {len(grid_points(space))} points")
    print(f"best Dice TPE+ASHA / grid: {summary['tpe'][0] / summary['grid'][0]:.3f} (target >= 0.98)")
    print(f"compute TPE+ASHA / grid:   {summary['tpe'][1] / summary['grid'][1]:.3f} (target <= 0.35)")
    print(f"sweeps kept in {workdir / 'sweeps'} (read them with lrc-ray results)")


if __name__ == "__main__":
    main()
