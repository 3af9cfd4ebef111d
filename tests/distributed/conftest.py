"""Fixtures of the Ray-layer tests: a real local Ray head (`ray start`)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from lrc_ray.distributed.cluster import free_port, local_down, local_up


@pytest.fixture
def head_workdir():
    """Make workdirs for local heads: head_workdir() -> a new short temp dir (Ray's socket paths are
    limited). After the test, the head in each is stopped, if one runs, and the dir removed."""
    made: list[Path] = []

    def make() -> Path:
        made.append(Path(tempfile.mkdtemp(prefix="lrch_")))
        return made[-1]

    yield make
    for workdir in made:
        local_down(workdir)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def head(head_workdir):
    """A local head started by `local_up` (token authentication, job server) with 2 CPUs, stopped after."""
    workdir = head_workdir()
    started = local_up(workdir, num_cpus=2, port=free_port(), dashboard_port=free_port())
    try:
        yield started
    finally:
        local_down(workdir)
        assert not (workdir / "head.json").exists()
        # Ray's drain on SIGTERM waited 30 s for a node that a detached Ray Data actor kept busy.
        assert "Draining for up to" not in (workdir / "head.log").read_text()
