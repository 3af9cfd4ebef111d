"""Shared fixtures: tiny synthetic data made per session, and a local 2-CPU Ray that tests own."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lrc_ray.data.msd import load_msd_dataset
from lrc_ray.data.phantom import ORGAN_LABELS, write_synthetic_dataset

TINY = dict(cases=2, unlabeled=1, size=48, slices=6, seed=3)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small MSD-layout data set: 2 labelled + 1 unlabelled volumes of 6 slices of 48x48."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "tiny", **TINY)


@pytest.fixture
def dataset_copy(tiny_dataset, tmp_path) -> Path:
    """A private copy of the tiny data set, for tests that damage it."""
    return Path(shutil.copytree(tiny_dataset, tmp_path / "data"))


def _resave(source: Path, target: Path, dtype) -> None:
    """Copy a NIfTI file with its affine, stored as `dtype`."""
    image = nib.load(str(source))
    target.parent.mkdir(parents=True, exist_ok=True)
    copy = nib.Nifti1Image(np.asarray(image.dataobj).astype(dtype), image.affine)
    copy.set_qform(image.affine, code=1)
    copy.set_sform(image.affine, code=1)
    nib.save(copy, str(target))


def _as_nnunet(msd_root: Path, out: Path, *, image_dtype=np.int32, label_dtype=np.float32) -> Path:
    """The labelled cases of an MSD data set in nnU-Net v2 layout (int32 images, float labels by default)."""
    msd = load_msd_dataset(msd_root)
    for case in msd.labelled_cases:
        _resave(case.image_path, out / "imagesTr" / f"{case.case_id}_0000.nii.gz", image_dtype)
        _resave(case.label_path, out / "labelsTr" / f"{case.case_id}.nii.gz", label_dtype)
    spec = {"channel_names": {"0": "CT"}, "labels": {name: value for value, name in ORGAN_LABELS.items()}, "numTraining": len(msd.labelled_cases),
            "file_ending": ".nii.gz", "name": "Dataset001_Tiny"}
    (out / "dataset.json").write_text(json.dumps(spec))
    return out


def _as_datalist(msd_root: Path, out: Path) -> Path:
    """A BTCV-like dataset_0.json (float64 images) beside imagesTr/ and labelsTr/ folders: the first
    labelled case under "training", the second under "validation", the unlabelled one as a path."""
    msd = load_msd_dataset(msd_root)
    first, second = msd.labelled_cases
    unlabelled = next(case for case in msd.cases if case.label_path is None)
    (out / "labelsTr").mkdir(parents=True)
    for case in (first, second, unlabelled):
        _resave(case.image_path, out / "imagesTr" / case.image_path.name, np.float64)
        if case.label_path is not None:
            shutil.copy(case.label_path, out / "labelsTr")

    def entry(case):
        return {"image": f"imagesTr/{case.image_path.name}", "label": f"labelsTr/{case.label_path.name}"}

    spec = {"labels": {str(value): name for value, name in ORGAN_LABELS.items()},
            "training": [entry(first), f"imagesTr/{unlabelled.image_path.name}"], "validation": [entry(second)]}
    path = out / "dataset_0.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="session")
def as_nnunet():
    """Write an MSD data set's labelled cases in nnU-Net v2 layout: as_nnunet(msd_root, out)."""
    return _as_nnunet


@pytest.fixture(scope="session")
def as_datalist():
    """Write a BTCV-like MONAI datalist of an MSD data set: as_datalist(msd_root, out) -> its path."""
    return _as_datalist


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
