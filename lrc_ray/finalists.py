"""Finalists: a search's top settings re-run at fresh seeds, the choice among them, and its numbers.

One search trial is one draw: on the built-in data the same setting moves by about 0.02 Dice
between seeds, as much as the top settings differ, so the best single trial is partly the
luckiest, and its validation Dice, which chose it, overstates it. So, for each label fraction,
the top `top` distinct settings of the search (by validation Dice) and `scratch` (with the
best setting's fine-tuning) are re-run at `seeds` seeds no search trial used, and scored on the
validation volumes and on the test volumes, which nothing before saw. The choice is the
finalist with the best mean validation Dice; its test Dice (mean and 95% t-interval over the
seeds) is the number to report, with the paired difference to scratch (same seeds, same
volumes). Plain layer: the runs are Tune trials (`distributed.tune.run_finalists`); this module
plans them and reads their results.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from lrc_ray.results import PARAMETER_COLUMNS, SweepInfo, TrialRecord, flatten, trial_config
from lrc_ray import search_space
from lrc_ray.stages import finetuned_model, run_keys

SCRATCH = "scratch"
METHOD_KEY = "pretrain.method"
TEST_PREFIX = "test_"  # a finalist reports its test scores as the validation ones with this prefix


def test_metric(metric: str) -> str:
    """The name under which finalists report `metric` on the test volumes."""
    return TEST_PREFIX + metric


@dataclass(frozen=True)
class FinalistRun:
    """One finalist trial: a setting (searched values, dotted keys, without the seed) at one seed."""

    index: int
    label_fraction: float
    role: str  # "search #1" ... (rank in the search), or "scratch"
    setting: dict[str, Any]
    seed: int

    @property
    def values(self) -> dict[str, Any]:
        """The trial's values: the setting at its seed."""
        return {**self.setting, "seed": self.seed}


@dataclass(frozen=True)
class FinalistPlan:
    top: int
    seeds: tuple[int, ...]
    runs: tuple[FinalistRun, ...]
    missing: tuple[float, ...]  # label fractions without a finished search trial: no finalists there

    def to_dict(self) -> dict:
        return {"top": self.top, "seeds": list(self.seeds), "runs": [asdict(run) for run in self.runs],
                "missing": list(self.missing)}

    @classmethod
    def from_dict(cls, raw: dict) -> "FinalistPlan":
        return cls(top=raw["top"], seeds=tuple(raw["seeds"]), runs=tuple(FinalistRun(**run) for run in raw["runs"]),
                   missing=tuple(raw["missing"]))


def space_to_search(space: search_space.SearchSpace) -> search_space.SearchSpace:
    """The space the search explores: without `scratch` among the methods when finalists follow.
    They re-run scratch at every label fraction anyway, and it has no knobs, so a search trial
    on it would buy nothing: a quarter of the quick-start's four trials per fraction."""
    method = space.params.get(METHOD_KEY)
    if space.finalists is None or not isinstance(method, search_space.Choice) or SCRATCH not in method.values:
        return space
    others = tuple(value for value in method.values if value != SCRATCH)
    if not others:
        return space
    return replace(space, params={**space.params, METHOD_KEY: search_space.Choice(others)})


def search_finished(records: list[TrialRecord], *, expected: int) -> bool:
    """Whether a search ran all its `expected` trials to an end (finished, stopped early or failed):
    one interrupted (e.g. by Ctrl+C, which Tune turns into a normal return) gets no finalists yet."""
    return len(records) >= expected and all(record.status in ("TERMINATED", "ERROR") for record in records)


def fresh_seeds(used: set[int], count: int) -> tuple[int, ...]:
    """The `count` smallest non-negative seeds not in `used` (the search's)."""
    seeds, candidate = [], 0
    while len(seeds) < count:
        if candidate not in used:
            seeds.append(candidate)
        candidate += 1
    return tuple(seeds)


def setting_key(info: SweepInfo, values: dict[str, Any]) -> str:
    """Equal for trial values that run the same setting at any seed (`stages.run_keys` at one
    seed): e.g. `scratch` at any Felzenszwalb scale."""
    return run_keys(trial_config(info, {**values, "seed": 0}), 0)[1]


def plan_finalists(records: list[TrialRecord], info: SweepInfo, *, top: int, seeds: int,
                   fractions: tuple[float, ...] | None = None) -> FinalistPlan:
    """The finalist runs of a search: per label fraction (those of `fractions`, default the
    trials'), the `top` distinct settings by mean validation metric over their search trials, plus
    `scratch` with the best setting's other values unless it is among them; each at `seeds` seeds
    that no search trial used. Fractions without a finished trial are listed in `missing`."""
    if top < 1 or seeds < 1:
        raise ValueError(f"top and seeds must be at least 1, got {top} and {seeds}")
    configs = {record.trial_id: trial_config(info, record.values) for record in records}
    finalist_seeds = fresh_seeds({config.seed for config in configs.values()}, seeds)
    if fractions is None:
        fractions = tuple(sorted({config.finetune.label_fraction for config in configs.values()}))
    runs: list[FinalistRun] = []
    missing = []
    for fraction in fractions:
        finished = [record for record in records if info.metric in record.metrics
                    and configs[record.trial_id].finetune.label_fraction == fraction]
        if not finished:
            missing.append(fraction)
            continue
        ranked = [setting_values(group[0]) for group in _ranked_settings(finished, info)[:top]]
        roles = [SCRATCH if _method(info, values) == SCRATCH else f"search #{rank}" for rank, values in enumerate(ranked, 1)]
        if SCRATCH not in roles:  # the baseline, fine-tuned as the best setting is
            ranked.append({**ranked[0], METHOD_KEY: SCRATCH})
            roles.append(SCRATCH)
        for values, role in zip(ranked, roles):
            for seed in finalist_seeds:
                runs.append(FinalistRun(index=len(runs), label_fraction=fraction, role=role, setting=values, seed=seed))
    return FinalistPlan(top=top, seeds=finalist_seeds, runs=tuple(runs), missing=tuple(missing))


def _ranked_settings(finished: list[TrialRecord], info: SweepInfo) -> list[list[TrialRecord]]:
    """Finished trials grouped by setting, best group first (mean metric over its distinct runs;
    ties keep the search's order), each group best trial first."""
    sign = -1.0 if info.mode == "max" else 1.0
    groups: dict[str, list[TrialRecord]] = {}
    for record in finished:
        groups.setdefault(setting_key(info, record.values), []).append(record)

    def mean(group: list[TrialRecord]) -> float:
        by_seed = {trial_config(info, record.values).seed: record.metrics[info.metric] for record in group}
        return float(np.mean(list(by_seed.values())))

    ranked = sorted(groups.values(), key=lambda group: sign * mean(group))
    return [sorted(group, key=lambda record: sign * record.metrics[info.metric]) for group in ranked]


def _method(info: SweepInfo, values: dict[str, Any]) -> str:
    return trial_config(info, values).pretrain.method


def setting_values(record: TrialRecord) -> dict[str, Any]:
    """A trial's setting: its values without the run seed."""
    return {key: value for key, value in record.values.items() if key != "seed"}


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its Student-t confidence interval over independent runs;
    the bounds are NaN for fewer than two values."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if values.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size))
    return mean, mean - half, mean + half


def finalists_table(plan: FinalistPlan, outcomes: dict[int, dict], info: SweepInfo) -> pd.DataFrame:
    """One row per finalist setting and label fraction, best mean validation first within each
    fraction: its parameters, the runs finished, mean and 95% t-interval of the metric on the
    validation and on the test volumes, the paired difference to scratch on each (over the seeds
    both finished), and `chosen` (the best mean validation of its fraction).

    `outcomes`: finalist run index -> that trial's last report (unfinished runs may be absent);
    `models` holds each seed's fine-tuning key (`stages.finetuned_model`), None if not reported.
    """
    rows = []
    for (fraction, role), runs in _group_runs(plan).items():
        finished = {run.seed: outcomes[run.index] for run in runs
                    if info.metric in outcomes.get(run.index, {}) and test_metric(info.metric) in outcomes[run.index]}
        flat = flatten(trial_config(info, runs[0].values).to_dict())
        row = {"label_fraction": fraction, "role": role}
        row |= {column: flat[path] for column, path in PARAMETER_COLUMNS.items() if column not in ("label_fraction", "seed")}
        row |= {"runs": len(finished), "planned": len(runs), "seeds": " ".join(map(str, sorted(finished)))}
        for part, name in (("validation", info.metric), ("test", test_metric(info.metric))):
            row[f"{part}_mean"], row[f"{part}_low"], row[f"{part}_high"] = t_interval([f[name] for f in finished.values()])
        row["scores"] = {seed: (f[info.metric], f[test_metric(info.metric)]) for seed, f in finished.items()}
        row["models"] = {seed: f.get("finetune_key") for seed, f in finished.items()}  # keys of their models
        row["setting"] = runs[0].setting
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    ascending = info.mode == "min"
    table = table.sort_values(["label_fraction", "validation_mean"], ascending=[True, ascending], na_position="last",
                              kind="stable").reset_index(drop=True)
    table["rank"] = table.groupby("label_fraction").cumcount() + 1
    table["chosen"] = (table["rank"] == 1) & (table["runs"] > 0)
    for part, position in (("validation", 0), ("test", 1)):
        gains = [_paired_gain(row, table, position) for _, row in table.iterrows()]
        table[f"gain_{part}_mean"], table[f"gain_{part}_low"], table[f"gain_{part}_high"] = zip(*gains) if gains else ((), (), ())
    return table


def _group_runs(plan: FinalistPlan) -> dict[tuple[float, str], list[FinalistRun]]:
    groups: dict[tuple[float, str], list[FinalistRun]] = {}
    for run in plan.runs:
        groups.setdefault((run.label_fraction, run.role), []).append(run)
    return groups


def _paired_gain(row, table: pd.DataFrame, position: int) -> tuple[float, float, float]:
    """The difference of a finalist to scratch at its label fraction, seed by seed, as a t-interval."""
    scratch = table[(table["label_fraction"] == row["label_fraction"]) & (table["role"] == SCRATCH)]
    if scratch.empty or row["role"] == SCRATCH:
        return math.nan, math.nan, math.nan
    theirs = scratch.iloc[0]["scores"]
    return t_interval([scores[position] - theirs[seed][position] for seed, scores in row["scores"].items() if seed in theirs])


@dataclass(frozen=True)
class Choice:
    """The choice at one label fraction, and whether the runner-up can be told apart from it."""

    label_fraction: float
    chosen: pd.Series  # its row of the finalists table
    complete: bool  # every finalist run of the fraction finished
    runner_up: pd.Series | None
    difference: tuple[float, float, float]  # chosen - runner-up on validation, paired over seeds: mean, low, high

    @property
    def distinguishable(self) -> bool:
        """The 95% interval of the paired validation difference to the runner-up excludes zero."""
        _, low, high = self.difference
        return not (math.isnan(low) or low <= 0 <= high)


def choices(table: pd.DataFrame) -> list[Choice]:
    """The chosen finalist of each label fraction (best mean validation metric), with the paired
    difference to the runner-up."""
    found = []
    for fraction, rows in table.groupby("label_fraction", sort=True):
        rows = rows[rows["runs"] > 0]
        if rows.empty:
            continue
        chosen = rows.iloc[0]
        runner_up = rows.iloc[1] if len(rows) > 1 else None
        difference = (math.nan, math.nan, math.nan)
        if runner_up is not None:
            theirs = runner_up["scores"]
            difference = t_interval([scores[0] - theirs[seed][0] for seed, scores in chosen["scores"].items()
                                     if seed in theirs])
        complete = bool((table.loc[table["label_fraction"] == fraction, "runs"]
                         == table.loc[table["label_fraction"] == fraction, "planned"]).all())
        found.append(Choice(float(fraction), chosen, complete, runner_up, difference))
    return found


def chosen_numbers(choice: Choice, metric: str) -> dict:
    """What is saved next to a chosen config: how it was chosen and its numbers with intervals."""
    row = choice.chosen

    def interval(prefix: str) -> dict:
        return {"mean": _plain(row[f"{prefix}_mean"]), "ci95": [_plain(row[f"{prefix}_low"]), _plain(row[f"{prefix}_high"])]}

    numbers = {
        "label_fraction": choice.label_fraction,
        "metric": metric,
        "chosen_by": f"mean validation {metric} over {row['runs']} finalist seeds (never by test)",
        "role": row["role"],
        "setting": row["setting"],
        "seeds": [int(seed) for seed in sorted(row["scores"])],
        "validation": interval("validation") | {"per_seed": [row["scores"][s][0] for s in sorted(row["scores"])]},
        "test": interval("test") | {"per_seed": [row["scores"][s][1] for s in sorted(row["scores"])]},
        "gain_over_scratch": {"validation": interval("gain_validation"), "test": interval("gain_test")},
        "complete": choice.complete,
    }
    if choice.runner_up is not None:
        mean, low, high = choice.difference
        numbers["runner_up"] = {"role": choice.runner_up["role"], "setting": choice.runner_up["setting"],
                                "validation_difference": {"mean": _plain(mean), "ci95": [_plain(low), _plain(high)]},
                                "distinguishable": choice.distinguishable}
    return numbers


def _plain(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def interval_text(mean: float, low: float, high: float, *, signed: bool = False) -> str:
    """'0.671 [0.650, 0.692]'; the mean alone when there is no interval, '' when there is no mean."""
    if mean is None or math.isnan(mean):
        return ""
    form = "{:+.3f}" if signed else "{:.3f}"
    text = form.format(mean)
    return text if math.isnan(low) else f"{text} [{form.format(low)}, {form.format(high)}]"


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The finalists table as a reader compares it: parameters that differ, runs, and each
    number as mean [95% interval]."""
    varying = [column for column in PARAMETER_COLUMNS if column in table.columns and column != "label_fraction"
               and (column == "method" or table[column].astype(str).nunique() > 1)]
    shown = table[["label_fraction", "rank", "role", *varying]].copy()
    shown["chosen"] = table["chosen"].map({True: "<-", False: ""})
    shown["runs"] = table["runs"].astype(str) + "/" + table["planned"].astype(str)
    for part, title in (("validation", "validation"), ("test", "test"), ("gain_test", "test gain over scratch"),
                        ("gain_validation", "validation gain over scratch")):
        shown[title] = [interval_text(row[f"{part}_mean"], row[f"{part}_low"], row[f"{part}_high"],
                                      signed=part.startswith("gain")) for _, row in table.iterrows()]
    return shown


def choice_lines(found: list[Choice], metric: str) -> list[str]:
    """One line per label fraction: what was chosen, its numbers, and whether the runner-up differs."""
    lines = []
    for choice in found:
        row = choice.chosen
        line = (f"label fraction {choice.label_fraction}: chose {row['role']} ({row['method']}) by mean validation "
                f"{metric} over {row['runs']} seeds; validation {interval_text(row['validation_mean'], row['validation_low'], row['validation_high'])}, "
                f"test {interval_text(row['test_mean'], row['test_low'], row['test_high'])}")
        if row["role"] != SCRATCH:
            gain = interval_text(row["gain_test_mean"], row["gain_test_low"], row["gain_test_high"], signed=True)
            line += f", test gain over scratch {gain or 'n/a'}"
        if choice.runner_up is not None:
            verdict = "distinguishable" if choice.distinguishable else "not distinguishable"
            line += (f"; runner-up {choice.runner_up['role']} ({choice.runner_up['method']}): validation difference "
                     f"{interval_text(*choice.difference, signed=True)}, {verdict} at 95%")
        if not choice.complete:
            line += " (finalist runs still missing: rerun `lrc-ray finalists` to finish them)"
        lines.append(line)
    return lines


def write_finalists(table: pd.DataFrame, found: list[Choice], info: SweepInfo, out_dir, chosen_configs: dict,
                    stage_root=None) -> dict:
    """Write finalists.csv, finalists.md, test_dice_vs_label_fraction.png and, next to each chosen
    config (`chosen_configs`: label fraction -> its YAML path), its numbers as JSON and, with the
    sweep's `stage_root`, its model (`keep_chosen_model`)."""
    from pathlib import Path

    from lrc_ray.atomic import atomic_write_path, write_json_atomic
    from lrc_ray.results import markdown_table

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = table.drop(columns=["scores", "models"]).assign(setting=table["setting"].map(_setting_text))
    with atomic_write_path(out_dir / "finalists.csv") as tmp:
        plain.to_csv(tmp, index=False)
    shown = display_table(table)
    with atomic_write_path(out_dir / "finalists.md") as tmp:
        tmp.write_text(f"Finalists: {info.metric}, mean [95% t-interval] over seeds\n\n" + markdown_table(shown) + "\n\n"
                       + "\n".join(f"- {line}" for line in choice_lines(found, info.metric)) + "\n")
    numbers, models = {}, {}
    for choice in found:
        path = chosen_configs.get(choice.label_fraction)
        if path is not None:
            numbers[choice.label_fraction] = Path(path).with_suffix(".json")
            kept = keep_chosen_model(choice, info, stage_root, Path(path).with_suffix(".pt")) if stage_root else None
            write_json_atomic(numbers[choice.label_fraction], chosen_numbers(choice, info.metric) | {"model": kept})
            if kept is not None:
                models[choice.label_fraction] = Path(kept["file"])
    plots = [out_dir / "test_dice_vs_label_fraction.png"] if _plot_test_dice(table, info, out_dir / "test_dice_vs_label_fraction.png") else []
    return {"finalists": table, "finalists_shown": shown, "choices": found, "numbers": numbers, "models": models,
            "finalist_plots": plots}


def keep_chosen_model(choice: Choice, info: SweepInfo, stage_root, target) -> dict | None:
    """Copy the model of the chosen setting's best seed by validation (never by test) from the
    sweep's stage outputs to `target`, atomically; returns where it came from and its numbers, or
    None when no finished run of the setting left a model (e.g. a sweep from before models were kept).
    Every seed's model stays under the stage root (`all_seeds`)."""
    import shutil
    from pathlib import Path

    from lrc_ray.atomic import atomic_write_path
    from lrc_ray.storage import local_input

    row = choice.chosen
    models = {seed: finetuned_model(stage_root, key) for seed, key in row["models"].items() if key}
    models = {seed: path for seed, path in models.items() if path.is_file()}
    if not models:
        return None
    sign = 1.0 if info.mode == "max" else -1.0
    seed = max(models, key=lambda candidate: sign * row["scores"][candidate][0])
    with local_input(models[seed]) as source, atomic_write_path(target) as tmp:
        shutil.copyfile(source, tmp)
    validation, test = row["scores"][seed]
    return {"file": str(Path(target).resolve()), "seed": int(seed), "chosen_among_seeds_by": f"validation {info.metric}",
            "validation": validation, "test": test, "source": str(models[seed]),
            "all_seeds": {str(s): str(path) for s, path in sorted(models.items())}}


def _setting_text(setting: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in setting.items())


def _plot_test_dice(table: pd.DataFrame, info: SweepInfo, path) -> bool:
    """Test metric vs label fraction, one line per method (its finalist with the best mean
    validation at each fraction), the 95% interval as error bars: the paper's figure."""
    finished = table[table["runs"] > 0]
    if finished.empty:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lrc_ray.results import save_label_fraction_plot

    best = finished.groupby(["method", "label_fraction"], sort=True).head(1).sort_values("label_fraction")
    figure, axes = plt.subplots(figsize=(6, 4))
    for method, rows in best.groupby("method"):
        low = (rows["test_mean"] - rows["test_low"]).fillna(0).to_numpy()
        high = (rows["test_high"] - rows["test_mean"]).fillna(0).to_numpy()
        axes.errorbar(rows["label_fraction"], rows["test_mean"], yerr=[low, high], marker="o", capsize=4, label=method)
    save_label_fraction_plot(figure, axes, ylabel=f"test {info.metric}", path=path,
                             title="Finalists: test Dice vs label fraction (95% interval over seeds)")
    return True
