"""Finalists end to end on a local 2-CPU Ray, through the command line: a tiny sweep with finalists,
SIGKILLed during the finalists, continued, its finalists table read; the finalists' bad inputs.
(A label fraction without a finished trial: tests/test_finalists.py, on the plan and the printout.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lrc_ray.config import load_config
from lrc_ray.distributed.tune import read_tune_experiment
from lrc_ray.engine.saved_model import load_model
from lrc_ray.errors import UserInputError

pytestmark = pytest.mark.ray


def _lrc_ray(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lrc_ray.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _space_file(path: Path, tiny_sweep_space, *, space: dict, finalists: dict, **sweep) -> Path:
    # One pre-training epoch: no early stopping, so every search trial finishes.
    raw = tiny_sweep_space(space=space, workers_per_trial=0, pretrain_epochs=1, **sweep)
    raw["base"]["data"]["test_cases"] = 1
    raw["finalists"] = finalists
    path.write_text(yaml.safe_dump(raw))
    return path


def _finished_finalists(experiment: Path) -> dict[int, tuple[float, float]]:
    """finalist index -> (validation, test) Dice of every finalist trial that reported them."""
    finished = {}
    for result_file in experiment.glob("finalists-*/run_finalist_*/result.json"):
        for line in result_file.read_text().splitlines():
            result = json.loads(line)
            if "test_dice_mean" in result:
                finished[result["config"]["finalist"]] = (result["dice_mean"], result["test_dice_mean"])
    return finished


def _recorded_finalists(experiment: Path) -> int:
    """How many finalist trials Tune's experiment state records as finished: what `lrc-ray results`
    counts. It is written a moment after a trial's result.json line."""
    recorded = 0
    for directory in experiment.glob("finalists-*"):
        try:
            recorded += sum("test_dice_mean" in record.metrics for record in read_tune_experiment(directory))
        except UserInputError:  # no experiment state yet
            pass
    return recorded


def test_a_sweep_killed_during_its_finalists_continues_them_and_reports_the_choice(tmp_path, tiny_sweep_space,
                                                                                  sigkill_when):
    space = _space_file(tmp_path / "tiny.yaml", tiny_sweep_space, finalists={"top": 2, "seeds": 3}, num_samples=4,
                        space={"pretrain.method": {"choice": ["scratch", "lrc"]},
                               "finetune.label_fraction": {"choice": [0.5, 1.0]}})
    experiment = tmp_path / "store" / "tiny"
    command = [sys.executable, "-m", "lrc_ray.cli", "tune", str(space), "--storage", str(tmp_path / "store")]
    sigkill_when(command, cwd=tmp_path, ready=lambda: _recorded_finalists(experiment) > 0, within=480)
    before = _finished_finalists(experiment)
    plan = json.loads((experiment / "lrc_ray_finalists.json").read_text())
    assert plan["seeds"] == [1, 2, 3], "seeds the search (seed 0) did not use"
    assert len(before) < len(plan["runs"]), "killed during the finalists"

    # The interrupted finalists can be read: those Tune recorded (at least the one the kill waited
    # for), no more than wrote their results.
    interrupted = _lrc_ray("results", str(experiment), "--out", str(tmp_path / "interrupted"), cwd=tmp_path)
    assert interrupted.returncode == 0, interrupted.stderr[-2000:]
    partial = pd.read_csv(tmp_path / "interrupted" / "finalists.csv")
    # A finalist whose result.json has its line but which the kill caught before Tune's experiment
    # state recorded it is not yet counted (the resume runs it again, to the same numbers).
    assert 1 <= partial["runs"].sum() <= len(before) and (partial["runs"] <= partial["planned"]).all()

    resumed = _lrc_ray("finalists", str(experiment), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (tmp_path / "finalists_stdout.txt").write_text(resumed.stdout)
    after = _finished_finalists(experiment)
    assert {index: after[index] for index in before} == before, "finished finalists kept"
    assert len(after) == len(plan["runs"])
    assert "finalists: dice_mean, mean [95% t-interval] over fresh seeds" in resumed.stdout
    assert "runner-up" in resumed.stdout and "chosen configuration" in resumed.stdout

    table = pd.read_csv(experiment / "results" / "finalists.csv")
    assert (table["runs"] == table["planned"]).all() and (table["planned"] == 3).all()
    assert set(table["label_fraction"]) == {0.5, 1.0} and "scratch" in set(table["role"])
    searched = {json.loads(params.read_text())["pretrain.method"] for params in experiment.glob("run_trial_*/params.json")}
    assert searched == {"lrc"}, "the finalists run scratch, so the search spends its trials on the other methods"
    assert table["test_mean"].between(0, 1).all() and table["validation_low"].notna().all()
    assert table.groupby("label_fraction")["chosen"].sum().tolist() == [1, 1]
    assert (experiment / "results" / "finalists.md").read_text().startswith("Finalists: dice_mean")
    assert (experiment / "results" / "test_dice_vs_label_fraction.png").read_bytes()[:4] == b"\x89PNG"
    for fraction in ("0.5", "1"):
        config = load_config(experiment / "results" / f"best_config_label_fraction_{fraction}.yaml")
        numbers = json.loads((experiment / "results" / f"best_config_label_fraction_{fraction}.json").read_text())
        assert config.finetune.label_fraction == numbers["label_fraction"] and numbers["seeds"] == [1, 2, 3]
        assert numbers["test"]["mean"] is not None and len(numbers["test"]["per_seed"]) == 3
        # the chosen setting's model, kept beside its config: the seed with its best validation Dice
        model = load_model(experiment / "results" / f"best_config_label_fraction_{fraction}.pt")
        assert model.config.finetune.label_fraction == config.finetune.label_fraction
        assert numbers["model"]["validation"] == max(numbers["validation"]["per_seed"])
    assert "segment scans with its model: lrc-ray predict --model" in resumed.stdout

    # The finished sweep resumed again: nothing to do, the same table.
    again = _lrc_ray("tune", str(space), "--storage", str(tmp_path / "store"), "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _finished_finalists(experiment) == after
    assert pd.read_csv(experiment / "results" / "finalists.csv")[["validation_mean", "test_mean"]].equals(
        table[["validation_mean", "test_mean"]])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["finalists", "{tmp}"], "not an lrc-ray sweep"),
        (["finalists", "{tmp}", "--top", "0"], "--top: expected at least 1, got 0"),
        (["finalists", "{tmp}", "--seeds", "0"], "--seeds: expected at least 1, got 0"),
        (["tune", "{space}", "--storage", "{tmp}/store", "--data", "{data}"],
         "data.validation_cases 1 + data.test_cases 1: 2 held-out volumes leave none of the 2 labelled volumes"),
    ],
)
def test_finalists_bad_input_is_one_line_and_exit_2(tmp_path, tiny_sweep_space, tiny_dataset, args, message):
    space = _space_file(tmp_path / "tiny.yaml", tiny_sweep_space, finalists={"top": 1}, num_samples=1,
                        space={"pretrain.method": {"choice": ["scratch", "lrc"]}})
    completed = _lrc_ray(*[a.format(space=space, tmp=tmp_path, data=tiny_dataset) for a in args], cwd=tmp_path,
                         timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1 and message in completed.stderr, completed.stderr
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "store" / "tiny").exists(), "nothing half-written"
