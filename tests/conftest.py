"""Shared fixtures: tiny synthetic data made per session, and a local 2-CPU Ray that tests own."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from lrc_ray.data.phantom import write_synthetic_dataset

TINY = dict(cases=2, unlabeled=1, size=48, slices=6, seed=3)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small MSD-layout data set: 2 labelled + 1 unlabelled volumes of 6 slices of 48x48."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "tiny", **TINY)


@pytest.fixture
def dataset_copy(tiny_dataset, tmp_path) -> Path:
    """A private copy of the tiny data set, for tests that damage it."""
    return Path(shutil.copytree(tiny_dataset, tmp_path / "data"))


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs for one test module, in its own short temp dir, shut down after."""
    import ray

    assert not ray.is_initialized(), "a previous test left Ray running"
    temp_dir = tempfile.mkdtemp(prefix="lrt_")
    # The dashboard serves the state API that Ray Train polls.
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", logging_level=logging.WARNING, _temp_dir=temp_dir)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


# A network small enough for 2 CPUs: the shape of BasicUNet with 4-16 channels.
TINY_NETWORK = {"features": [4, 4, 8, 8, 16, 4], "global_dim": 8, "global_hidden": 16, "local_dim": 8}


@pytest.fixture(scope="session")
def tiny_network() -> dict:
    return dict(TINY_NETWORK)


@pytest.fixture
def tiny_sweep_space():
    """A search space (as a dict) that runs in seconds per trial: 48 px built-in data, the tiny
    network, short pre-training and fine-tuning; `space` and `sweep` settings per test."""

    def make(*, space: dict, pretrain_epochs: int = 2, finetune_epochs: int = 2, **sweep) -> dict:
        return {
            "description": "tiny test sweep",
            "sweep": {"seed": 0, **sweep},
            "data": {"cases": 4, "unlabeled": 1, "slices": 6},
            "base": {
                "data": {"size": 48, "validation_cases": 1},
                "network": dict(TINY_NETWORK),
                "pretrain": {"epochs": pretrain_epochs, "batch_size": 4, "queue_size": 16},
                "finetune": {"epochs": finetune_epochs, "batch_size": 4},
            },
            "space": space,
        }

    return make


@pytest.fixture
def sigkill_when():
    """Run a command in its own session until `ready()` holds, then SIGKILL it and all it started
    (its local Ray included, nothing else): an interrupted run, for the resume tests."""

    def run(command: list[str], *, cwd: Path, ready, within: float) -> None:
        process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            deadline = time.monotonic() + within
            while not ready() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(1)
            assert process.poll() is None, "the run ended before it could be interrupted"
            assert ready(), f"not ready to interrupt within {within} s"
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    return run
