"""Connecting to Ray: an existing cluster when one is named, else a local instance we own."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
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
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise UserInputError(
                f"--address {address}: no Ray cluster answers there ({exc}); start one with `lrc-ray cluster up`"
            ) from None
    else:
        # A short private temp dir: Ray's socket paths must stay under 108 characters.
        temp_dir = tempfile.mkdtemp(prefix="lrc_ray_")
        # The dashboard serves the state API, which Ray Train's placement-group cleaner polls.
        ray.init(num_cpus=num_cpus, resources=resources, include_dashboard=True, dashboard_host="127.0.0.1",
                 logging_level=logging.WARNING, _temp_dir=temp_dir)
        logger.info("started a local Ray instance with %s CPUs", ray.cluster_resources().get("CPU"))
    locks.install()
    try:
        yield
    finally:
        locks.uninstall()
        ray.shutdown()


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


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
