"""A trial's fine-tuning task on a GPU runs in a fresh process each time: a reused process would keep
the CUDA device of its first task whatever GPU Ray assigns it next."""

from __future__ import annotations

import logging
import shutil
import tempfile

import pytest

from lrc_ray.distributed.tune import one_device_task

pytestmark = pytest.mark.ray


def test_each_gpu_task_runs_in_a_fresh_process():
    import ray

    def process_id() -> int:  # defined here: Ray ships it by value
        import os

        return os.getpid()

    assert not ray.is_initialized(), "a previous test left Ray running"
    temp_dir = tempfile.mkdtemp(prefix="lrt_gpu_")
    # Ray schedules by the GPUs it is told of; none is touched. No dashboard: nothing here polls it.
    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, logging_level=logging.WARNING, _temp_dir=temp_dir)
    try:
        task = one_device_task(process_id, use_gpu=True)
        processes = [ray.get(task.remote()) for _ in range(3)]
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert len(set(processes)) == 3, f"GPU tasks shared a process: {processes}"
