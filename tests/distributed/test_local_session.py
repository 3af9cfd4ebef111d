"""A local Ray instance's temp dir, where Ray writes its session logs: removed after a run (every
local run left 10-20 MB in /tmp), kept and named after a run that failed."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import ray
from lrc_ray.distributed.runtime import ray_session, wait_for_processes_with_tmpdir
from lrc_ray.errors import UserInputError

pytestmark = pytest.mark.ray


@pytest.fixture
def session_temp_dir(monkeypatch):
    """The temp dir `ray_session` makes for its local instance, made here so the test knows it."""
    temp_dir = Path(tempfile.mkdtemp(prefix="lrs_"))  # short: Ray's socket paths are limited
    make = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp",
                        lambda *args, **kwargs: str(temp_dir) if kwargs.get("prefix") == "lrc_ray_" else make(*args, **kwargs))
    yield temp_dir
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.parametrize(("raised", "kept"), [(None, False), (UserInputError, False), (RuntimeError, True)],
                         ids=["succeeded", "input refused", "failed"])
def test_ray_logs_are_removed_after_a_run_and_named_after_a_failed_one(session_temp_dir, caplog, raised, kept):
    logs = session_temp_dir / "session_latest" / "logs"
    with caplog.at_level(logging.WARNING, logger="lrc_ray"), pytest.raises(raised) if raised else contextlib.nullcontext():
        with ray_session(num_cpus=1):
            assert logs.is_dir() and any(logs.iterdir()), "Ray writes its logs there"
            if raised:
                raise raised("in the run")
    assert not ray.is_initialized()
    assert logs.is_dir() == kept and session_temp_dir.exists() == kept
    named = [record.getMessage() for record in caplog.records if "Ray's logs of this run are kept in" in record.getMessage()]
    assert named == ([f"Ray's logs of this run are kept in {logs}"] if kept else [])


def test_the_local_instances_processes_keep_their_temp_files_in_its_dir(session_temp_dir):
    """Ray's processes and workers get the instance's own temp dir (the dashboard's forkserver left
    a pymp-* dir in /tmp at every stop); the driver keeps its own."""
    driver_temp_dir = tempfile.gettempdir()
    with ray_session(num_cpus=1):
        workers_temp_dir = ray.get(ray.remote(tempfile.gettempdir).remote())
        assert tempfile.gettempdir() == driver_temp_dir
    assert workers_temp_dir == str(session_temp_dir / "tmp")
    assert not session_temp_dir.exists(), "removed with the instance's dir"


def test_waits_for_the_processes_started_with_the_instances_tmpdir(tmp_path):
    """What outlives `ray.shutdown()` is waited for before the temp dir goes: a process started with
    the instance's TMPDIR holds the wait until it exits; one with another TMPDIR does not."""
    marker = str(tmp_path / "tmp")
    sleeper = [sys.executable, "-c", "import time; time.sleep(1.5)"]
    ours = subprocess.Popen(sleeper, env=os.environ | {"TMPDIR": marker})
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             env=os.environ | {"TMPDIR": str(tmp_path / "other")})
    try:
        started = time.monotonic()
        wait_for_processes_with_tmpdir(marker)
        waited = time.monotonic() - started
        assert 1.0 < waited < 8, f"returned after {waited:.1f} s; our process sleeps 1.5 s"
        started = time.monotonic()
        wait_for_processes_with_tmpdir(marker)
        assert time.monotonic() - started < 0.5, "nothing of ours is left: no wait"
    finally:
        other.kill()
        ours.kill()
