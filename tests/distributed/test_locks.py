"""Object-store keys locked through a named Ray actor: one holder at a time across processes, and a
lease that a killed holder frees by itself."""

from __future__ import annotations

import time

import pytest

from lrc_ray.distributed import locks

pytestmark = pytest.mark.ray

URI = "s3://bucket/cache?endpoint_override=127.0.0.1:9&scheme=http"  # never contacted: only the lock's name


def test_two_processes_never_hold_one_object_store_key_at_once(local_ray):
    def hold_for(key: str, seconds: float) -> tuple[float, float]:  # defined here: Ray ships it by value
        from lrc_ray.distributed import locks
        from lrc_ray.storage import key_lock, location

        locks.install()
        with key_lock(location(URI), key):
            started = time.time()
            time.sleep(seconds)
            return started, time.time()

    hold = local_ray.remote(num_cpus=1)(hold_for)
    first, second = local_ray.get([hold.remote("entry-a", 1.0), hold.remote("entry-a", 1.0)])
    (a_start, a_end), (b_start, b_end) = sorted([first, second])
    assert b_start >= a_end, "the second holder entered only after the first left"


def test_a_lease_whose_holder_died_expires(local_ray):
    leases = locks._leases()
    # A holder that took the key and was killed: it never renews nor releases.
    assert local_ray.get(leases.acquire.remote("entry-b", "dead-holder", 1.0))
    started = time.monotonic()
    with locks.ray_key_lock("entry-b", lease_s=5.0):
        waited = time.monotonic() - started
    assert 0.5 <= waited < 5, f"waited {waited:.1f} s for a 1 s lease"
    assert local_ray.get(leases.acquire.remote("entry-b", "next", 1.0)), "released on leaving the block"
