"""A sweep whose storage and super-pixel cache are on a real S3 server (SeaweedFS, the `s3_server`
fixture), on a local Ray head, through the command line: SIGKILLed mid-trial, resumed from S3
with every finished trial kept, read by `lrc-ray results s3://...` in a fresh process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lrc_ray.config import config_from_dict
from lrc_ray.errors import UserInputError
from lrc_ray.storage import location

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _lrc_ray(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lrc_ray.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _trials(experiment: str) -> dict[str, tuple[str, float | None]]:
    """trial id -> (status, dice_mean or None), as Tune recorded them on S3 (empty before it has)."""
    from lrc_ray.distributed.tune import read_tune_experiment

    try:
        records = read_tune_experiment(location(experiment))
    except UserInputError:
        return {}
    return {record.trial_id: (record.status, record.metrics.get("dice_mean")) for record in records}


def _finished(trials: dict) -> dict[str, float]:
    return {trial: dice for trial, (status, dice) in trials.items() if status == "TERMINATED" and dice is not None}


def test_a_sweep_on_s3_survives_sigkill_resumes_from_s3_and_its_results_are_read_there(
        s3_server, tmp_path, tiny_sweep_space, sigkill_when):
    storage, experiment = s3_server.uri("e2e/sweeps"), s3_server.uri("e2e/sweeps/tiny")
    # Every trial pre-trains anew (its own temperature), so each takes a while: room to kill one mid-run.
    raw = tiny_sweep_space(space={"pretrain.method": {"choice": ["lrc"]}, "pretrain.temperature": {"uniform": [0.05, 0.5]}},
                           workers_per_trial=0, pretrain_epochs=2, finetune_epochs=1, num_samples=3, max_failures=1)
    raw["base"]["data"]["cache_root"] = s3_server.uri("e2e/cache")
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(raw))

    # Killed once Tune's state on S3 shows a finished trial: the next one is running (one at a time on 2 CPUs).
    command = [sys.executable, "-m", "lrc_ray.cli", "tune", str(space), "--storage", storage]
    seen: dict = {}

    def one_finished() -> bool:
        seen.update(trials=_trials(experiment))
        return bool(_finished(seen["trials"]))

    sigkill_when(command, cwd=tmp_path, ready=one_finished, within=400)
    before = _finished(seen["trials"])
    assert 1 <= len(before) < 3, "killed mid-sweep"

    resumed = _lrc_ray("tune", str(space), "--storage", storage, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _finished(_trials(experiment))
    assert {trial: after[trial] for trial in before} == before, "finished trials kept, not rerun"
    assert len(_trials(experiment)) == 3 and len(after) >= len(before)

    # Stage outputs live on S3: the cache entry with its manifest, the shared pre-training.
    cache = location(s3_server.uri("e2e/cache"))
    entries = [child for child in cache.listdir() if not child.name.startswith(".")]
    assert len(entries) == 1 and entries[0].join("manifest.json").read_json()["num_slices"] == 30
    pretrained = location(experiment).join("pretrained").listdir()  # (ASHA may stop one before it is written)
    assert pretrained and all(run.join("history.json").read_json() and run.join("checkpoint.pt").is_file()
                              for run in pretrained)
    assert not [child for child in cache.listdir() if child.name.startswith(".tmp-")], "no staging left"

    # A fresh process reads the sweep from S3, prints the table, writes the chosen configuration there.
    out = s3_server.uri("e2e/read")
    read = _lrc_ray("results", experiment, "--out", out, cwd=tmp_path)
    assert read.returncode == 0, read.stderr[-3000:]
    assert "trials, best dice_mean first" in read.stdout and "chosen configuration" in read.stdout
    for trial in after:
        assert trial in read.stdout
    written = {child.name: child for child in location(out).listdir()}
    assert {"results.csv", "results.parquet", "results.md"} <= set(written)
    chosen = [child for name, child in written.items() if name.startswith("best_config_label_fraction_")]
    assert chosen, sorted(written)
    config = config_from_dict(yaml.safe_load(chosen[0].read_text()), source=chosen[0].uri)
    assert config.data.cache_root == s3_server.uri("e2e/cache")
    assert chosen[0].read_text() in read.stdout, "the printed configuration is the one written"
