"""Search efficiency on the quick-start space: TPE + ASHA vs the exhaustive grid, in one run.

Both searches run the same space (search_spaces/quickstart.yaml, every parameter a choice) on
the same data and super-pixel cache, one trial at a time in one Ray instance; each pays for its
own pre-training (pre-trained checkpoints are shared only within a sweep). Compute = the trials'
own compute (pre-training epochs trained, probes, fine-tuning), read from Tune's stored reports.
Targets: best Dice of TPE + ASHA >= 0.98 x the grid's best, with <= 0.35 of its compute.
The grid alone takes about 12 minutes on 2 cores; `--tpe-seeds 0 1 2` repeats TPE + ASHA with other seeds.

    .venv/bin/python bench/search_efficiency.py [--space search_spaces/quickstart.yaml] [--samples N]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from sweep_common import base_config, best_metric, built_in_data, own_compute_seconds, timed_sweep, trial_reports, with_sweep_settings

from lrc_ray import api
from lrc_ray.distributed.runtime import ray_session
from lrc_ray.distributed.tune import TRIAL_SLOT
from lrc_ray.search_space import grid_points, load_search_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", type=Path, default=Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml")
    parser.add_argument("--samples", type=int, default=None, help="TPE trials (default: the space's num_samples)")
    parser.add_argument("--tpe-seeds", type=int, nargs="+", default=None,
                        help="run TPE + ASHA once per seed against the one grid (default: the space's seed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    space = load_search_space(args.space)
    workdir = Path(tempfile.mkdtemp(prefix="lrc_search_efficiency_"))
    base = base_config(space, built_in_data(space, workdir), workdir / "cache")
    seeds = args.tpe_seeds or [space.sweep.seed]
    runs = {f"tpe_seed{seed}": with_sweep_settings(space, seed=seed) for seed in seeds}
    walls = {}
    with ray_session(num_cpus=2, resources={TRIAL_SLOT: os.cpu_count() or 1}):
        api.superpixels_for(base.data)
        for name, run_space in runs.items():
            walls[name] = timed_sweep(run_space, base=base, storage=workdir / "sweeps", name=name, search="tpe",
                                      num_samples=args.samples)
        walls["grid"] = timed_sweep(space, base=base, storage=workdir / "sweeps", name="grid", search="grid")
    summary = {}
    for name in [*runs, "grid"]:
        reports = trial_reports(workdir / "sweeps" / name)
        finished = sum(any("dice_mean" in line for line in lines) for lines in reports.values())
        compute = sum(own_compute_seconds(lines) for lines in reports.values())
        summary[name] = (best_metric(reports), compute)
        print(f"{name:>10}: {len(reports)} trials ({finished} fine-tuned), best Dice {summary[name][0]:.4f}, "
              f"own compute {compute:.0f} s, wall {walls[name]:.0f} s")
    grid_best, grid_compute = summary["grid"]
    print(f"\nspace {args.space.name}: grid of {len(grid_points(space))} points")
    for name in runs:
        best, compute = summary[name]
        print(f"{name}: best Dice TPE+ASHA / grid {best / grid_best:.3f} (target >= 0.98), "
              f"compute TPE+ASHA / grid {compute / grid_compute:.3f} (target <= 0.35)")
    print(f"sweeps kept in {workdir / 'sweeps'} (read them with lrc-ray results)")


if __name__ == "__main__":
    main()
