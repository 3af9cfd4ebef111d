"""Finalists (plain layer): which settings are re-run at which seeds, the intervals, the choice and
the files; `lrc-ray results`' printing of them."""

import json
import math

import pytest
from scipy import stats

from lrc_ray.config import RunConfig, load_config
from lrc_ray.finalists import (
    SCRATCH, FinalistPlan, choices, finalists_table, fresh_seeds, plan_finalists, search_finished, space_to_search,
    t_interval, write_finalists,
)
from lrc_ray.results import SweepInfo, TrialRecord, write_results
from lrc_ray.search_space import Choice, Fixed, parse_search_space

BASE = RunConfig().replace(data={"test_cases": 1}).to_dict()
INFO = SweepInfo(metric="dice_mean", mode="max", base=BASE, fixed={"pretrain.epochs": 2})


def _trial(trial_id, method, scale, fraction, dice, *, seed=0, status="TERMINATED"):
    values = {"pretrain.method": method, "data.scale": scale, "finetune.label_fraction": fraction, "seed": seed}
    metrics = {} if dice is None else {"dice_mean": dice}
    return TrialRecord(trial_id, status, values, metrics, None)


def _search():
    return [
        _trial("a", "lrc", 200, 1.0, 0.70),
        _trial("b", "lrc", 50, 1.0, 0.66),
        _trial("c", "global", 50, 1.0, 0.68),
        _trial("d", "scratch", 50, 1.0, 0.60),
        _trial("e", "scratch", 200, 1.0, 0.60),  # the same run as d: scratch reads no super-pixels
        _trial("f", "lrc", 200, 0.25, 0.50),
        _trial("g", "scratch", 50, 0.25, 0.55),
        _trial("h", "global", 50, 0.25, None),  # stopped by ASHA: no Dice
    ]


# --- plan_finalists -------------------------------------------------------------------------


def test_fresh_seeds_skip_the_searchs():
    assert fresh_seeds({0}, 3) == (1, 2, 3)
    assert fresh_seeds({0, 2, 5}, 4) == (1, 3, 4, 6)
    assert fresh_seeds(set(), 2) == (0, 1)


def test_the_top_distinct_settings_per_fraction_and_scratch_at_fresh_seeds():
    plan = plan_finalists(_search(), INFO, top=2, seeds=3)
    assert plan.seeds == (1, 2, 3) and plan.missing == ()
    settings = {(run.label_fraction, run.role): run.setting for run in plan.runs}
    assert settings[(1.0, "search #1")]["data.scale"] == 200 and settings[(1.0, "search #1")]["pretrain.method"] == "lrc"
    assert settings[(1.0, "search #2")]["pretrain.method"] == "global"
    # scratch is not among the top two at 1.0: it is added, fine-tuned as the best setting is
    assert settings[(1.0, SCRATCH)] == {**settings[(1.0, "search #1")], "pretrain.method": "scratch"}
    # at 0.25 scratch is itself a top setting: not added twice
    assert sorted(role for fraction, role in settings if fraction == 0.25) == ["scratch", "search #2"]
    assert len(plan.runs) == (3 + 2) * 3
    assert all("seed" not in run.setting for run in plan.runs)
    assert [run.index for run in plan.runs] == list(range(len(plan.runs)))
    assert FinalistPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_settings_that_run_the_same_are_one_setting():
    """Scratch at two scales is one run; so a top-3 has three different runs."""
    plan = plan_finalists(_search(), INFO, top=4, seeds=1)
    at_full = [run for run in plan.runs if run.label_fraction == 1.0]
    assert [run.role for run in at_full] == ["search #1", "search #2", "search #3", "scratch"]


def test_settings_run_at_several_search_seeds_rank_by_their_mean():
    records = [_trial("a0", "lrc", 200, 1.0, 0.75, seed=0), _trial("a1", "lrc", 200, 1.0, 0.55, seed=1),
               _trial("b0", "global", 50, 1.0, 0.70, seed=0), _trial("b1", "global", 50, 1.0, 0.68, seed=1)]
    plan = plan_finalists(records, INFO, top=1, seeds=2)
    assert plan.runs[0].setting["pretrain.method"] == "global"
    assert plan.seeds == (2, 3), "seeds no search trial used"


def test_a_fraction_without_a_finished_trial_is_named_and_the_others_go_on():
    records = [_trial("a", "lrc", 200, 1.0, 0.7), _trial("b", "lrc", 50, 0.25, None)]
    plan = plan_finalists(records, INFO, top=1, seeds=1, fractions=(0.1, 0.25, 1.0))
    assert plan.missing == (0.1, 0.25)
    assert {run.label_fraction for run in plan.runs} == {1.0}


def test_minimising_metrics_rank_the_other_way():
    info = SweepInfo(metric="dice_mean", mode="min", base=BASE, fixed={})
    plan = plan_finalists(_search(), info, top=1, seeds=1)
    assert [run.setting["pretrain.method"] for run in plan.runs if run.label_fraction == 1.0] == ["scratch"]


def _space(method, finalists=True):
    raw = {"base": {"data": {"test_cases": 1}}, "space": {"pretrain.method": method, "data.scale": {"choice": [50, 200]}}}
    return parse_search_space(raw | ({"finalists": {"top": 1, "seeds": 2}} if finalists else {}), source="space")


def test_the_search_leaves_scratch_to_the_finalists():
    searched = space_to_search(_space({"choice": ["scratch", "lrc", "global"]}))
    assert searched.params["pretrain.method"] == Choice(("lrc", "global"))
    assert searched.params["data.scale"] == Choice((50, 200))


def test_scratch_is_searched_when_no_finalists_run_it_or_it_is_all_there_is():
    for space in (_space({"choice": ["scratch", "lrc"]}, finalists=False), _space({"choice": ["scratch"]}),
                  _space("scratch"), _space({"choice": ["lrc", "global"]})):
        assert space_to_search(space) == space
    assert space_to_search(_space("scratch")).params["pretrain.method"] == Fixed("scratch")


def test_an_interrupted_search_gets_no_finalists_yet():
    records = _search()
    assert search_finished(records, expected=len(records))
    assert not search_finished(records, expected=len(records) + 1), "trials not yet started"
    running = [*records[:-1], _trial("h", "global", 50, 0.25, None, status="RUNNING")]
    assert not search_finished(running, expected=len(records))
    failed = [*records[:-1], _trial("h", "global", 50, 0.25, None, status="ERROR")]
    assert search_finished(failed, expected=len(records))


# --- t_interval -----------------------------------------------------------------------------


def test_t_interval_against_its_formula():
    mean, low, high = t_interval([0.60, 0.64, 0.65])
    sd = math.sqrt(((0.60 - 0.63) ** 2 + (0.64 - 0.63) ** 2 + (0.65 - 0.63) ** 2) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert mean == pytest.approx(0.63) and low == pytest.approx(0.63 - half) and high == pytest.approx(0.63 + half)
    assert stats.t.ppf(0.975, 2) == pytest.approx(4.302652729911275)


def test_t_interval_of_one_or_no_value_has_no_bounds():
    mean, low, high = t_interval([0.5])
    assert mean == 0.5 and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(value) for value in t_interval([]))


# --- finalists_table / choices ----------------------------------------------------------------


def _outcomes(plan, scores):
    """scores: (fraction, role) -> {seed: (validation, test)}."""
    outcomes = {}
    for run in plan.runs:
        pair = scores.get((run.label_fraction, run.role), {}).get(run.seed)
        if pair is not None:
            outcomes[run.index] = {"dice_mean": pair[0], "test_dice_mean": pair[1]}
    return outcomes


def _scored():
    plan = plan_finalists(_search(), INFO, top=2, seeds=3)
    scores = {
        (1.0, "search #1"): {1: (0.66, 0.70), 2: (0.67, 0.72), 3: (0.68, 0.71)},
        (1.0, "search #2"): {1: (0.68, 0.60), 2: (0.69, 0.61), 3: (0.70, 0.62)},  # best on validation, worse on test
        (1.0, SCRATCH): {1: (0.60, 0.60), 2: (0.62, 0.61), 3: (0.61, 0.65)},
        (0.25, "search #2"): {1: (0.50, 0.50), 2: (0.52, 0.50)},  # one run not finished yet
        (0.25, SCRATCH): {1: (0.51, 0.49), 2: (0.50, 0.52), 3: (0.52, 0.51)},
    }
    return plan, finalists_table(plan, _outcomes(plan, scores), INFO)


def test_the_choice_is_by_mean_validation_never_by_test():
    _, table = _scored()
    full = table[table["label_fraction"] == 1.0]
    assert list(full["role"]) == ["search #2", "search #1", "scratch"]
    assert list(full["chosen"]) == [True, False, False]
    chosen = full.iloc[0]
    assert chosen["validation_mean"] == pytest.approx(0.69) and chosen["test_mean"] == pytest.approx(0.61)
    mean, low, high = t_interval([0.60, 0.61, 0.62])
    assert (chosen["test_low"], chosen["test_high"]) == (pytest.approx(low), pytest.approx(high))
    assert chosen["runs"] == 3 and chosen["planned"] == 3 and chosen["seeds"] == "1 2 3"


def test_the_gain_over_scratch_is_paired_seed_by_seed():
    _, table = _scored()
    first = table[(table["label_fraction"] == 1.0) & (table["role"] == "search #1")].iloc[0]
    mean, low, high = t_interval([0.70 - 0.60, 0.72 - 0.61, 0.71 - 0.65])
    assert (first["gain_test_mean"], first["gain_test_low"], first["gain_test_high"]) == (
        pytest.approx(mean), pytest.approx(low), pytest.approx(high))
    assert first["gain_validation_mean"] == pytest.approx(0.06)
    scratch = table[table["role"] == SCRATCH]
    assert scratch["gain_test_mean"].isna().all()
    # at 0.25 the finalist finished seeds 1 and 2 only: paired over those
    quarter = table[(table["label_fraction"] == 0.25) & (table["role"] == "search #2")].iloc[0]
    assert quarter["runs"] == 2 and quarter["gain_test_mean"] == pytest.approx(((0.50 - 0.49) + (0.50 - 0.52)) / 2)


def test_whether_the_top_two_are_distinguishable():
    _, table = _scored()
    full, quarter = choices(table)
    assert full.label_fraction == 0.25 and quarter.label_fraction == 1.0
    # 1.0: chosen - runner-up on validation = 0.02 at every seed: an interval of zero width above 0
    assert quarter.difference[0] == pytest.approx(0.02) and quarter.distinguishable and quarter.complete
    # 0.25: scratch (0.51) vs the finalist (0.51) on the seeds both ran: the interval spans 0
    assert not full.distinguishable and not full.complete


def test_an_unfinished_finalist_table_has_rows_without_numbers():
    plan = plan_finalists(_search(), INFO, top=1, seeds=2)
    table = finalists_table(plan, {}, INFO)
    assert (table["runs"] == 0).all() and not table["chosen"].any()
    assert choices(table) == []


# --- files and printing -----------------------------------------------------------------------


def test_write_finalists_writes_tables_numbers_beside_the_config_and_the_plot(tmp_path):
    _, table = _scored()
    found = choices(table)
    chosen_values = {choice.label_fraction: choice.chosen["setting"] for choice in found}
    written = write_results(_search(), INFO, tmp_path, chosen_values=chosen_values)
    out = write_finalists(table, found, INFO, tmp_path, written["chosen"])
    config = load_config(written["chosen"][1.0])  # `lrc-ray pretrain --config` takes it unchanged
    assert config.pretrain.method == "global" and config.seed == 0
    numbers = json.loads((tmp_path / "best_config_label_fraction_1.json").read_text())
    assert numbers["test"]["mean"] == pytest.approx(0.61) and len(numbers["test"]["ci95"]) == 2
    assert numbers["validation"]["per_seed"] == [0.68, 0.69, 0.70] and numbers["seeds"] == [1, 2, 3]
    assert numbers["gain_over_scratch"]["test"]["mean"] == pytest.approx(0.61 - 0.62)
    assert numbers["runner_up"]["distinguishable"] is True and "never by test" in numbers["chosen_by"]
    assert out["numbers"][1.0] == tmp_path / "best_config_label_fraction_1.json"
    csv = (tmp_path / "finalists.csv").read_text().splitlines()
    assert csv[0].startswith("label_fraction,role,") and len(csv) == 1 + len(table)
    markdown = (tmp_path / "finalists.md").read_text()
    assert "0.610 [" in markdown and "distinguishable at 95%" in markdown
    assert (tmp_path / "test_dice_vs_label_fraction.png").read_bytes()[:4] == b"\x89PNG"


def test_the_chosen_setting_keeps_the_model_of_its_best_validation_seed(tmp_path):
    plan, _ = _scored()
    outcomes = _outcomes(plan, {(1.0, "search #2"): {1: (0.68, 0.60), 2: (0.70, 0.61), 3: (0.69, 0.62)}})
    for index, outcome in outcomes.items():
        key = f"key-{index}"
        outcome["finetune_key"] = key
        model = tmp_path / "sweep" / "finetuned" / key / "model.pt"
        model.parent.mkdir(parents=True)
        model.write_bytes(f"model of run {index}".encode())
    table = finalists_table(plan, outcomes, INFO)
    found = choices(table)
    written = write_results(_search(), INFO, tmp_path / "results",
                            chosen_values={choice.label_fraction: choice.chosen["setting"] for choice in found})
    out = write_finalists(table, found, INFO, tmp_path / "results", written["chosen"], stage_root=tmp_path / "sweep")
    kept = tmp_path / "results" / "best_config_label_fraction_1.pt"
    assert out["models"] == {1.0: kept}
    seed_2 = next(run.index for run in plan.runs if run.label_fraction == 1.0 and run.role == "search #2" and run.seed == 2)
    assert kept.read_bytes() == f"model of run {seed_2}".encode(), "seed 2 has the best validation Dice (not test)"
    numbers = json.loads((tmp_path / "results" / "best_config_label_fraction_1.json").read_text())
    assert numbers["model"]["seed"] == 2 and numbers["model"]["test"] == 0.61 and len(numbers["model"]["all_seeds"]) == 3
    assert "models" not in (tmp_path / "results" / "finalists.csv").read_text().splitlines()[0].split(",")


def test_results_print_the_finalists_table_and_name_fractions_without_finalists(tmp_path, capsys):
    from lrc_ray.cli import _print_results

    plan, table = _scored()
    found = choices(table)
    written = write_results(_search(), INFO, tmp_path, chosen_values={c.label_fraction: c.chosen["setting"] for c in found})
    written |= write_finalists(table, found, INFO, tmp_path, written["chosen"])
    written |= {"out_dir": tmp_path, "metric": "dice_mean", "mode": "max", "by": "label_fraction", "missing": (0.1,)}
    assert _print_results(written, top=5) == 2
    captured = capsys.readouterr()
    assert "finalists: dice_mean, mean [95% t-interval]" in captured.out
    assert "label fraction 1.0: chose search #2 (global) by mean validation dice_mean over 3 seeds" in captured.out
    assert "distinguishable at 95%" in captured.out and "finalist runs still missing" in captured.out
    assert "chosen configuration (by the finalists' mean validation dice_mean, label_fraction 1.0)" in captured.out
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("lrc-ray: error: finalists: no trial finished with dice_mean at label fraction 0.1;")
