"""Locks for object stores, which have no `flock`: one named Ray actor grants leases on keys.

Concurrent trials that need one cache entry or one pre-training build it once: the first takes
the key's lease, the others wait for it and then find the output. A lease is renewed by a thread
of its holder and expires `LEASE_S` after the last renewal, so a holder killed mid-build (SIGKILL,
a lost node) frees its keys by itself; the next holder finds no manifest and builds again.
`install()` makes `storage.key_lock` use these leases in this process.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from typing import Iterator

import ray

from lrc_ray import storage

ACTOR_NAME = "lrc_ray_key_locks"
NAMESPACE = "lrc_ray"
LEASE_S = 30.0
POLL_S = 0.5


@ray.remote(num_cpus=0)
class KeyLeases:
    """Key -> (holder token, expiry time); the actor's methods run one at a time."""

    def __init__(self) -> None:
        self.leases: dict[str, tuple[str, float]] = {}

    def acquire(self, key: str, token: str, lease_s: float) -> bool:
        holder = self.leases.get(key)
        now = time.monotonic()
        if holder is not None and holder[0] != token and holder[1] > now:
            return False
        self.leases[key] = (token, now + lease_s)
        return True

    def release(self, key: str, token: str) -> None:
        if self.leases.get(key, (None, 0.0))[0] == token:
            del self.leases[key]


def _leases():
    # Detached: the actor outlives the process that made it (a trial), so later trials share it.
    return KeyLeases.options(name=ACTOR_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached").remote()


@contextlib.contextmanager
def ray_key_lock(key: str, *, lease_s: float = LEASE_S) -> Iterator[None]:
    """Hold the cluster-wide lease on `key` for the block (waiting while another process holds it);
    without Ray running in this process, a lock within the process (never start Ray for a lock)."""
    if not ray.is_initialized():
        with storage.process_lock(key):
            yield
        return
    leases, token = _leases(), uuid.uuid4().hex
    while not ray.get(leases.acquire.remote(key, token, lease_s)):
        time.sleep(POLL_S)
    done = threading.Event()

    def renew() -> None:
        while not done.wait(lease_s / 3):
            ray.get(leases.acquire.remote(key, token, lease_s))

    renewer = threading.Thread(target=renew, name=f"lease-{key[-24:]}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        done.set()
        renewer.join()
        ray.get(leases.release.remote(key, token))


def install() -> None:
    """Use the cluster-wide leases for object-store keys in this process (Ray must be initialised)."""
    storage.set_remote_lock_factory(ray_key_lock)


def uninstall() -> None:
    """Back to locks within this process (before Ray shuts down)."""
    storage.set_remote_lock_factory(None)
