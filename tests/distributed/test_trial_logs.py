"""What a trial prints besides Tune's table: Ray Data's real warnings, not its false alarm that a
dataset will hang when the trial's own Ray Data work holds the CPU set aside for it."""

from __future__ import annotations

import logging

import pytest

import ray
from lrc_ray.distributed.tune import quiet_trial_logs
from ray.util.debug import reset_log_once

pytestmark = pytest.mark.ray


class Recorded(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def warnings_of_a_dataset_started_with_no_free_cpu(monkeypatch) -> list[str]:
    """Ray Data's own warnings as a dataset runs while Ray reports no CPU free."""
    recorded = Recorded()
    dataset_log = logging.getLogger("ray.data.dataset")
    dataset_log.addHandler(recorded)
    reset_log_once("cpu_warning")  # Ray warns once a process
    try:
        with monkeypatch.context() as patched:
            patched.setattr(ray, "available_resources", lambda: {})
            assert ray.data.range(4).materialize().count() == 4
        dataset_log.warning("a warning of Ray Data's that a trial shows")
    finally:
        dataset_log.removeHandler(recorded)
    return recorded.messages


def test_a_trial_shows_ray_datas_warnings_but_not_its_no_free_cpu_alarm(local_ray, monkeypatch):
    before = warnings_of_a_dataset_started_with_no_free_cpu(monkeypatch)
    assert any("The Dataset job will hang" in message for message in before), before  # Ray's alarm, as Ray words it

    changed = [logging.getLogger(name) for name in (
        "ray.data.dataset", "ray.train._internal.storage", "ray.data._internal.execution.streaming_executor",
        "ray.data._internal.datasource.parquet_datasource", "ray.data._internal.progress")]
    saved = [(logger.level, list(logger.filters)) for logger in changed]
    data_context = ray.data.DataContext.get_current()
    progress_bars = data_context.enable_progress_bars
    try:
        quiet_trial_logs()
        after = warnings_of_a_dataset_started_with_no_free_cpu(monkeypatch)
    finally:  # as this process's other tests expect them
        for logger, (level, filters) in zip(changed, saved):
            logger.setLevel(level)
            logger.filters[:] = filters
        data_context.enable_progress_bars = progress_bars
    assert after == ["a warning of Ray Data's that a trial shows"]
