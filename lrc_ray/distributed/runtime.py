"""Connecting to Ray: an existing cluster when one is named, else a local instance we own."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Iterator

import ray

from lrc_ray.errors import UserInputError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_session(
    *, address: str | None = None, num_cpus: int | None = None, resources: dict[str, float] | None = None
) -> Iterator[None]:
    """Use Ray for the duration of the block and shut down only what this block started.

    - Ray already initialised in this process (tests, notebooks, Tune trials): use it as is.
    - `address` given, or RAY_ADDRESS set (e.g. inside `ray job submit`): connect to that cluster.
    - Otherwise start a local instance with `num_cpus` CPUs (default: all), the custom
      `resources` given, and a dashboard on 127.0.0.1.
    """
    from lrc_ray.distributed import locks

    if ray.is_initialized():
        locks.install()
        yield
        return
    source = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    temp_dir = None
    if address:
        check_gcs_address(address, source=source)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, ValueError) as exc:  # ValueError: an address Ray cannot parse
            raise UserInputError(f"{source} {address}: {ray_error_message(exc)[:200]}; expected the GCS address "
                                 "host:port of a running Ray cluster (`lrc-ray cluster up` starts one)") from None
    else:
        # A short private temp dir: Ray's socket paths must stay under 108 characters.
        temp_dir = tempfile.mkdtemp(prefix="lrc_ray_")
        # The dashboard serves the state API, which Ray Train's placement-group cleaner polls.
        with _temp_dir_of_started_processes(_processes_temp_dir(temp_dir)):
            ray.init(num_cpus=num_cpus, resources=resources, include_dashboard=True, dashboard_host="127.0.0.1",
                     logging_level=logging.WARNING, _temp_dir=temp_dir)
        logger.info("started a local Ray instance with %s CPUs", ray.cluster_resources().get("CPU"))
    locks.install()
    failed = True
    try:
        yield
        failed = False
    except UserInputError:  # the input was refused: Ray's logs would not say more
        failed = False
        raise
    finally:
        locks.uninstall()
        ray.shutdown()
        if temp_dir is not None:
            wait_for_processes_with_tmpdir(_processes_temp_dir(temp_dir))
            _remove_unless_failed(temp_dir, failed)


@contextlib.contextmanager
def _temp_dir_of_started_processes(path: str) -> Iterator[None]:
    """TMPDIR=path for the processes started in the block (Ray's, and the workers they start later),
    so their temp files go with the instance's dir. The dashboard's multiprocessing forkserver
    otherwise left a pymp-* dir in /tmp at every stop: Ray kills it before it can clean up."""
    os.makedirs(path, exist_ok=True)
    tempfile.gettempdir()  # this process keeps its own temp dir: cache it before TMPDIR changes
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = path
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous


def _processes_temp_dir(temp_dir: str) -> str:
    return os.path.join(temp_dir, "tmp")


def wait_for_processes_with_tmpdir(path: str, timeout: float = 10.0) -> None:
    """Wait, up to `timeout` seconds, until no process started with TMPDIR=`path` is left. Some of a
    local instance's processes outlive `ray.shutdown()`: in a run of a few seconds the dashboard's
    modules, still starting, wrote their sockets into the temp dir after it was removed. Without
    /proc (not Linux) it returns at once."""
    entry = f"TMPDIR={path}".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(entry in _start_environment(pid) for pid in _process_ids()):
        time.sleep(0.1)


def _process_ids() -> list[str]:
    try:
        return [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def _start_environment(pid: str) -> list[bytes]:
    """The environment a process was started with (/proc/PID/environ; empty if it is gone or not ours)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return environ.read().split(b"\0")
    except OSError:
        return []


def _remove_unless_failed(temp_dir: str, failed: bool) -> None:
    """A local instance's temp dir holds Ray's session logs, 10-20 MB a run: removed after the run,
    kept and named after one that failed (a crash, a failed training), whose worker logs may tell why."""
    if failed:
        logger.warning("Ray's logs of this run are kept in %s", os.path.join(temp_dir, "session_latest", "logs"))
    else:
        shutil.rmtree(temp_dir, ignore_errors=True)


def check_gcs_address(address: str, *, source: str, timeout: float = 10) -> None:
    """Refuse, within about `timeout` seconds, an address where no Ray GCS answers (`ray.init` would
    wait minutes there). A dashboard's http:// address is the job CLI's, not lrc-ray's. "auto",
    Ray Client (ray://) addresses and clusters with TLS (RAY_USE_TLS) are left to Ray.

    Raises:
        UserInputError: naming `source` (the option or variable), the address and what answered.
    """
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    if address.startswith(("http://", "https://")):
        raise UserInputError(
            f"{source} {address}: a dashboard (job server) address; lrc-ray needs the GCS address host:port "
            "(e.g. 127.0.0.1:6379), and `ray job` commands read the dashboard address from RAY_API_SERVER_ADDRESS"
        )
    if address == "auto" or address.startswith("ray://") or os.environ.get("RAY_USE_TLS", "0") not in ("0", ""):
        return
    # Any GCS answers GetClusterId, even before authentication; a proxy must not answer for it.
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED:  # a GCS that wants the token is one
                raise UserInputError(
                    f"{source} {address}: no Ray cluster answers there ({exc.code().name}: "
                    f"{' '.join((exc.details() or '').split())[:200]}); expected the GCS address host:port of a "
                    "running Ray cluster (`lrc-ray cluster up` starts one)"
                ) from None


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_autoscales() -> bool:
    """Whether an autoscaler can add nodes to the connected cluster (so work may ask for resources
    that no node has yet). Read from what Ray's autoscalers leave in the GCS:
    - a cluster config (node groups with their min and max counts), where one was reported;
    - the autoscaler v2 flag (KubeRay's default, `ray up` with RAY_UP_enable_autoscaler_v2);
    - autoscaler v1's status: a head started without an autoscaling config runs v1 on a read-only
      provider, whose node types are its nodes' own ids ("node_<id>"); `ray up` and KubeRay's v1
      sidecar report the node types of their config.
    """
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    config = ray._private.state.state.get_cluster_config()
    if config is not None:
        return any(group.max_count == -1 or group.max_count > group.min_count for group in config.node_group_configs)
    if is_autoscaler_v2(fetch_from_server=True):
        return True
    status = _internal_kv_get(ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = (json.loads(status).get("autoscaler_report") or {}) if status else {}
    node_types = report.get("node_type_mapping") or {}
    return any(node_type != format_readonly_node_type(node) for node, node_type in node_types.items())


def ray_error_message(error: BaseException) -> str:
    """The first line of the innermost cause of an error Ray wrapped."""
    while error.__cause__ is not None:
        error = error.__cause__
    return user_error_line(str(error).strip() or type(error).__name__)


def user_error_line(text: str) -> str:
    """The line of a Ray error report (or a trial's error.txt) that says what went wrong: the
    user's own exception comes last, after Ray's wrapping and traceback."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(("lrc_ray.errors.", "TrainingError", "UserInputError")):
            return line.split(":", 1)[-1].strip()
    return lines[-1] if lines else "unknown error"
