"""The whole choice procedure replayed over truth grids kept on disk, for many search seeds.

Ground truth: each distinct setting's mean TEST Dice over the run seeds of grids measured once
(`search_efficiency.py` runs the quick-start grid at run seeds 0, 1, 2, ..., each trial scored on
validation and test volumes). Trials are deterministic (seeded pre-training, fine-tuning and data
order), so a grid holds every run's outcome at its seed: each pre-training's per-epoch probe
Dice and seconds, each fine-tuning's validation and test Dice and seconds. For each search seed
this replays, side by side:

- TPE + ASHA + finalists: the sweep's own searcher (`make_searcher` over `space_to_search`:
  one TPE per label fraction, each distinct run proposed once, scratch left to the finalists)
  and ASHA (`early_stopping`) on one grid's validation Dice and probes; then the finalists the
  sweep would plan (`plan_finalists`: the top K settings per label fraction and scratch at the
  next free seeds), read from the grids at those seeds; the choice by their mean validation
  Dice (`finalists_table`, `choices`);
- random search + ASHA + finalists: the same with Optuna's random sampler;
- today's rule: TPE + ASHA, then the best single validation trial of each label fraction;
- no search: every setting run at the finalist seeds, chosen by mean validation Dice. Its
  success is what a choice by validation Dice can reach on these volumes and seeds; the
  search + finalists should come close at a fraction of its compute.

A choice succeeds at a label fraction when its setting's true mean test Dice is within one
seed-to-seed standard deviation (pooled over the settings at that fraction) of the best
setting's. Compute = the measured seconds of the work each procedure would do (a stopped
pre-training is not kept; equal runs are shared, as in a sweep; finalists pre-train without the
probe); the exhaustive procedure's = every distinct pre-training and fine-tuning of 3 grids,
scored on both parts. Target: success at every label fraction in >= 90% of >= 40 search seeds,
with compute <= 0.35 of the exhaustive.

The truth is measured on models the procedure never saw where the grids allow it (at least
1 + F + 3 grids for F finalist seeds: 6 for the quick start's 2): each grid serves in turn as
the search's, the finalists read the next free seeds, and the truth averages the other grids
(`arrangements`), so the success rate averages over several draws of the runs' noise. With
fewer grids the search reads seed 0 and the truth averages all seeds, sharing trained models
with the procedure (the report says so).

    .venv/bin/python bench/search_simulation.py GRID_SEED0 GRID_SEED1 GRID_SEED2 [...] [--seeds 40]
                                                [--samples N] [--top K] [--finalist-seeds N] [--space FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import yaml
from ray.tune.schedulers import TrialScheduler

from lrc_ray.distributed.search import make_searcher
from lrc_ray.distributed.tune import (
    EPOCH, PROBE_METRIC, SWEEP_FILE, SweepContext, early_stopping, fixed_values, trial_config, trial_run_key,
    tune_param_space,
)
from lrc_ray.finalists import (
    choices, finalists_table, fresh_seeds, plan_finalists, setting_values, space_to_search, test_metric,
)
from lrc_ray.results import SweepInfo, TrialRecord
from lrc_ray.search_space import label_fractions, load_search_space, parse_search_space
from lrc_ray.stages import run_keys

EXHAUSTIVE_SEEDS = 3  # the exhaustive procedure the target compares with: the grid at 3 run seeds


@dataclasses.dataclass
class Grid:
    """One grid's outcomes at one run seed, by the runs' keys (`stages.run_keys`)."""

    seed: int
    pretrainings: dict  # pre-training key -> [(training seconds, probe seconds, probe Dice) per epoch]
    finetunings: dict  # fine-tuning key -> {"validation", "test", "seconds", "validation_seconds", "test_seconds"}


def load_grid(experiment: Path):
    """(space, base, Grid) of a finished `--search grid` sweep whose trials scored both parts."""
    sweep = json.loads((experiment / SWEEP_FILE).read_text())
    space = parse_search_space(yaml.safe_load(sweep["space_yaml"]), source=sweep["source"])
    base = sweep["base"]
    context = replay_context(space, base)
    grid = Grid(seed=base["seed"], pretrainings={}, finetunings={})
    for result_file in sorted(experiment.glob("run_trial_*/result.json")):
        reports = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        if not reports or "dice_mean" not in reports[-1]:
            raise SystemExit(f"{result_file}: an unfinished trial; finish the grid first (search_efficiency.py)")
        pre_key, ft_key = run_keys(trial_config(context, reports[0]["config"]), context.workers)
        epochs = [report for report in reports if "dice_mean" not in report]
        if epochs and not epochs[0].get("replayed"):
            grid.pretrainings[pre_key] = [(r["seconds"], r.get("probe_seconds", 0.0), r[PROBE_METRIC]) for r in epochs]
        final = reports[-1]
        if test_metric("dice_mean") not in final:
            raise SystemExit(f"{result_file}: no test Dice; measure the grid with search_efficiency.py")
        if not final.get("finetune_reused"):
            grid.finetunings[ft_key] = {
                "validation": final["dice_mean"], "test": final[test_metric("dice_mean")],
                "seconds": final["finetune_seconds"], "validation_seconds": final["evaluate_seconds/validation"],
                "test_seconds": final["evaluate_seconds/test"],
            }
    return space, base, grid


def replay_context(space, base: dict) -> SweepContext:
    return SweepContext(base=base, space_params=fixed_values(space), root="", workers=space.sweep.workers_per_trial,
                        use_gpu=False)


def keys(space, base: dict, values: dict) -> tuple[str | None, str]:
    context = replay_context(space, base)
    return run_keys(trial_config(context, values), context.workers)


def replay_search(space, base: dict, grid: Grid, *, seed: int, samples: int, sampler: str):
    """One search of the sweep's own searcher and ASHA over a grid, one trial at a time: its trials
    as `TrialRecord`s (values and validation Dice, none when stopped) and its compute."""
    settings = dataclasses.replace(space.sweep, seed=seed)
    space = dataclasses.replace(space, sweep=settings)
    context = replay_context(space, base)
    searched = space_to_search(space)
    searcher = make_searcher(searched, lambda values: trial_run_key(context, values), samples, sampler=sampler)
    searcher.set_search_properties(None, None, tune_param_space(searched))
    scheduler = early_stopping(settings, max(len(history) for history in grid.pretrainings.values()))
    trained, finetuned, compute, records = set(), set(), 0.0, []
    for number in range(samples):
        trial_id = str(number)
        values = searcher.suggest(trial_id)
        pre_key, ft_key = keys(space, base, values)
        stopped = False
        if pre_key is not None:
            handle = SimpleNamespace(trial_id=trial_id)
            scheduler.on_trial_add(None, handle)
            for epoch, (seconds, probe_seconds, probe) in enumerate(grid.pretrainings[pre_key], start=1):
                compute += 0.0 if pre_key in trained else seconds + probe_seconds
                action = scheduler.on_trial_result(None, handle, {EPOCH: epoch, PROBE_METRIC: probe})
                if action == TrialScheduler.STOP:
                    stopped = True
                    break
            trained |= set() if stopped else {pre_key}
        if stopped:
            searcher.on_trial_complete(trial_id, {PROBE_METRIC: probe})
            records.append(TrialRecord(trial_id, "TERMINATED", {**values, "seed": base["seed"]}, {}, None))
            continue
        outcome = grid.finetunings[ft_key]
        compute += 0.0 if ft_key in finetuned else outcome["seconds"] + outcome["validation_seconds"]
        finetuned.add(ft_key)
        searcher.on_trial_complete(trial_id, {settings.metric: outcome["validation"]})
        records.append(TrialRecord(trial_id, "TERMINATED", {**values, "seed": base["seed"]},
                                   {settings.metric: outcome["validation"]}, None))
    return records, compute


def replay_finalists(space, base: dict, grids: dict[int, Grid], records, *, top: int, seeds: int):
    """The finalists a sweep would plan from `records`, read from the grids at their seeds: the
    chosen setting per label fraction (by mean validation Dice) and the finalists' compute."""
    info = SweepInfo(metric="dice_mean", mode=space.sweep.mode, base=base, fixed=fixed_values(space))
    plan = plan_finalists(records, info, top=top, seeds=seeds, fractions=label_fractions(space))
    tally, outcomes = FinalRuns(space, base, grids), {}
    for run in plan.runs:
        outcome = tally.run(run.seed, run.values)
        outcomes[run.index] = {"dice_mean": outcome["validation"], test_metric("dice_mean"): outcome["test"]}
    found = choices(finalists_table(plan, outcomes, info))
    return {choice.label_fraction: choice.chosen["setting"] for choice in found}, tally.seconds


class FinalRuns:
    """Runs to the end that score the validation and the test volumes (finalists, or every setting),
    read from the grids, and their compute: each pre-training and fine-tuning counted once, as
    equal inputs share their stage outputs; no probe (only the search's pre-trainings run it)."""

    def __init__(self, space, base: dict, grids: dict[int, Grid]) -> None:
        self._space, self._base, self._grids = space, base, grids
        self._done: set = set()
        self.seconds = 0.0

    def run(self, seed: int, values: dict) -> dict:
        """The fine-tuning outcome of `values` at run seed `seed`."""
        grid = self._grids[seed]
        pre_key, ft_key = keys(self._space, {**self._base, "seed": seed}, values)
        if pre_key is not None and (seed, pre_key) not in self._done:
            self.seconds += sum(seconds for seconds, _, _ in grid.pretrainings[pre_key])
            self._done.add((seed, pre_key))
        outcome = grid.finetunings[ft_key]
        if (seed, ft_key) not in self._done:
            self.seconds += outcome["seconds"] + outcome["validation_seconds"] + outcome["test_seconds"]
            self._done.add((seed, ft_key))
        return outcome


def todays_rule(space, records) -> dict:
    """The best single validation trial of each label fraction."""
    sign = -1.0 if space.sweep.mode == "max" else 1.0
    chosen = {}
    for record in sorted((r for r in records if "dice_mean" in r.metrics), key=lambda r: sign * r.metrics["dice_mean"]):
        chosen.setdefault(record.values["finetune.label_fraction"], setting_values(record))
    return chosen


@dataclasses.dataclass
class Landscape:
    """Per label fraction: each distinct setting's true mean test Dice over the grids, the pooled
    seed-to-seed SD, and the best setting."""

    truth: dict  # label fraction -> {fine-tuning key at seed 0: (mean test Dice, SD over seeds, a values dict)}
    pooled_sd: dict  # label fraction -> pooled SD
    best: dict  # label fraction -> best mean


def landscape(space, base: dict, grids: dict[int, Grid], seeds: list[int]) -> Landscape:
    """The truth over the grids at run `seeds`."""
    from lrc_ray.search_space import grid_points

    truth, pooled, best = {}, {}, {}
    for values in grid_points(space):
        fraction = values["finetune.label_fraction"]
        setting = keys(space, {**base, "seed": 0}, values)[1]
        if setting in truth.setdefault(fraction, {}):
            continue
        tests = [grids[seed].finetunings[keys(space, {**base, "seed": seed}, values)[1]]["test"] for seed in seeds]
        truth[fraction][setting] = (float(np.mean(tests)), float(np.std(tests, ddof=1)), values)
    for fraction, settings in truth.items():
        pooled[fraction] = math.sqrt(np.mean([sd ** 2 for _, sd, _ in settings.values()]))
        best[fraction] = max(mean for mean, _, _ in settings.values())
    return Landscape(truth, pooled, best)


def true_dice(space, base: dict, scape: Landscape, values: dict) -> float:
    fraction = values["finetune.label_fraction"]
    return scape.truth[fraction][keys(space, {**base, "seed": 0}, values)[1]][0]


def exhaustive_compute(grids: dict[int, Grid], seeds: list[int]) -> float:
    """Every distinct pre-training (with its probes) and fine-tuning (scored on both parts) of the
    grids at `seeds`: the procedure that measured the truth."""
    total = 0.0
    for seed in seeds:
        grid = grids[seed]
        total += sum(seconds + probe for history in grid.pretrainings.values() for seconds, probe, _ in history)
        total += sum(o["seconds"] + o["validation_seconds"] + o["test_seconds"] for o in grid.finetunings.values())
    return total


def report(paths: list[Path], *, seeds: int = 40, samples: int | None = None, top: int | None = None,
           finalist_seeds: int | None = None, procedure: Path | None = None) -> None:
    """Print the landscape and the procedures side by side, replayed over the grids at `paths`;
    the search's and the finalists' settings from the space file `procedure` (default: the grids' own)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    loaded = [load_grid(path) for path in paths]
    space, base, _ = loaded[0]
    if procedure is not None:
        settings = load_search_space(procedure)
        if settings.params != space.params:
            raise SystemExit(f"{procedure}: its space differs from the grids' ({space.source}); measure its grids")
        space = dataclasses.replace(space, sweep=settings.sweep, finalists=settings.finalists)
    grids = {grid.seed: grid for _, _, grid in loaded}
    if sorted(grids) != list(range(len(grids))) or len(grids) < EXHAUSTIVE_SEEDS:
        raise SystemExit(f"expected grids at run seeds 0..{EXHAUSTIVE_SEEDS - 1} at least, got seeds {sorted(grids)}")
    finalists = space.finalists
    top = top or (finalists.top if finalists else 2)
    finalist_seeds = finalist_seeds or (finalists.seeds if finalists else 2)
    if finalist_seeds > len(grids) - 1:
        raise SystemExit(f"--finalist-seeds {finalist_seeds}: the grids hold run seeds 1..{len(grids) - 1} only")
    samples = samples or space.sweep.num_samples
    print_landscape(landscape(space, base, grids, sorted(grids)), sorted(grids))
    names = ("TPE + ASHA + finalists", "random + ASHA + finalists", "today's rule (TPE + ASHA, best trial)",
             "every setting at the finalist seeds (no search)")
    outcomes = {name: [] for name in names}  # per replay: (success, chosen - best) per fraction, compute ratio
    plans = arrangements(sorted(grids), finalist_seeds)
    for search_seed, truth_seeds in plans:
        scape = landscape(space, base, grids, truth_seeds)
        exhaustive = exhaustive_compute(grids, truth_seeds[:EXHAUSTIVE_SEEDS])
        searched = {**base, "seed": search_seed}
        # no search: every setting at each choice of F seeds among those the truth does not use
        for run_seeds in itertools.combinations([seed for seed in sorted(grids) if seed not in truth_seeds], finalist_seeds):
            chosen, compute = every_setting_choice(space, base, grids, run_seeds)
            outcomes[names[3]].append((judge(space, base, scape, chosen), compute / exhaustive))
        for seed in range(seeds):
            for sampler in ("tpe", "random"):
                records, search_compute = replay_search(space, searched, grids[search_seed], seed=seed, samples=samples,
                                                        sampler=sampler)
                chosen, finalist_compute = replay_finalists(space, searched, grids, records, top=top, seeds=finalist_seeds)
                outcomes[names[0 if sampler == "tpe" else 1]].append(
                    (judge(space, base, scape, chosen), (search_compute + finalist_compute) / exhaustive))
                if sampler == "tpe":
                    outcomes[names[2]].append((judge(space, base, scape, todays_rule(space, records)),
                                               search_compute / exhaustive))
    print(f"\n{seeds} search seeds x {len(plans)} arrangements of the grids, {samples} search trials, finalists: top {top} "
          f"+ scratch at {finalist_seeds} seeds; exhaustive = the grid at the {EXHAUSTIVE_SEEDS} truth seeds")
    fractions = label_fractions(space) or (base["finetune"]["label_fraction"],)
    print("procedure | success at every fraction | " + " | ".join(f"success at {f:g}" for f in sorted(fractions))
          + " | chosen - best, mean (worst) | compute / exhaustive, mean (max) | compute <= 0.35 | both")
    for name, runs in outcomes.items():
        print(summary_line(name, runs))
    search_seed, truth_seeds = plans[0]
    if len(plans) > 1:
        print(f"\neach arrangement searches one grid, reads the finalists from the next {finalist_seeds} seeds and judges "
              f"the choice by the mean test Dice of the other {len(truth_seeds)} (no trained model shared), e.g. search "
              f"seed 0, finalists {list(fresh_seeds({0}, finalist_seeds))}, truth {truth_seeds}")
    else:
        print(f"\ncaveat: the truth averages run seeds {truth_seeds}; the search read seed 0's validation Dice and the "
              f"finalists seeds 1..{finalist_seeds}'s, so they share trained models with the truth (on other volumes); "
              f"{finalist_seeds + 1 + EXHAUSTIVE_SEEDS} grids keep them apart")


def every_setting_choice(space, base: dict, grids: dict[int, Grid], seeds: tuple[int, ...]) -> tuple[dict, float]:
    """The choice with no search at all: every distinct setting of each label fraction at the
    finalist `seeds`, chosen by mean validation Dice, as the finalists choose; and its compute.
    What a choice by validation Dice can reach on these volumes at these seeds."""
    from lrc_ray.search_space import grid_points

    tally, means = FinalRuns(space, base, grids), {}
    for values in grid_points(space):
        validation = np.mean([tally.run(seed, values)["validation"] for seed in seeds])
        means.setdefault(values["finetune.label_fraction"], []).append((float(validation), values))
    sign = -1.0 if space.sweep.mode == "max" else 1.0
    chosen = {fraction: min(ranked, key=lambda item: sign * item[0])[1] for fraction, ranked in means.items()}
    return chosen, tally.seconds


def arrangements(grid_seeds: list[int], finalist_seeds: int) -> list[tuple[int, list[int]]]:
    """(search seed, truth seeds) pairs. With enough grids, every grid serves in turn as the search's;
    its finalists take the seeds a sweep would (`fresh_seeds`), and the truth the other seeds: no
    trained model is shared, and the success rate averages over several draws of the runs' noise
    rather than one. With fewer grids: search seed 0, truth over all seeds."""
    if len(grid_seeds) < 1 + finalist_seeds + EXHAUSTIVE_SEEDS:
        return [(0, list(grid_seeds))]
    plans = []
    for search_seed in grid_seeds:
        used = {search_seed, *fresh_seeds({search_seed}, finalist_seeds)}
        plans.append((search_seed, [seed for seed in grid_seeds if seed not in used]))
    return plans


def judge(space, base: dict, scape: Landscape, chosen: dict) -> list[tuple[bool, float]]:
    """Per label fraction: whether the chosen setting's true mean test Dice is within one pooled
    seed-to-seed SD of the best setting's, and its distance to the best (a fraction without a
    choice fails, distance NaN)."""
    judged = []
    for fraction in sorted(scape.truth):
        if fraction not in chosen:
            judged.append((False, math.nan))
            continue
        gap = true_dice(space, base, scape, {**chosen[fraction], "finetune.label_fraction": fraction}) - scape.best[fraction]
        judged.append((gap >= -scape.pooled_sd[fraction], gap))
    return judged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grids", type=Path, nargs="+", help="finished grids of one space at run seeds 0, 1, 2, ...")
    parser.add_argument("--seeds", type=int, default=40, help="search seeds replayed (default 40)")
    parser.add_argument("--samples", type=int, default=None, help="search trials (default: the space's num_samples)")
    parser.add_argument("--top", type=int, default=None, help="finalists per label fraction (default: the space's)")
    parser.add_argument("--finalist-seeds", type=int, default=None, help="finalist seeds (default: the space's)")
    parser.add_argument("--space", type=Path, default=None,
                        help="a space file with the grids' space: replay its sweep and finalists settings")
    args = parser.parse_args()
    report(args.grids, seeds=args.seeds, samples=args.samples, top=args.top, finalist_seeds=args.finalist_seeds,
           procedure=args.space)


def print_landscape(scape: Landscape, seeds: list[int]) -> None:
    print(f"landscape: true mean test Dice over run seeds {seeds}")
    for fraction in sorted(scape.truth):
        settings = sorted(scape.truth[fraction].values(), key=lambda item: -item[0])
        sd = scape.pooled_sd[fraction]
        near = sum(mean >= scape.best[fraction] - sd for mean, _, _ in settings)
        print(f"  label fraction {fraction:g}: {len(settings)} distinct settings; best {scape.best[fraction]:.4f}; "
              f"seed-to-seed SD pooled {sd:.4f} (best setting's {settings[0][1]:.4f}); {near} within one SD of the best")
        for mean, sd_one, values in settings:
            shown = {key.split(".")[-1]: value for key, value in values.items() if key != "finetune.label_fraction"}
            print(f"    {mean:.4f} +- {sd_one:.4f}  {shown}")


def summary_line(name: str, runs) -> str:
    hits = np.array([[hit for hit, _ in judged] for judged, _ in runs])
    gaps = np.array([[gap for _, gap in judged] for judged, _ in runs])
    compute = np.array([ratio for _, ratio in runs])
    every = hits.all(axis=1)
    return (f"{name} | {every.mean():.0%} | " + " | ".join(f"{hits[:, i].mean():.0%}" for i in range(hits.shape[1]))
            + f" | {np.nanmean(gaps):+.4f} ({np.nanmin(gaps):+.4f}) | {compute.mean():.3f} ({compute.max():.3f}) | "
            f"{np.mean(compute <= 0.35):.0%} | {np.mean(every & (compute <= 0.35)):.0%}")


if __name__ == "__main__":
    main()
