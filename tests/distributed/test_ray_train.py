"""Ray Train pre-training on a local 2-CPU Ray: the plain loop's numbers, resume by run name,
and recovery from a worker killed mid-run (FailureConfig restarts it from the last checkpoint)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lrc_ray import api
from lrc_ray.config import RunConfig, save_config
from lrc_ray.distributed.train import FAULT_ENV
from lrc_ray.engine.checkpoint import load_checkpoint

pytestmark = pytest.mark.ray

@pytest.fixture(scope="module")
def config(tiny_dataset, tiny_network, tmp_path_factory, local_ray) -> RunConfig:
    cache = tmp_path_factory.mktemp("cache")
    config = RunConfig().replace(
        data={"data_dir": str(tiny_dataset), "cache_root": str(cache), "size": 48, "validation_cases": 1},
        network=tiny_network,
        pretrain={"method": "lrc", "epochs": 2, "batch_size": 4, "queue_size": 16},
    )
    api.superpixels_for(config.data)
    return config


def _history(checkpoint):
    return load_checkpoint(checkpoint)["history"]


def test_one_worker_matches_the_plain_loop(config, tmp_path):
    plain = _history(api.pretrain(config=config, out_dir=tmp_path / "plain", workers=0, progress=False))
    ray_train = _history(api.pretrain(config=config, out_dir=tmp_path / "train", workers=1))
    assert [entry["epoch"] for entry in ray_train] == [1, 2] == [entry["epoch"] for entry in plain]
    assert [entry["steps"] for entry in ray_train] == [entry["steps"] for entry in plain] == [3, 3]
    # Same model, data and loss; only the shuffling and augmentation draws differ.
    for ours, reference in zip(ray_train, plain):
        assert ours["loss"] == pytest.approx(reference["loss"], rel=0.1)


def test_a_rerun_with_the_same_name_resumes(config, tmp_path):
    api.pretrain(config=config, out_dir=tmp_path, workers=1, name="run")
    longer = config.replace(pretrain={"epochs": 3})
    history = _history(api.pretrain(config=longer, out_dir=tmp_path, workers=1, name="run"))
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    assert [entry["run_start_epoch"] for entry in history] == [0, 0, 2], "only epoch 3 was trained again"


def test_a_killed_worker_restarts_from_its_last_checkpoint(config, tmp_path):
    config_file = tmp_path / "config.yaml"
    save_config(config.replace(pretrain={"epochs": 3}), config_file)
    marker = tmp_path / "killed"
    env = {**os.environ, FAULT_ENV: f"2:{marker}"}  # SIGKILL at the start of epoch 3 (0-based 2)
    completed = subprocess.run(
        [sys.executable, "-m", "lrc_ray.cli", "-q", "pretrain", "--config", str(config_file), "--workers", "1",
         "--out", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=400,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert marker.read_text() == "killed at epoch 2\n"
    history = _history(tmp_path / "out" / "checkpoint.pt")
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    # Resumed from a checkpoint, not from scratch. Which one: Ray registers a reported checkpoint
    # asynchronously, so a kill right after epoch 2's report may leave epoch 1's as the latest.
    assert history[-1]["run_start_epoch"] in (1, 2)


def test_more_workers_than_the_cluster_can_feed_are_refused_at_once(config, tmp_path, capsys):
    """2 Train workers take both CPUs of this 2-CPU Ray and Ray Data could never read: one line, exit 2."""
    from lrc_ray.cli import main

    config_file = tmp_path / "config.yaml"
    save_config(config, config_file)
    code = main(["-q", "pretrain", "--config", str(config_file), "--workers", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["lrc-ray: error: --workers 2: needs 3 CPUs (one per Train worker, one for Ray Data "
                                 "to read the slices), the Ray cluster has 2; use --workers 1 or a larger cluster"]
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
