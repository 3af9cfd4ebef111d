"""Search efficiency on the quick-start space: TPE + ASHA vs the exhaustive grid, in one run.

Both searches run the same space (search_spaces/quickstart.yaml, every parameter a choice) on
the same data and super-pixel cache, one trial at a time in one Ray instance; each pays for its
own pre-training (pre-trained checkpoints are shared only within a sweep). Compute = the trials'
own compute (pre-training epochs trained, probes, fine-tuning), read from Tune's stored reports.
Targets: best Dice of TPE + ASHA >= 0.98 x the grid's best, with <= 0.35 of its compute.

A trial's Dice is one draw: on the quick-start data the same setting moves by about 0.02
(median standard deviation across run seeds; 0.06 before fine-tuning ran 60 epochs), as much as
the top settings differ. The grid's best
single run is therefore the luckiest of its draws, and "best Dice found" compares luck as much
as search. So each search's chosen setting (its best trial) is also re-run with fresh run seeds
(--reeval-seeds, not the seed the searches used), and the ratio of those means is the one that
says whether TPE + ASHA chose as well as the grid. Both ratios are printed.
The grid alone takes about 20 minutes on 2 cores; `--tpe-seeds 0 1 2` repeats TPE + ASHA with
other seeds; `--extra-grid-seeds 1 2` also runs the grid at those run seeds, for
`search_simulation.py --truth`.

    .venv/bin/python bench/search_efficiency.py [--space search_spaces/quickstart.yaml] [--samples N]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from sweep_common import (
    base_config, best_metric, best_trial_values, built_in_data, own_compute_seconds, timed_sweep, trial_reports,
    with_sweep_settings,
)

from lrc_ray import api
from lrc_ray.distributed.runtime import ray_session
from lrc_ray.distributed.tune import TRIAL_SLOT
from lrc_ray.search_space import Choice, Fixed, SearchSpace, grid_points, load_search_space


def reevaluated_dice(space: SearchSpace, point: dict, seeds: list[int], *, base, storage: Path, name: str) -> list[float]:
    """The Dice of one setting at each of `seeds` (run seeds): a grid sweep over `seed` alone."""
    params = space.params | {key: Fixed(value) for key, value in point.items()} | {"seed": Choice(tuple(seeds))}
    timed_sweep(dataclasses.replace(space, params=params), base=base, storage=storage, name=name, search="grid")
    return [lines[-1]["dice_mean"] for lines in trial_reports(storage / name).values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", type=Path, default=Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml")
    parser.add_argument("--samples", type=int, default=None, help="TPE trials (default: the space's num_samples)")
    parser.add_argument("--tpe-seeds", type=int, nargs="+", default=None,
                        help="run TPE + ASHA once per seed against the one grid (default: the space's seed)")
    parser.add_argument("--reeval-seeds", type=int, nargs="+", default=[1, 2, 3],
                        help="run seeds that re-run each search's chosen setting (the searches use run seed 0)")
    parser.add_argument("--extra-grid-seeds", type=int, nargs="*", default=[],
                        help="also run the whole grid at these run seeds (for search_simulation.py --truth)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    space = load_search_space(args.space)
    workdir = Path(tempfile.mkdtemp(prefix="lrc_search_efficiency_"))
    sweeps = workdir / "sweeps"
    base = base_config(space, built_in_data(space, workdir), workdir / "cache")
    if base.seed in args.reeval_seeds:
        parser.error(f"--reeval-seeds must not include the searches' run seed {base.seed}")
    seeds = args.tpe_seeds or [space.sweep.seed]
    runs = {f"tpe_seed{seed}": with_sweep_settings(space, seed=seed) for seed in seeds}
    walls, reevaluated = {}, {}
    with ray_session(num_cpus=2, resources={TRIAL_SLOT: os.cpu_count() or 1}):
        api.superpixels_for(base.data)
        for name, run_space in runs.items():
            walls[name] = timed_sweep(run_space, base=base, storage=sweeps, name=name, search="tpe",
                                      num_samples=args.samples)
        walls["grid"] = timed_sweep(space, base=base, storage=sweeps, name="grid", search="grid")
        chosen = {name: best_trial_values(trial_reports(sweeps / name), space) for name in [*runs, "grid"]}
        for number, point in enumerate(dict.fromkeys(map(_frozen, chosen.values()))):
            reevaluated[point] = reevaluated_dice(space, dict(point), args.reeval_seeds, base=base, storage=sweeps,
                                                  name=f"reeval_{number}")
        for seed in args.extra_grid_seeds:
            timed_sweep(space, base=base.replace(seed=seed), storage=sweeps, name=f"grid_seed{seed}", search="grid")
    summary = {}
    for name in [*runs, "grid"]:
        reports = trial_reports(sweeps / name)
        finished = sum(any("dice_mean" in line for line in lines) for lines in reports.values())
        compute = sum(own_compute_seconds(lines) for lines in reports.values())
        summary[name] = (best_metric(reports), compute, float(np.mean(reevaluated[_frozen(chosen[name])])))
        print(f"{name:>10}: {len(reports)} trials ({finished} fine-tuned), best Dice {summary[name][0]:.4f}, "
              f"own compute {compute:.0f} s, wall {walls[name]:.0f} s")
    print(f"\nchosen settings re-run at run seeds {args.reeval_seeds} (the searches ran seed {base.seed}):")
    for point, dice in reevaluated.items():
        by = ", ".join(name for name in chosen if _frozen(chosen[name]) == point)
        print(f"  {dict(point)} (chosen by {by}): Dice {' '.join(f'{value:.4f}' for value in dice)}, "
              f"mean {np.mean(dice):.4f}, sd {np.std(dice, ddof=1):.4f}")
    grid_best, grid_compute, grid_chosen = summary["grid"]
    print(f"\nspace {args.space.name}: grid of {len(grid_points(space))} points")
    for name in runs:
        best, compute, chosen_dice = summary[name]
        print(f"{name}: chosen setting's re-run Dice TPE+ASHA / grid {chosen_dice / grid_chosen:.3f} (target >= 0.98); "
              f"single-run best Dice {best / grid_best:.3f}; compute TPE+ASHA / grid {compute / grid_compute:.3f} "
              f"(target <= 0.35)")
    print(f"sweeps kept in {sweeps} (read them with lrc-ray results)")


def _frozen(point: dict) -> tuple:
    return tuple(sorted(point.items()))


if __name__ == "__main__":
    main()
