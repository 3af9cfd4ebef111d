"""Fixtures of the Ray-layer tests: free local ports, and a real local Ray head (`ray start`)."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest

from lrc_ray.distributed.cluster import local_down, local_up


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def free_port():
    """A function that returns a port nothing listens on (now) on 127.0.0.1."""
    return _free_port


@pytest.fixture
def head():
    """A local head started by `local_up` (token authentication, job server) with 2 CPUs, stopped after."""
    workdir = Path(tempfile.mkdtemp(prefix="lrch_"))  # short: Ray's socket paths are limited
    started = local_up(workdir, num_cpus=2, port=_free_port(), dashboard_port=_free_port())
    try:
        yield started
    finally:
        local_down(workdir)
        assert not (workdir / "head.json").exists()
        # Ray's drain on SIGTERM waited 30 s for a node that a detached Ray Data actor kept busy.
        assert "Draining for up to" not in (workdir / "head.log").read_text()
