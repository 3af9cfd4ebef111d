"""Fixtures of the Ray-layer tests: a real local Ray head (`ray start`)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from lrc_ray.distributed.cluster import free_port, local_down, local_up


@pytest.fixture
def head():
    """A local head started by `local_up` (token authentication, job server) with 2 CPUs, stopped after."""
    workdir = Path(tempfile.mkdtemp(prefix="lrch_"))  # short: Ray's socket paths are limited
    started = local_up(workdir, num_cpus=2, port=free_port(), dashboard_port=free_port())
    try:
        yield started
    finally:
        local_down(workdir)
        assert not (workdir / "head.json").exists()
        # Ray's drain on SIGTERM waited 30 s for a node that a detached Ray Data actor kept busy.
        assert "Draining for up to" not in (workdir / "head.log").read_text()
        shutil.rmtree(workdir, ignore_errors=True)  # kept when an assertion above fails
