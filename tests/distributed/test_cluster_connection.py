"""Connecting to a Ray cluster: bad addresses are refused in one line within seconds, the local
head's env.sh serves both the job CLI and lrc-ray, and whether the cluster autoscales is read
from what Ray's autoscalers leave in the GCS."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import ray
from lrc_ray.distributed.cluster import free_port
from lrc_ray.distributed.runtime import cluster_autoscales, ray_session
from lrc_ray.errors import UserInputError

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def http_server():
    """A listening port that is no Ray GCS (an HTTP/1 server), e.g. a dashboard's port given as host:port."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _refusal(address: str, monkeypatch, *, env: bool = False) -> tuple[str, float]:
    if env:
        monkeypatch.setenv("RAY_ADDRESS", address)
    started = time.monotonic()
    with pytest.raises(UserInputError) as raised:
        with ray_session(address=None if env else address):
            pass
    assert not ray.is_initialized()
    return str(raised.value), time.monotonic() - started


def test_a_dashboard_address_names_the_variable_the_job_cli_reads(monkeypatch):
    message, _ = _refusal("http://127.0.0.1:8265", monkeypatch, env=True)
    assert message.startswith("RAY_ADDRESS http://127.0.0.1:8265: a dashboard (job server) address")
    assert "RAY_API_SERVER_ADDRESS" in message and "\n" not in message


@pytest.mark.parametrize("kind", ["closed port", "not a GCS"])
def test_an_address_where_no_gcs_answers_is_refused_within_seconds(monkeypatch, http_server, kind):
    address = f"127.0.0.1:{free_port()}" if kind == "closed port" else http_server
    message, seconds = _refusal(address, monkeypatch)
    assert message.startswith(f"--address {address}: no Ray cluster answers there (UNAVAILABLE")
    assert "\n" not in message
    assert seconds < 15  # ray.init alone waits minutes there


def test_an_address_ray_cannot_parse_is_refused(monkeypatch):
    message, _ = _refusal("nonsense:::", monkeypatch)
    assert message.startswith("--address nonsense:::") and "\n" not in message


def test_the_cli_prints_one_line_and_exits_2(tiny_dataset, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    completed = subprocess.run(
        [sys.executable, "-m", "lrc_ray.cli", "superpixels", "--data", str(tiny_dataset), "--out", str(tmp_path / "c")],
        env={**os.environ, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert completed.stderr.startswith(f"lrc-ray: error: RAY_ADDRESS {address}: no Ray cluster answers there")
    assert completed.stderr.count("\n") == 1


# --- cluster_autoscales: the GCS records stubbed --------------------------------------------


def _gcs(monkeypatch, *, config=None, v2=False, status=None):
    import ray.autoscaler.v2.utils
    import ray.experimental.internal_kv

    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: config)
    monkeypatch.setattr(ray.autoscaler.v2.utils, "is_autoscaler_v2", lambda **kwargs: v2)
    blob = None if status is None else json.dumps(status).encode()
    monkeypatch.setattr(ray.experimental.internal_kv, "_internal_kv_get", lambda key: blob)


def _group(min_count, max_count):
    return SimpleNamespace(min_count=min_count, max_count=max_count)


@pytest.mark.parametrize(
    ("gcs", "expected"),
    [
        ({}, False),  # nothing recorded: a cluster nobody scales
        # v1 on a read-only provider (a head started without an autoscaling config): types are node ids
        ({"status": {"autoscaler_report": {"node_type_mapping": {"3091d6": "node_3091d6"}}}}, False),
        ({"status": {"autoscaler_report": None}}, False),
        # v1 with `ray up`'s config (or KubeRay's v1 sidecar): the config's node types
        ({"status": {"autoscaler_report": {"node_type_mapping": {"10.0.0.5": "ray.head.default"}}}}, True),
        ({"v2": True}, True),
        ({"config": SimpleNamespace(node_group_configs=[_group(1, 1), _group(0, 8)])}, True),
        ({"config": SimpleNamespace(node_group_configs=[_group(0, -1)])}, True),  # -1: no upper bound
        ({"config": SimpleNamespace(node_group_configs=[_group(1, 1), _group(4, 4)]), "v2": True}, False),  # fixed
    ],
)
def test_cluster_autoscales_reads_the_gcs(monkeypatch, gcs, expected):
    _gcs(monkeypatch, **gcs)
    assert cluster_autoscales() is expected


def test_a_train_run_waits_for_an_autoscaler_instead_of_being_refused(monkeypatch):
    from lrc_ray.distributed import train

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(train, "cluster_autoscales", lambda: False)
    with pytest.raises(UserInputError, match=r"--workers 4 --gpu: needs 4 GPUs"):
        train.check_train_resources(4, use_gpu=True)
    monkeypatch.setattr(train, "cluster_autoscales", lambda: True)
    train.check_train_resources(4, use_gpu=True)  # Ray Train asks the autoscaler for the GPUs


# --- the real local head ---------------------------------------------------------------------

_ON_THE_HEAD = """
import ray
from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
from ray.experimental.internal_kv import _internal_kv_get
import time
from lrc_ray.distributed.runtime import cluster_autoscales, ray_session
from lrc_ray.distributed.tune import sweep_concurrency
from lrc_ray.search_space import SweepSettings
from lrc_ray.errors import UserInputError

with ray_session():  # RAY_ADDRESS from env.sh
    deadline = time.monotonic() + 60
    while _internal_kv_get(DEBUG_AUTOSCALING_STATUS) is None and time.monotonic() < deadline:
        time.sleep(1)  # the head's autoscaler monitor reports every few seconds
    print("status recorded:", _internal_kv_get(DEBUG_AUTOSCALING_STATUS) is not None)
    print("autoscales:", cluster_autoscales())
    print("cpu concurrency:", sweep_concurrency(SweepSettings(workers_per_trial=0), ray.cluster_resources()))
    try:
        sweep_concurrency(SweepSettings(workers_per_trial=1, use_gpu=True, max_concurrent_trials=2), ray.cluster_resources())
    except UserInputError as exc:
        print("gpu sweep refused:", exc)
"""


@pytest.mark.ray
def test_env_sh_serves_the_job_cli_and_lrc_ray_on_a_static_head(head, tmp_path):
    env_sh = head.env_file.read_text()
    assert f"export RAY_ADDRESS={head.gcs_address}\n" in env_sh
    assert f"export RAY_API_SERVER_ADDRESS={head.dashboard_url}\n" in env_sh
    script = tmp_path / "on_head.py"
    script.write_text(_ON_THE_HEAD)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    completed = subprocess.run(
        ["bash", "-c", f"source {head.env_file} && {RAY} job list && {sys.executable} {script}"],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-3000:]
    out = completed.stdout
    assert "status recorded: True" in out and "autoscales: False" in out, out
    assert "cpu concurrency: 1" in out, out  # 2 CPUs, 2 per in-process trial
    assert "gpu sweep refused: sweep.workers_per_trial: a trial needs 1 GPU(s)" in out, out
