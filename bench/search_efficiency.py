"""Search efficiency on the quick-start space: the truth grids, then the whole choice procedure
replayed over them (`search_simulation.py`), in one run.

The truth is each distinct setting's mean test Dice over run seeds: the quick-start grid (every
parameter a choice) is run at run seeds 0, 1, ..., `--grid-seeds` - 1, every trial scored on the
validation and the test volumes, one trial at a time in one local Ray of 2 CPUs. The grids, the
data and the super-pixel cache are kept in `--workdir`, so a later run reuses them: a finished
grid is read as it is, an interrupted one is resumed. About 8 minutes a grid on a quiet 2-core
machine. Then TPE + ASHA + finalists, random + ASHA + finalists and today's rule are replayed
for `--seeds` search seeds and printed side by side with the landscape. The replays search on
seed 0's grid and read the finalists from seeds 1..F; the default 6 grids keep 3 seeds for a
truth that shares no trained model with them (`search_simulation.py`).

    .venv/bin/python bench/search_efficiency.py --workdir DIR [--grid-seeds 6] [--seeds 40]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from search_simulation import report
from sweep_common import base_config, built_in_data, own_compute_seconds, timed_sweep, trial_reports

from lrc_ray.distributed.runtime import ray_session
from lrc_ray.distributed.tune import SWEEP_FILE, TRIAL_SLOT
from lrc_ray.engine.splits import SPLIT_PARTS
from lrc_ray.search_space import grid_points, load_search_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", type=Path, default=Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml")
    parser.add_argument("--workdir", type=Path, default=None, help="where grids, data and cache are kept (default: a new temp dir)")
    parser.add_argument("--grid-seeds", type=int, default=6, help="run seeds of the grids, 0..N-1 (at least 3)")
    parser.add_argument("--seeds", type=int, default=40, help="search seeds replayed")
    parser.add_argument("--samples", type=int, default=None, help="search trials (default: the space's num_samples)")
    parser.add_argument("--top", type=int, default=None, help="finalists per label fraction (default: the space's)")
    parser.add_argument("--finalist-seeds", type=int, default=None, help="finalist seeds (default: the space's)")
    args = parser.parse_args()
    if args.grid_seeds < 3:
        parser.error("--grid-seeds: the truth needs at least 3 run seeds")
    logging.basicConfig(level=logging.WARNING)
    space = load_search_space(args.space)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="lrc_search_efficiency_"))).resolve()
    sweeps = workdir / "sweeps"
    data_dir = workdir / "data" if (workdir / "data" / "dataset.json").is_file() else built_in_data(space, workdir)
    base = base_config(space, data_dir, workdir / "cache")
    names = [f"grid_seed{seed}" for seed in range(args.grid_seeds)]
    with ray_session(num_cpus=2, resources={TRIAL_SLOT: os.cpu_count() or 1}):
        for seed, name in enumerate(names):
            resume = (sweeps / name / SWEEP_FILE).is_file()
            wall = timed_sweep(space, base=base.replace(seed=seed), storage=sweeps, name=name, search="grid",
                               resume=resume, parts=SPLIT_PARTS)
            reports = trial_reports(sweeps / name)
            compute = sum(own_compute_seconds(lines) for lines in reports.values())
            print(f"{name}: {len(reports)} of {len(grid_points(space))} trials, own compute {compute:.0f} s, "
                  f"wall this run {wall:.0f} s{' (resumed)' if resume else ''}", flush=True)
    print(f"grids kept in {sweeps}\n")
    report([sweeps / name for name in names], seeds=args.seeds, samples=args.samples, top=args.top,
           finalist_seeds=args.finalist_seeds, procedure=args.space)


if __name__ == "__main__":
    main()
