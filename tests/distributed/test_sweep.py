"""Sweeps end to end on a local 2-CPU Ray, through the command line: run, SIGKILL mid-sweep, read the
interrupted sweep, resume it with its finished trials kept, read it again, use the chosen config;
and the sweep-level bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lrc_ray.config import load_config
from lrc_ray.distributed.search import trials_tune_restored
from lrc_ray.distributed.train import FAULT_ENV

pytestmark = pytest.mark.ray

SPACE = {"pretrain.method": {"choice": ["scratch", "lrc"]}, "finetune.label_fraction": {"choice": [0.5, 1.0]}}
SWEEP = {"num_samples": 4, "grace_period": 1, "reduction_factor": 2, "max_failures": 1}


def _lrc_ray(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lrc_ray.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _write_space(path: Path, space: dict) -> Path:
    path.write_text(yaml.safe_dump(space))
    return path


def _finished_trials(experiment: Path) -> dict[str, float]:
    """trial id -> dice_mean of every trial whose result.json holds the final report."""
    finished = {}
    for result_file in experiment.glob("run_trial_*/result.json"):
        for line in result_file.read_text().splitlines():
            result = json.loads(line)
            if "dice_mean" in result:
                finished[result["trial_id"]] = result["dice_mean"]
    return finished


def test_sweep_survives_sigkill_and_resumes_keeping_finished_trials(tmp_path, tiny_sweep_space, sigkill_when):
    space = _write_space(tmp_path / "tiny.yaml", tiny_sweep_space(space=SPACE, **SWEEP))
    experiment = tmp_path / "store" / "tiny"
    command = [sys.executable, "-m", "lrc_ray.cli", "tune", str(space), "--storage", str(tmp_path / "store")]
    sigkill_when(command, cwd=tmp_path, ready=lambda: bool(_finished_trials(experiment)), within=420)
    before = _finished_trials(experiment)

    # The interrupted sweep can be read.
    interrupted = _lrc_ray("results", str(experiment), "--out", str(tmp_path / "interrupted"), cwd=tmp_path)
    assert interrupted.returncode == 0, interrupted.stderr[-2000:]
    table = pd.read_csv(tmp_path / "interrupted" / "results.csv")
    assert set(before) <= set(table["trial_id"])

    resumed = _lrc_ray("tune", str(space), "--storage", str(tmp_path / "store"), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "chosen configuration" in resumed.stdout
    after = _finished_trials(experiment)
    assert {trial: after[trial] for trial in before} == before, "finished trials kept, not rerun"

    table = pd.read_parquet(experiment / "results" / "results.parquet")
    assert len(table) == 4
    # What a resumed search reads where Tune restores it from: the trials of Tune's newest state.
    restored = trials_tune_restored(experiment)
    assert set(restored) == set(table["trial_id"]) and {trial.status for trial in restored.values()} == {"TERMINATED"}
    assert all(restored[row.trial_id].config == {"pretrain.method": row.method, "finetune.label_fraction": row.label_fraction}
               for row in table.itertuples())
    _check_the_stored_studies(experiment, table)
    by_liver = _lrc_ray("results", str(experiment), "--metric", "dice/liver", "--out", str(tmp_path / "liver"), cwd=tmp_path)
    assert by_liver.returncode == 0 and "best dice/liver first" in by_liver.stdout
    misspelt = _lrc_ray("results", str(experiment), "--metric", "dice/livr", cwd=tmp_path)
    assert misspelt.returncode == 2 and "did you mean 'dice/liver'?" in misspelt.stderr
    finished = table.dropna(subset=["dice_mean"])
    assert not finished.empty and finished["dice_mean"].between(0, 1).all()
    assert set(table["method"]) <= {"scratch", "lrc"}
    assert (experiment / "results" / "results.md").read_text().startswith("| trial_id |")
    assert (experiment / "results" / "dice_vs_label_fraction.png").read_bytes()[:4] == b"\x89PNG"
    chosen = sorted((experiment / "results").glob("best_config_label_fraction_*.yaml"))
    assert chosen, "a config per label fraction"
    assert any(path.name.startswith("events.out.tfevents") for path in experiment.glob("run_trial_*/*")), "TensorBoard"

    # The chosen config is taken unchanged by `lrc-ray pretrain`.
    config = load_config(chosen[0])
    assert Path(config.data.data_dir).is_absolute()
    pretrained = _lrc_ray("-q", "pretrain", "--config", str(chosen[0]), "--out", str(tmp_path / "chosen"), cwd=tmp_path)
    assert pretrained.returncode == 0, pretrained.stderr[-2000:]
    assert (tmp_path / "chosen" / "checkpoint.pt").is_file()


_READ_STUDIES = """
import json, sys, optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
storage = JournalStorage(JournalFileBackend(sys.argv[1]))
print(json.dumps({name: [[t.state.name, t.value, t.user_attrs.get("tune_trial_id")]
                         for t in optuna.load_study(study_name=name, storage=storage).trials]
                  for name in optuna.get_all_study_names(storage)}))
"""


def _check_the_stored_studies(experiment: Path, table: pd.DataFrame) -> None:
    """A fresh process reads the resumed sweep's Optuna studies (one per label fraction, in the
    default journal file): every finished trial's value is there, every Tune trial is there once
    (the resumed ones were not proposed again), and no trial is left running."""
    read = subprocess.run([sys.executable, "-c", _READ_STUDIES, str(experiment / "optuna_journal.log")],
                          capture_output=True, text=True, timeout=120)
    assert read.returncode == 0, read.stderr[-2000:]
    studies = json.loads(read.stdout)
    assert sorted(studies) == ["tiny label_fraction=0.5", "tiny label_fraction=1"]
    assert not [trial for trials in studies.values() for trial in trials if trial[0] == "RUNNING"], studies
    tune_ids = [trial[2] for trials in studies.values() for trial in trials if trial[2] is not None]
    assert len(tune_ids) == len(set(tune_ids)) and set(table["trial_id"]) <= set(tune_ids), (tune_ids, table["trial_id"])
    for fraction, group in table.dropna(subset=["dice_mean"]).groupby("label_fraction"):
        told = [value for state, value, _ in studies[f"tiny label_fraction={fraction:g}"] if state == "COMPLETE"]
        assert all(any(abs(value - dice) < 1e-9 for value in told) for dice in group["dice_mean"]), (told, group)


def _reports(experiment: Path) -> dict[str, list[dict]]:
    return {path.parent.name: [json.loads(line) for line in path.read_text().splitlines()]
            for path in experiment.glob("run_trial_*/result.json")}


def test_in_trial_pretraining_retries_a_killed_trial_from_its_last_epoch(tmp_path, tiny_sweep_space):
    """workers_per_trial 0: trials pre-train and fine-tune in their own (reused) processes. The
    process of the first trial to start its second epoch is SIGKILLed; Tune retries that trial
    from the checkpoint of its first epoch, and the sweep finishes every trial."""
    sweep = {"num_samples": 4, "grace_period": 1, "reduction_factor": 2, "max_failures": 1, "workers_per_trial": 0}
    space = _write_space(tmp_path / "in_trial.yaml", tiny_sweep_space(
        space={"pretrain.method": {"choice": ["lrc", "global"]}, "finetune.label_fraction": {"choice": [0.5, 1.0]}},
        **sweep,
    ))
    marker = tmp_path / "killed"
    completed = subprocess.run(
        [sys.executable, "-m", "lrc_ray.cli", "tune", str(space), "--storage", str(tmp_path / "store")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env=os.environ | {FAULT_ENV: f"1:{marker}"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert marker.is_file(), "the fault was injected"
    reports = _reports(tmp_path / "store" / "in_trial")
    assert len(reports) == 4
    finished = [lines for lines in reports.values() if "dice_mean" in lines[-1]]
    stopped = [lines for lines in reports.values() if "dice_mean" not in lines[-1]]
    assert finished and all(0 <= lines[-1]["dice_mean"] <= 1 for lines in finished)
    assert all(lines[-1]["epoch"] < 2 for lines in stopped), "a trial without Dice was stopped early by ASHA"
    trained = [line for lines in reports.values() for line in lines if "dice_mean" not in line and not line.get("replayed")]
    resumed = [line for line in trained if line["run_start_epoch"] == 1]
    assert [line["epoch"] for line in resumed] == [2], "the killed trial trained its second epoch only, once"
    # The global method's epochs watch its branch (global_top1); its final report carries the last one.
    assert any("global_top1" in line for line in trained) and not all("global_top1" in line for line in trained)
    assert all(("global_top1" in lines[-1]) == ("global_top1" in lines[0]) for lines in finished)
    # A finished trial's stages by the clock, start-ups included, take at least their own compute.
    for final in (lines[-1] for lines in finished):
        assert final["wall_seconds/finetune"] >= final["finetune_seconds"] > 0
        assert final["wall_seconds/superpixels"] > 0 and final["wall_seconds/pretrain"] > 0


def test_a_trial_whose_fine_tuning_repeats_an_earlier_one_reuses_its_result(tmp_path, tiny_sweep_space):
    """`scratch` reads no super-pixels and no temperature: both grid points fine-tune identically,
    so the second reports the first's Dice at no compute."""
    space = _write_space(tmp_path / "repeat.yaml", tiny_sweep_space(
        space={"pretrain.method": {"choice": ["scratch"]}, "pretrain.temperature": {"choice": [0.1, 0.5]}},
        workers_per_trial=0,
    ))
    completed = _lrc_ray("tune", str(space), "--storage", str(tmp_path / "store"), "--search", "grid", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    finals = [lines[-1] for lines in _reports(tmp_path / "store" / "repeat").values()]
    assert sorted(final["finetune_reused"] for final in finals) == [False, True]
    assert finals[0]["dice_mean"] == finals[1]["dice_mean"]
    assert sorted(final["compute_seconds"] == 0 for final in finals) == [False, True]


def test_a_sweep_whose_every_trial_fails_ends_with_one_summary_line(tmp_path, tiny_sweep_space):
    failing = tiny_sweep_space(space={"pretrain.method": {"choice": ["lrc", "global"]}}, num_samples=2, max_failures=0)
    failing["base"]["pretrain"]["batch_size"] = 64  # more than the slices: every trial fails the same way
    space = _write_space(tmp_path / "failing.yaml", failing)
    completed = _lrc_ray("tune", str(space), "--storage", str(tmp_path / "store"), cwd=tmp_path)
    assert completed.returncode == 3
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("lrc-ray: training stopped: sweep ")
    assert "all 2 trial(s) failed: 2 x pretrain.batch_size: 64 is more than the" in last


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tune", "{space}", "--storage", "{tmp}/store", "--resume"], "--resume: no sweep to resume at"),
        (["results", "{tmp}"], "not an lrc-ray sweep"),
        (["tune", "{tmp}/missing.yaml"], "search space file not found"),
        (["tune", "{space}", "--storage", "/proc/forbidden"], "--storage /proc/forbidden: not writable"),
        (["tune", "{space}", "--search", "grid", "--optuna-storage", "{tmp}/j.log"],
         "--optuna-storage: only a tpe search keeps an Optuna study, not --search grid"),
    ],
)
def test_sweep_bad_input_is_one_line_and_exit_2(tmp_path, tiny_sweep_space, args, message):
    space = _write_space(tmp_path / "tiny.yaml", tiny_sweep_space(space=SPACE, **SWEEP))
    completed = _lrc_ray(*[a.format(space=space, tmp=tmp_path) for a in args], cwd=tmp_path, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1 and message in completed.stderr, completed.stderr
    assert "Traceback" not in completed.stderr
