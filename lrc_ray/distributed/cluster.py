"""A local Ray head for `ray job submit`: start it, stop exactly it, and tell the job CLI how to
reach it.

`ray start` turns token authentication on (Ray >= 2.59), and the job CLI sends the token only
with RAY_AUTH_MODE=token. The head gets its own token file and temp dir in the working area
(not ~/.ray or /tmp/ray), runs as `ray start --block` in its own process group, and is stopped
by signalling that process (it stops what it started), never by `ray stop`, which
would stop every Ray on the machine. `env.sh` holds the variables that both the job CLI and
lrc-ray run on the head need:

    source .lrc_ray/cluster/env.sh && ray job submit ... -- lrc-ray tune ...
    source .lrc_ray/cluster/env.sh && lrc-ray tune ...      # a driver on this machine
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lrc_ray.atomic import atomic_write_path
from lrc_ray.errors import UserInputError

TRIAL_SLOT = "trial_slot"  # the custom resource a sweep's trial drivers hold (see distributed.tune)
# Ray's socket paths under the temp dir must stay under 108 characters.
_MAX_TEMP_DIR_CHARS = 40


@dataclass(frozen=True)
class LocalHead:
    workdir: Path
    pid: int
    dashboard_url: str
    gcs_address: str

    @property
    def env_file(self) -> Path:
        return self.workdir / "env.sh"


def client_env(workdir: Path) -> dict[str, str]:
    """What `ray job ...` and lrc-ray need in their environment to talk to the local head: the GCS
    address in RAY_ADDRESS (what `ray.init` and lrc-ray connect to) and the dashboard's in
    RAY_API_SERVER_ADDRESS (the job CLI reads it before RAY_ADDRESS), with the token."""
    state = _read_state(workdir)
    return {
        "RAY_ADDRESS": state["gcs_address"],
        "RAY_API_SERVER_ADDRESS": state["dashboard_url"],
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(workdir / "auth_token"),
    }


def local_up(
    workdir: Path, *, num_cpus: int | None = None, port: int = 6379, dashboard_port: int = 8265, timeout: float = 90
) -> LocalHead:
    """Start a Ray head bound to 127.0.0.1 with token authentication; returns when the job server answers."""
    workdir = workdir.resolve()
    if (workdir / "head.json").is_file() and _alive(_read_state(workdir)["pid"]):
        raise UserInputError(f"a local head is already running ({workdir}); stop it with `lrc-ray cluster down`")
    for taken in (port, dashboard_port):
        if _port_in_use(taken):
            raise UserInputError(f"port {taken} is in use on 127.0.0.1 (another Ray head?); pick another with --port/--dashboard-port")
    workdir.mkdir(parents=True, exist_ok=True)
    token = workdir / "auth_token"
    if not token.is_file():
        with atomic_write_path(token) as tmp:
            tmp.write_text(secrets.token_hex(32))
            tmp.chmod(0o600)
    temp_dir = _ray_temp_dir(workdir)
    (temp_dir / "tmp").mkdir(parents=True, exist_ok=True)
    cpus = num_cpus or os.cpu_count() or 1
    # The node's agent runs submitted jobs. On Ray's fixed default port a second head on the
    # machine had no agent, and every job submitted to it failed ("No available agent").
    agent_port = free_port()
    env = {
        **os.environ,
        "RAY_AUTH_TOKEN_PATH": str(token),
        # Jobs run `lrc-ray` from the environment the head was started in.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # On SIGTERM, Ray >= 2.60 drains the node (for Serve's proxies) until it is idle, or 30 s;
        # Ray Data's detached autoscaling actor keeps it busy after any job that read data, so
        # `cluster down` waited the whole 30 s. This head serves no traffic: stop at once.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        # The head's processes and jobs keep their temp files in its temp dir, removed by `cluster
        # down`: the dashboard's multiprocessing forkserver, killed at the stop, left a pymp-* dir in /tmp.
        "TMPDIR": str(temp_dir / "tmp"),
    }
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true", f"--dashboard-agent-listen-port={agent_port}", f"--temp-dir={temp_dir}",
        f"--num-cpus={cpus}", f"--resources={json.dumps({TRIAL_SLOT: cpus})}", "--disable-usage-stats",
    ]
    log = open(workdir / "head.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = LocalHead(workdir, process.pid, f"http://127.0.0.1:{dashboard_port}", f"127.0.0.1:{port}")
    _write_state(head, temp_dir)
    deadline = time.monotonic() + timeout
    # Up when both answer: the job server waits only 10 s for the agent (up 3 s after it here).
    while not (_answers(f"{head.dashboard_url}/api/version") and _answers(f"http://127.0.0.1:{agent_port}/api/healthz")):
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process.pid)
            (workdir / "head.json").unlink(missing_ok=True)
            shutil.rmtree(temp_dir, ignore_errors=True)
            tail = (workdir / "head.log").read_text().strip().splitlines()[-1:] or ["no output"]
            raise UserInputError(f"the Ray head did not start (see {workdir / 'head.log'}): {tail[0][:200]}")
        time.sleep(0.5)
    with atomic_write_path(head.env_file) as tmp:
        tmp.write_text("".join(f"export {key}={value}\n" for key, value in client_env(workdir).items()))
    return head


def submit(workdir: Path, entrypoint: list[str], *, project: Path, wait: bool = True) -> int:
    """`ray job submit` to the local head with its token and the project's runtime_env; returns
    the job CLI's exit code (0 when the job succeeded, with --no-wait when it was accepted)."""
    workdir = workdir.resolve()
    if not (workdir / "head.json").is_file() or not _alive(_read_state(workdir)["pid"]):
        raise UserInputError(f"no local Ray head is running ({workdir}); start one with `lrc-ray cluster up` "
                             "(or cluster/local-up.sh)")
    if not entrypoint:
        raise UserInputError("nothing to submit; give the command after --, e.g. -- lrc-ray tune search_spaces/quickstart.yaml")
    env = {**os.environ, **client_env(workdir)}
    command = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", env["RAY_API_SERVER_ADDRESS"],
        "--runtime-env", str(project / "cluster" / "runtime_env.yaml"), "--working-dir", str(project),
        *([] if wait else ["--no-wait"]), "--", *entrypoint,
    ]
    return subprocess.run(command, env=env).returncode


def local_down(workdir: Path, *, timeout: float = 60) -> bool:
    """Stop the head `local_up` started in `workdir` (only it); False when none was running."""
    workdir = workdir.resolve()
    if not (workdir / "head.json").is_file():
        return False
    state = _read_state(workdir)
    stopped = _stop(state["pid"], timeout=timeout) if _alive(state["pid"]) else False
    for name in ("head.json", "env.sh"):
        (workdir / name).unlink(missing_ok=True)
    shutil.rmtree(state["temp_dir"], ignore_errors=True)
    return stopped


def _stop(pid: int, timeout: float = 60) -> bool:
    """SIGTERM to `ray start --block` (it stops its processes), then SIGKILL to its
    process group for anything left."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        os.killpg(pid, signal.SIGKILL)  # the group of the head process only (start_new_session)
    except ProcessLookupError:
        pass
    return True


def _ray_temp_dir(workdir: Path) -> Path:
    """`workdir/ray`, or a short private directory when that path is too long for Ray's sockets."""
    temp_dir = workdir / "ray"
    if len(str(temp_dir)) > _MAX_TEMP_DIR_CHARS:
        return Path(tempfile.mkdtemp(prefix="lrc_ray_head_"))
    return temp_dir


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except urllib.error.HTTPError as error:  # 401 without a token: the server is up
        return error.code == 401
    except (urllib.error.URLError, OSError):
        return False


def free_port() -> int:
    """A port nothing listens on (now) on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _write_state(head: LocalHead, temp_dir: Path) -> None:
    state = {"pid": head.pid, "dashboard_url": head.dashboard_url, "gcs_address": head.gcs_address, "temp_dir": str(temp_dir)}
    with atomic_write_path(head.workdir / "head.json") as tmp:
        tmp.write_text(json.dumps(state))


def _read_state(workdir: Path) -> dict:
    try:
        return json.loads((workdir / "head.json").read_text())
    except (OSError, ValueError):
        raise UserInputError(f"{workdir}: no local head recorded; start one with `lrc-ray cluster up`") from None
