"""TPE + ASHA replayed over a measured grid, for many seeds: how often the search-efficiency targets hold.

One TPE run is one draw of a random quantity: its seed decides which points it tries. Trials are
deterministic (seeded pre-training, fine-tuning and data order), so a finished grid sweep of a
space of choices (`bench/search_efficiency.py` keeps one) already holds every trial's outcome:
each pre-training's per-epoch probe Dice and seconds, each fine-tuning's Dice and seconds. This
replays the sweep's search for each seed with the real parts: the sweep's searcher
(`make_searcher`: Optuna's TPE as the sweep configures it, each distinct run proposed once),
Tune's ASHA scheduler from `early_stopping`, and the sweep's own sharing rules
(`pretraining_key`: a finished pre-training is replayed for free; `finetuning_key`: a repeated
fine-tuning costs nothing). A stopped pre-training is not kept, as in a sweep. Compute is the
measured seconds of the work a real sweep would have done; the grid's is every pre-training and
every distinct fine-tuning once. Targets: best Dice >= 0.98 x the grid's, compute <= 0.35 x.

A trial's Dice is one draw of its setting's (the same setting moves by about 0.02 across run
seeds, as much as the top settings differ), so the best single run partly ranks luck. With
`--truth`, grids of the same space run at other run seeds (`search_efficiency.py
--extra-grid-seeds 1 2`), each search's chosen setting (its best trial) is scored by its mean
Dice over those grids, and the ratio of the TPE choice's score to the grid choice's is the one
held against 0.98.

With `--fix KEY=VALUE`, the replay is of the subspace with that choice fixed, scored against the
grid's trials in it (e.g. `finetune.label_fraction=1.0`: is the label fraction, which a search
for the best Dice should not be choosing, what makes the quick-start search miss?).

    .venv/bin/python bench/search_simulation.py SWEEPS/grid [--seeds 20] [--samples N] [--truth SWEEPS/grid_seed1 ...]
                                                [--fix KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import yaml
from ray.tune.schedulers import TrialScheduler

from lrc_ray.distributed.tune import (
    EPOCH, PROBE_METRIC, SWEEP_FILE, SweepContext, early_stopping, fixed_values, make_searcher, run_keys, trial_config,
    tune_param_space,
)
from lrc_ray.search_space import Choice, parse_search_space


def measured_grid(experiment: Path, fixed: dict | None = None):
    """(space, base, pre-trainings: key -> [(seconds, probe)], fine-tunings: key -> (dice, seconds),
    Dice by setting: setting -> dice). `fixed` (key -> value) narrows the space to the trials with
    those values, as if the space file had fixed them."""
    sweep = json.loads((experiment / SWEEP_FILE).read_text())
    space = parse_search_space(yaml.safe_load(sweep["space_yaml"]), source=sweep["source"])
    fixed = fixed or {}
    unknown = sorted(set(fixed) - set(space.params))
    if unknown:
        raise SystemExit(f"--fix {unknown[0]}: not a searched key of {experiment}; those are {', '.join(space.params)}")
    space = dataclasses.replace(space, params=space.params | {key: Choice((value,)) for key, value in fixed.items()})
    pretrainings, finetunings, by_setting, used = {}, {}, {}, set()
    for result_file in sorted(experiment.glob("run_trial_*/result.json")):
        reports = [json.loads(line) for line in result_file.read_text().splitlines()]
        pre_key, ft_key = keys(space, sweep["base"], reports[0]["config"])
        final = reports[-1]
        epochs = [report for report in reports if "dice_mean" not in report]
        # A pre-training is run by whichever trial came first, perhaps one outside the subspace.
        if epochs and not epochs[0].get("replayed"):
            pretrainings[pre_key] = [(report["seconds"] + report.get("probe_seconds", 0.0), report[PROBE_METRIC])
                                     for report in epochs]
        if any(reports[0]["config"][key] != value for key, value in fixed.items()):
            continue
        used.add(pre_key)
        by_setting[setting(space, reports[0]["config"])] = final["dice_mean"]
        if not final.get("finetune_reused"):
            finetunings[ft_key] = (final["dice_mean"], final["finetune_seconds"])
    if not by_setting:
        raise SystemExit(f"--fix: no trial of {experiment} has {fixed}")
    pretrainings = {key: history for key, history in pretrainings.items() if key in used}
    return space, sweep["base"], pretrainings, finetunings, by_setting


def setting(space, values: dict) -> tuple:
    """A trial's choices, as a key that does not depend on the run seed."""
    return tuple(values[key] for key in _choice_keys(space))


def keys(space, base: dict, values: dict) -> tuple[str | None, str]:
    context = replay_context(space, base)
    return run_keys(trial_config(context, values), context.workers)


def replay_context(space, base: dict) -> SweepContext:
    return SweepContext(base=base, space_params=fixed_values(space), pretrained_root="",
                        workers=space.sweep.workers_per_trial, use_gpu=False)


def replay(space, base, pretrainings, finetunings, *, seed: int, samples: int, sampler: str = "tpe"):
    """Best Dice, compute, chosen setting (that of the best trial) and distinct runs proposed of
    one TPE (or random) + ASHA sweep, one trial at a time, proposed by the sweep's own searcher
    (`make_searcher`)."""
    settings = dataclasses.replace(space.sweep, seed=seed)
    space = dataclasses.replace(space, sweep=settings)
    searcher = make_searcher(space, replay_context(space, base), samples, sampler=sampler)
    searcher.set_search_properties(None, None, tune_param_space(space))
    epochs = max(len(history) for history in pretrainings.values())
    scheduler = early_stopping(settings, epochs)
    trained, finetuned, proposed, compute, best, chosen = set(), set(), set(), 0.0, -np.inf, None
    for number in range(samples):
        trial_id = str(number)
        values = searcher.suggest(trial_id)
        pre_key, ft_key = keys(space, base, values)
        proposed.add(ft_key)
        stopped = False
        if pre_key is not None:
            handle = SimpleNamespace(trial_id=trial_id)
            scheduler.on_trial_add(None, handle)
            for epoch, (seconds, probe) in enumerate(pretrainings[pre_key], start=1):
                compute += 0.0 if pre_key in trained else seconds
                action = scheduler.on_trial_result(None, handle, {EPOCH: epoch, PROBE_METRIC: probe})
                if action == TrialScheduler.STOP:
                    stopped = True
                    break
            trained |= set() if stopped else {pre_key}
        if stopped:
            searcher.on_trial_complete(trial_id, {PROBE_METRIC: probe})
            continue
        dice, seconds = finetunings[ft_key]
        compute += 0.0 if ft_key in finetuned else seconds
        finetuned.add(ft_key)
        if dice > best:
            best, chosen = dice, setting(space, values)
        searcher.on_trial_complete(trial_id, {settings.metric: dice})
    return best, compute, chosen, len(proposed)


def blind_hit_probability(total: int, good: int, drawn: float) -> float:
    """Chance that `drawn` of `total` runs picked at random include one of the `good` ones (drawn
    rounded down): what a search that learns nothing from its trials would get."""
    drawn = min(int(drawn), total)
    return 1.0 - math.comb(total - good, drawn) / math.comb(total, drawn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path, help="a finished `--search grid` sweep")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--samples", type=int, default=None, help="TPE trials (default: the space's num_samples)")
    parser.add_argument("--sampler", choices=["tpe", "random"], default="tpe", help="random: the baseline TPE should beat")
    parser.add_argument("--truth", type=Path, nargs="*", default=[],
                        help="grids of the same space at other run seeds: score each chosen setting by its mean there")
    parser.add_argument("--fix", nargs="*", default=[], metavar="KEY=VALUE",
                        help="replay the subspace with these choices fixed, e.g. finetune.label_fraction=1.0")
    args = parser.parse_args()
    if any("=" not in item for item in args.fix):
        parser.error("--fix: expected KEY=VALUE, e.g. finetune.label_fraction=1.0")
    fixed = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.fix)}
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    space, base, pretrainings, finetunings, observed = measured_grid(args.grid, fixed)
    truths = [measured_grid(grid, fixed)[-1] for grid in args.truth]
    samples = args.samples or space.sweep.num_samples
    grid_best = max(observed.values())
    grid_choice = max(observed, key=observed.get)
    grid_compute = sum(seconds for history in pretrainings.values() for seconds, _ in history) + \
        sum(seconds for _, seconds in finetunings.values())
    runs = [replay(space, base, pretrainings, finetunings, seed=seed, samples=samples, sampler=args.sampler)
            for seed in range(args.seeds)]
    ratios = np.array([[best / grid_best, compute / grid_compute] for best, compute, _, _ in runs])
    near_best = sum(dice >= 0.98 * grid_best for dice, _ in finetunings.values())
    proposed = float(np.mean([count for *_, count in runs]))
    print(f"grid: {len(pretrainings)} pre-trainings, {len(finetunings)} distinct fine-tunings, best Dice "
          f"{grid_best:.4f} ({dict(zip(_choice_keys(space), grid_choice))}), compute {grid_compute:.0f} s")
    print(f"{args.sampler} + ASHA, {samples} trials, seeds 0..{args.seeds - 1}:")
    print(f"  single-run best Dice / grid: mean {ratios[:, 0].mean():.3f}, min {ratios[:, 0].min():.3f}; "
          f">= 0.98 in {np.mean(ratios[:, 0] >= 0.98):.0%} of seeds")
    print(f"  distinct runs within 0.98 of the grid's best: {near_best} of {len(finetunings)}; the search "
          f"proposed {proposed:.1f} distinct runs on average, and as many picked blind would include one with "
          f"probability {blind_hit_probability(len(finetunings), near_best, proposed):.0%}")
    print(f"  compute / grid:   mean {ratios[:, 1].mean():.3f}, max {ratios[:, 1].max():.3f}; "
          f"<= 0.35 in {np.mean(ratios[:, 1] <= 0.35):.0%} of seeds")
    quality = ratios[:, 0]
    if truths:
        def score(choice):
            return float(np.mean([truth[choice] for truth in truths]))
        quality = np.array([score(choice) / score(grid_choice) for _, _, choice, _ in runs])
        print(f"  chosen setting's mean Dice over {len(truths)} other run seeds / the grid choice's "
              f"({score(grid_choice):.4f}): mean {quality.mean():.3f}, min {quality.min():.3f}; "
              f">= 0.98 in {np.mean(quality >= 0.98):.0%} of seeds")
    both = np.mean((quality >= 0.98) & (ratios[:, 1] <= 0.35))
    print(f"  both targets ({'chosen setting' if truths else 'single-run best'} >= 0.98, compute <= 0.35) "
          f"in {both:.0%} of seeds")


def _choice_keys(space) -> list[str]:
    return [key for key, param in space.params.items() if isinstance(param, Choice)]


if __name__ == "__main__":
    main()
