"""The plain results layer: tables, the best trial per group, the files and plots it writes."""

import math
import sys

import pandas as pd
import pytest

from lrc_ray.config import RunConfig, load_config
from lrc_ray.errors import UserInputError
from lrc_ray.results import (
    PARAMETER_COLUMNS,
    SweepInfo,
    TrialRecord,
    best_per_group,
    markdown_table,
    parameter_importance,
    results_table,
    summary_columns,
    trial_config,
    write_results,
)
from lrc_ray.search_space import parse_search_space

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASE = RunConfig().replace(data={"sigma": 0.5, "min_size": 30}).to_dict()


def _info(mode="max", fixed=None):
    return SweepInfo(metric="dice_mean", mode=mode, base=BASE, fixed={"pretrain.epochs": 2} if fixed is None else fixed)


def _values(method, scale, fraction):
    return {"pretrain.method": method, "data.scale": scale, "finetune.label_fraction": fraction}


def _finished(trial_id, method, scale, fraction, dice, probe=0.4, epoch=2):
    metrics = {"dice_mean": dice, "dice/liver": dice + 0.1, "dice/spleen": dice - 0.1, "epoch": epoch}
    if probe is not None:
        metrics["probe_dice"] = probe
    return TrialRecord(trial_id, "TERMINATED", _values(method, scale, fraction), metrics, None)


def _records():
    return [
        _finished("t1", "lrc", 50, 0.25, 0.6, probe=0.41),
        # ASHA stopped it after one pre-training epoch: no fine-tuning metric.
        TrialRecord("t5", "TERMINATED", _values("lrc", 50, 0.25), {"probe_dice": 0.1, "epoch": 1}, None),
        _finished("t2", "global+lrc", 100, 0.25, 0.7, probe=0.45),
        TrialRecord("t6", "ERROR", _values("global+lrc", 50, 1.0), {}, "boom"),
        _finished("t3", "lrc", 100, 1.0, 0.8, probe=0.5),
        _finished("t4", "scratch", 50, 1.0, 0.65, probe=None, epoch=0),
    ]


def _space():
    return parse_search_space(
        {
            "space": {
                "pretrain.method": {"choice": ["lrc", "global+lrc", "scratch"]},
                "data.scale": {"choice": [50, 100]},
                "finetune.label_fraction": {"choice": [0.25, 1.0]},
                "pretrain.epochs": 2,
            }
        },
        source="test_space",
    )


# --- trial_config ---------------------------------------------------------------------------


def test_trial_config_is_base_then_fixed_then_values():
    config = trial_config(_info(), _values("lrc", 50, 0.25))
    assert config.pretrain.method == "lrc"
    assert config.data.scale == 50.0
    assert config.finetune.label_fraction == 0.25
    assert config.pretrain.epochs == 2, "the fixed value is applied"
    assert (config.data.sigma, config.data.min_size) == (0.5, 30), "untouched keys come from the base"
    # A sampled value wins over a fixed one.
    assert trial_config(_info(), {"pretrain.epochs": 5}).pretrain.epochs == 5


def test_trial_config_rejects_bad_values():
    with pytest.raises(UserInputError, match="pretrain.method"):
        trial_config(_info(), {"pretrain.method": "nope"})


# --- results_table --------------------------------------------------------------------------


def test_results_table_sorts_best_first_and_unfinished_last():
    table = results_table(_records(), _info())
    assert list(table["trial_id"]) == ["t3", "t2", "t4", "t1", "t5", "t6"]
    assert table["dice_mean"].iloc[:4].tolist() == [0.8, 0.7, 0.65, 0.6]
    assert table["dice_mean"].iloc[4:].isna().all()
    assert len(table) == 6


def test_results_table_columns_come_from_values_base_and_fixed():
    table = results_table(_records(), _info()).set_index("trial_id")
    assert set(PARAMETER_COLUMNS) <= set(table.columns)
    assert table.loc["t2", "method"] == "global+lrc"
    assert table.loc["t2", "scale"] == 100.0
    assert table.loc["t1", "scale"] == 50.0
    assert table.loc["t1", "label_fraction"] == 0.25
    assert table.loc["t3", "label_fraction"] == 1.0
    # Not searched: from the base config.
    assert (table["sigma"] == 0.5).all()
    assert (table["min_size"] == 30).all()
    assert (table["temperature"] == RunConfig().pretrain.temperature).all()
    # A fixed value that is a table column is applied too.
    fixed_table = results_table(_records(), _info(fixed={"pretrain.temperature": 0.07}))
    assert (fixed_table["temperature"] == 0.07).all()


def test_results_table_progress_columns():
    table = results_table(_records(), _info()).set_index("trial_id")
    assert table["stopped_early"].to_dict() == {
        "t3": False, "t2": False, "t4": False, "t1": False, "t5": True, "t6": False,
    }
    assert table["epochs"].to_dict() == {"t3": 2, "t2": 2, "t4": 0, "t1": 2, "t5": 1, "t6": 0}
    assert table.loc["t5", "probe_dice"] == 0.1
    assert table.loc["t1", "probe_dice"] == 0.41
    assert pd.isna(table.loc["t4", "probe_dice"]), "scratch reports no probe"
    assert table.loc["t3", "dice/liver"] == pytest.approx(0.9)
    assert table.loc["t3", "dice/spleen"] == pytest.approx(0.7)
    assert pd.isna(table.loc["t5", "dice/liver"])
    assert table.loc["t6", "error"] == "boom"
    assert table.loc["t6", "status"] == "ERROR"
    assert table.loc["t3", "error"] is None or pd.isna(table.loc["t3", "error"])


def test_the_moco_methods_global_top1_is_a_column_shown_when_a_trial_has_it():
    records = _records()
    records[2].metrics["global_top1"] = 0.06  # t2, global+lrc: its global branch collapsed
    table = results_table(records, _info()).set_index("trial_id")
    assert table.loc["t2", "global_top1"] == 0.06
    assert pd.isna(table.loc["t1", "global_top1"]), "lrc has no global branch"
    assert "global_top1" in summary_columns(table.reset_index(), "dice_mean")
    assert "global_top1" not in summary_columns(results_table(_records(), _info()), "dice_mean")


def test_results_table_nan_probe_is_missing():
    record = TrialRecord("t", "TERMINATED", _values("lrc", 50, 0.25), {"probe_dice": float("nan"), "epoch": 1}, None)
    table = results_table([record], _info())
    assert pd.isna(table.loc[0, "probe_dice"])


def test_results_table_mode_min_reverses_order_nan_still_last():
    table = results_table(_records(), _info(mode="min"))
    assert list(table["trial_id"]) == ["t1", "t4", "t2", "t3", "t5", "t6"]


def test_results_table_without_records_is_a_user_error():
    with pytest.raises(UserInputError, match="no trials"):
        results_table([], _info())


def test_results_table_when_no_trial_finished():
    records = [r for r in _records() if r.trial_id in ("t5", "t6")]
    table = results_table(records, _info())
    assert list(table["trial_id"]) == ["t5", "t6"]
    assert table["dice_mean"].isna().all()
    assert best_per_group(table, "dice_mean", "max", "label_fraction").empty


# --- best_per_group -------------------------------------------------------------------------


def test_best_per_group_picks_the_best_of_each_label_fraction():
    table = results_table(_records(), _info())
    best = best_per_group(table, "dice_mean", "max", "label_fraction")
    assert list(best["label_fraction"]) == [0.25, 1.0]
    assert list(best["trial_id"]) == ["t2", "t3"]
    worst = best_per_group(table, "dice_mean", "min", "label_fraction")
    assert list(worst["trial_id"]) == ["t1", "t4"]


def test_best_per_group_by_method():
    table = results_table(_records(), _info())
    best = best_per_group(table, "dice_mean", "max", "method").set_index("method")["trial_id"].to_dict()
    assert best == {"global+lrc": "t2", "lrc": "t3", "scratch": "t4"}


def _run(trial_id, method, seed, dice):
    values = {**_values(method, 50, 1.0), "seed": seed}
    return TrialRecord(trial_id, "TERMINATED", values, {"dice_mean": dice, "epoch": 2, "probe_dice": 0.4}, None)


def test_best_per_group_ranks_settings_run_at_several_seeds_by_their_mean():
    # lrc has the best single run (0.70) but global+lrc the better mean (0.645 against 0.60).
    records = [_run("a0", "lrc", 0, 0.70), _run("a1", "lrc", 1, 0.50),
               _run("b0", "global+lrc", 0, 0.64), _run("b1", "global+lrc", 1, 0.65), _run("c0", "scratch", 0, 0.62)]
    table = results_table(records, _info())
    best = best_per_group(table, "dice_mean", "max", "label_fraction").iloc[0]
    assert best["trial_id"] == "b1", "the best run of the best setting"
    assert (best["runs"], best["dice_mean_mean"]) == (2, pytest.approx(0.645))
    assert best["dice_mean_sd"] == pytest.approx(0.00707, abs=1e-4)
    # The sampler drawing a point twice at one seed is one run, not two.
    repeated = results_table([_run("a0", "lrc", 0, 0.70), _run("a0bis", "lrc", 0, 0.70)], _info())
    assert best_per_group(repeated, "dice_mean", "max", "label_fraction").iloc[0]["runs"] == 1
    # Per seed, each setting has one run: the single best wins.
    assert best_per_group(table, "dice_mean", "max", "seed").set_index("seed")["trial_id"].to_dict() == {0: "a0", 1: "b1"}
    # The seed column is shown when seeds differ, and not when all trials share one.
    assert "seed" in summary_columns(table, "dice_mean")
    assert "seed" not in summary_columns(results_table(_records(), _info()), "dice_mean")


def test_best_per_group_unknown_column_is_a_user_error():
    table = results_table(_records(), _info())
    with pytest.raises(UserInputError, match="--by colour"):
        best_per_group(table, "dice_mean", "max", "colour")


# --- write_results --------------------------------------------------------------------------


def test_write_results_writes_tables_configs_and_plots(tmp_path):
    records = _records()
    info = _info()
    out = tmp_path / "out"
    written = write_results(records, info, out, space=_space())

    parquet = pd.read_parquet(out / "results.parquet")
    assert list(parquet["trial_id"]) == ["t3", "t2", "t4", "t1", "t5", "t6"]
    assert parquet["dice_mean"].iloc[:4].tolist() == [0.8, 0.7, 0.65, 0.6]
    assert list(parquet.columns) == list(written["table"].columns)

    csv = pd.read_csv(out / "results.csv")
    assert list(csv["trial_id"]) == list(parquet["trial_id"])
    assert csv["stopped_early"].tolist() == parquet["stopped_early"].tolist()

    markdown = (out / "results.md").read_text().splitlines()
    assert markdown[0].startswith("| trial_id | status |")
    assert set(markdown[1].replace(" ", "")) <= set("|-")
    assert markdown[1].count("---") == len(parquet.columns)
    assert len(markdown) == 2 + len(parquet)
    assert markdown[2].startswith("| t3 | TERMINATED |")

    by_id = {r.trial_id: r for r in records}
    assert sorted(p.name for p in out.glob("best_config_*.yaml")) == [
        "best_config_label_fraction_0.25.yaml", "best_config_label_fraction_1.yaml",
    ]
    for name, trial_id in [("0.25", "t2"), ("1", "t3")]:
        loaded = load_config(out / f"best_config_label_fraction_{name}.yaml")
        expected = trial_config(info, by_id[trial_id].values)
        assert loaded.to_dict() == expected.to_dict()
        assert loaded.pretrain.epochs == 2
    assert set(written["chosen"]) == {0.25, 1.0}
    assert written["chosen"][0.25] == out / "best_config_label_fraction_0.25.yaml"
    assert list(written["best"]["trial_id"]) == ["t2", "t3"]

    for plot in ("dice_vs_label_fraction.png", "parameter_importance.png"):
        assert (out / plot).read_bytes()[:8] == PNG_SIGNATURE, plot
        assert out / plot in written["plots"]
    assert not list(out.glob(".*")) and not list(out.glob("*.tmp*")), "no temp files left behind"


def test_write_results_without_space_has_no_importance_plot(tmp_path):
    written = write_results(_records(), _info(), tmp_path)
    assert (tmp_path / "dice_vs_label_fraction.png").is_file()
    assert not (tmp_path / "parameter_importance.png").exists()
    assert written["plots"] == [tmp_path / "dice_vs_label_fraction.png"]


def test_write_results_by_method_names_files_without_plus(tmp_path):
    written = write_results(_records(), _info(), tmp_path, by="method")
    names = sorted(p.name for p in tmp_path.glob("best_config_*.yaml"))
    assert names == ["best_config_method_global_lrc.yaml", "best_config_method_lrc.yaml", "best_config_method_scratch.yaml"]
    assert load_config(tmp_path / "best_config_method_global_lrc.yaml").pretrain.method == "global+lrc"
    assert set(written["chosen"]) == {"global+lrc", "lrc", "scratch"}


def test_write_results_when_nothing_finished_writes_tables_only(tmp_path):
    records = [r for r in _records() if r.trial_id in ("t5", "t6")]
    written = write_results(records, _info(), tmp_path, space=_space())
    assert (tmp_path / "results.parquet").is_file() and (tmp_path / "results.csv").is_file()
    assert not list(tmp_path.glob("best_config_*.yaml"))
    assert written["plots"] == [] and written["chosen"] == {}
    assert not (tmp_path / "dice_vs_label_fraction.png").exists()


# --- parameter_importance -------------------------------------------------------------------


def test_parameter_importance_over_the_searched_keys():
    importances = parameter_importance(_records(), _info(), _space())
    assert set(importances) == {"pretrain.method", "data.scale", "finetune.label_fraction"}
    assert all(value >= 0 for value in importances.values())
    assert math.isclose(sum(importances.values()), 1.0, rel_tol=1e-6)


def test_parameter_importance_needs_no_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` raises ImportError
    assert set(parameter_importance(_records(), _info(), _space())) == {"pretrain.method", "data.scale",
                                                                        "finetune.label_fraction"}


def test_parameter_importance_needs_two_finished_trials():
    records = [r for r in _records() if r.trial_id in ("t1", "t5", "t6")]
    assert parameter_importance(records, _info(), _space()) == {}
    assert parameter_importance([], _info(), _space()) == {}


# --- markdown_table / summary_columns -------------------------------------------------------


def test_markdown_table_escapes_pipes_and_formats_floats():
    table = pd.DataFrame({"name": ["a|b", "c"], "value": [0.123456789, float("nan")], "count": [3, 4]})
    lines = markdown_table(table).splitlines()
    assert lines == [
        "| name | value | count |",
        "| --- | --- | --- |",
        "| a/b | 0.1235 | 3 |",
        "| c |  | 4 |",
    ]
    assert markdown_table(table, ["count", "name"]).splitlines()[0] == "| count | name |"
    assert markdown_table(table, ["count", "name"]).splitlines()[2] == "| 3 | a/b |"


def test_summary_columns_lists_only_existing_columns_in_order():
    table = results_table(_records(), _info())
    columns = summary_columns(table, "dice_mean")
    assert columns[0] == "trial_id"
    assert columns[-1] == "status"
    assert columns.index("label_fraction") < columns.index("dice_mean") < columns.index("probe_dice")
    assert "error" not in columns and "dice/liver" not in columns
    assert all(column in table.columns for column in columns)
    assert len(columns) == len(set(columns))
    small = pd.DataFrame({"trial_id": ["x"], "method": ["lrc"], "loss": [1.0], "status": ["ERROR"]})
    assert summary_columns(small, "loss") == ["trial_id", "method", "loss", "status"]
    assert summary_columns(small, "dice_mean") == ["trial_id", "method", "status"]


def test_the_chosen_configuration_line_gives_the_mean_over_seeds(tmp_path, capsys):
    from lrc_ray.cli import _print_results

    records = [_run("a0", "lrc", 0, 0.70), _run("a1", "lrc", 1, 0.50),
               _run("b0", "global+lrc", 0, 0.64), _run("b1", "global+lrc", 1, 0.65)]
    info = _info()
    written = write_results(records, info, tmp_path) | {"out_dir": tmp_path, "metric": info.metric, "mode": info.mode,
                                                        "by": "label_fraction", "finalists": None, "missing": ()}
    _print_results(written, top=5)
    out = capsys.readouterr().out
    assert "chosen configuration (dice_mean 0.645 +- 0.007 over 2 seeds, label_fraction 1.0)" in out
    assert load_config(written["chosen"][1.0]).pretrain.method == "global+lrc"
