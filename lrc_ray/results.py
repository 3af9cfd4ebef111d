"""Sweep results: one row per trial, the best setting per label fraction, files and plots.

Plain layer: it works on `TrialRecord`s that the Ray layer reads with Tune's own API
(`distributed.tune.read_trials`), so it is tested without Ray. A trial's full run config is
rebuilt from the sweep's base config plus its sampled values, which is also what the chosen
config files hold: `lrc-ray pretrain --config best_config_*.yaml` takes them unchanged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lrc_ray.atomic import atomic_write_path
from lrc_ray.config import RunConfig, save_config
from lrc_ray.errors import UserInputError

logger = logging.getLogger(__name__)

# Table column -> run-config path: the hyper-parameters a reader compares.
PARAMETER_COLUMNS = {
    "method": "pretrain.method",
    "scale": "data.scale",
    "sigma": "data.sigma",
    "min_size": "data.min_size",
    "S": "pretrain.regions_per_image",
    "M": "pretrain.pixels_per_region",
    "temperature": "pretrain.temperature",
    "w_global": "pretrain.w_global",
    "w_local": "pretrain.w_local",
    "label_fraction": "finetune.label_fraction",
    "seed": "seed",
}
# Trials that differ only in their seed are runs of one setting (a space with `seed: {choice: ...}`).
SETTING_COLUMNS = tuple(column for column in PARAMETER_COLUMNS if column != "seed")


@dataclass(frozen=True)
class TrialRecord:
    trial_id: str
    status: str  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    values: dict[str, Any]  # the trial's sampled values, dotted run-config keys
    metrics: dict[str, Any]  # its last reported result
    error: str | None


@dataclass(frozen=True)
class SweepInfo:
    """What the sweep recorded when it started (`lrc_ray_sweep.json`)."""

    metric: str
    mode: str
    base: dict
    fixed: dict


def trial_config(info: SweepInfo, values: dict[str, Any]) -> RunConfig:
    """The run config a trial ran with: base, then the fixed and sampled values."""
    from lrc_ray.search_space import config_with_values

    return config_with_values(info.base, {**info.fixed, **values}, source="trial config")


def results_table(records: list[TrialRecord], info: SweepInfo) -> pd.DataFrame:
    """One row per trial, best first (trials without the metric last)."""
    if not records:
        raise UserInputError("no trials in this sweep yet")
    rows = []
    for record in records:
        config = trial_config(info, record.values)
        flat = flatten(config.to_dict())
        finished = info.metric in record.metrics
        row = {"trial_id": record.trial_id, "status": record.status}
        row |= {column: flat[path] for column, path in PARAMETER_COLUMNS.items()}
        row[info.metric] = record.metrics.get(info.metric)
        row |= {key: value for key, value in record.metrics.items() if key.startswith("dice/")}
        row["probe_dice"] = _last_probe(record.metrics)
        # The MoCo methods' last pre-training epoch: how often a view found its partner in the
        # batch (chance 1 / batch: the global branch collapsed); empty for the other methods.
        row["global_top1"] = record.metrics.get("global_top1")
        row["epochs"] = int(record.metrics.get("epoch", 0) or 0)
        # Stopped early: ASHA ended the trial before fine-tuning reported the metric.
        row["stopped_early"] = bool(not finished and record.status == "TERMINATED")
        row["error"] = record.error
        rows.append(row)
    table = pd.DataFrame(rows)
    ascending = info.mode == "min"
    return table.sort_values(info.metric, ascending=ascending, na_position="last", kind="stable").reset_index(drop=True)


def _last_probe(metrics: dict) -> float | None:
    value = metrics.get("probe_dice")
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def best_per_group(table: pd.DataFrame, metric: str, mode: str, by: str) -> pd.DataFrame:
    """The best finished setting of each value of `by` (e.g. each label fraction), as the row of
    its best trial. A trial's Dice is one draw, so settings run at several seeds rank by their
    mean over those runs; the rows carry `runs`, `<metric>_mean` and `<metric>_sd`."""
    if by not in table.columns:
        raise UserInputError(f"--by {by}: not a column; expected one of {', '.join(PARAMETER_COLUMNS)}")
    finished = table.dropna(subset=[metric])
    if finished.empty:
        return finished
    setting = list(dict.fromkeys([by, *(column for column in SETTING_COLUMNS if column in finished.columns)]))
    # A point the sampler drew twice at one seed is one run (its fine-tuning was reused), not two.
    distinct = finished
    if "seed" in finished.columns:
        distinct = finished.drop_duplicates(list(dict.fromkeys([*setting, "seed"])))
    runs = distinct.groupby(setting, sort=False, dropna=False)[metric].agg(
        runs="count", **{f"{metric}_mean": "mean", f"{metric}_sd": "std"}
    )
    finished = finished.merge(runs.reset_index(), on=setting, how="left")
    ranked = finished.sort_values([f"{metric}_mean", metric], ascending=mode == "min", kind="stable")
    return ranked.groupby(by, sort=True).head(1).sort_values(by, kind="stable").reset_index(drop=True)


def write_results(
    records: list[TrialRecord], info: SweepInfo, out_dir: Path, *, by: str = "label_fraction", space=None,
    chosen_values: dict[Any, dict] | None = None,
) -> dict[str, Any]:
    """Write results.parquet/.csv/.md, one chosen config per group, and the plots; returns what was written.

    The chosen config of a group is its best setting's (`best_per_group`), or, with
    `chosen_values` (group -> trial values, e.g. the finalists' choice), those values'.
    """
    table = results_table(records, info)
    best = best_per_group(table, info.metric, info.mode, by)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(out_dir / "results.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    with atomic_write_path(out_dir / "results.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_write_path(out_dir / "results.md") as tmp:
        tmp.write_text(markdown_table(table) + "\n")
    if chosen_values is None:
        chosen_values = {row[by]: next(r for r in records if r.trial_id == row["trial_id"]).values
                         for _, row in best.iterrows()}
    chosen = {}
    for group, values in chosen_values.items():
        path = out_dir / f"best_config_{by}_{slug(group)}.yaml"
        save_config(trial_config(info, values), path)
        chosen[group] = path
    plots = []
    if _plot_dice_vs_label_fraction(table, info.metric, info.mode, out_dir / "dice_vs_label_fraction.png"):
        plots.append(out_dir / "dice_vs_label_fraction.png")
    if space is not None and _plot_importance(records, info, space, out_dir / "parameter_importance.png"):
        plots.append(out_dir / "parameter_importance.png")
    return {"table": table, "best": best, "chosen": chosen, "plots": plots}


def markdown_table(table: pd.DataFrame, columns: list[str] | None = None) -> str:
    shown = table[columns] if columns else table
    header = "| " + " | ".join(map(str, shown.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in shown.columns) + " |"
    body = ["| " + " | ".join(_cell(value) for value in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def summary_columns(table: pd.DataFrame, metric: str) -> list[str]:
    """The columns worth a terminal's width: parameters, the metric, progress, status."""
    wanted = ["trial_id", *PARAMETER_COLUMNS, metric, "probe_dice", "global_top1", "epochs", "stopped_early", "status"]
    if "seed" in table.columns and table["seed"].nunique() < 2:
        wanted.remove("seed")  # one seed for all: nothing to compare
    if "global_top1" in table.columns and table["global_top1"].isna().all():
        wanted.remove("global_top1")  # no trial ran a MoCo method
    return [column for column in dict.fromkeys(wanted) if column in table.columns]


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/")


def slug(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).replace("+", "_").replace("/", "_")


def flatten(nested: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _plot_dice_vs_label_fraction(table: pd.DataFrame, metric: str, mode: str, path: Path) -> bool:
    """The best metric per method at each label fraction, one line per method."""
    finished = table.dropna(subset=[metric])
    if finished.empty:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = finished.groupby(["method", "label_fraction"])[metric]
    best = (grouped.min() if mode == "min" else grouped.max()).reset_index()
    figure, axes = plt.subplots(figsize=(6, 4))
    for method, rows in best.groupby("method"):
        axes.plot(rows["label_fraction"], rows[metric], marker="o", label=method)
    save_label_fraction_plot(figure, axes, ylabel=f"best {metric}", title="Validation Dice vs label fraction", path=path)
    return True


def save_label_fraction_plot(figure, axes, *, ylabel: str, title: str, path: Path) -> None:
    """Label a plot over label fractions (one line per method) and write it as PNG (atomically)."""
    import matplotlib.pyplot as plt

    axes.set_xlabel("label fraction")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_write_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def parameter_importance(records: list[TrialRecord], info: SweepInfo, space) -> dict[str, float]:
    """Optuna's PED-ANOVA importance of each searched parameter for the metric (finished trials
    only); named explicitly: it needs nothing beyond Optuna (Optuna 4's default, fANOVA, needs
    scikit-learn)."""
    import optuna

    from lrc_ray.search_space import Choice, Fixed, LogUniform, RandInt

    distributions = {}
    for key, spec in space.params.items():
        if isinstance(spec, Fixed):
            continue
        if isinstance(spec, Choice):
            distributions[key] = optuna.distributions.CategoricalDistribution([_categorical(v) for v in spec.values])
        elif isinstance(spec, RandInt):
            distributions[key] = optuna.distributions.IntDistribution(spec.low, spec.high)
        else:
            distributions[key] = optuna.distributions.FloatDistribution(
                spec.low, spec.high, log=isinstance(spec, LogUniform)
            )
    trials = [
        optuna.trial.create_trial(
            params={key: _categorical(record.values[key]) if isinstance(space.params[key], Choice) else record.values[key]
                    for key in distributions},
            distributions=distributions,
            value=float(record.metrics[info.metric]),
        )
        for record in records
        if info.metric in record.metrics and all(key in record.values for key in distributions)
    ]
    if len(trials) < 2 or not distributions:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if info.mode == "max" else "minimize")
    study.add_trials(trials)
    try:
        return dict(optuna.importance.get_param_importances(study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()))
    except (RuntimeError, ValueError) as exc:  # e.g. every value equal
        logger.warning("parameter importance not computed: %s", exc)
        return {}


def _categorical(value: Any) -> Any:
    """Optuna's categorical choices must be scalars; a list choice (e.g. a crop range) becomes its text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _plot_importance(records, info: SweepInfo, space, path: Path) -> bool:
    importances = parameter_importance(records, info, space)
    if not importances:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(importances)[::-1]
    figure, axes = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
    axes.barh(names, [importances[name] for name in names])
    axes.set_xlabel(f"importance for {info.metric} (Optuna fANOVA)")
    figure.tight_layout()
    with atomic_write_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    return True
