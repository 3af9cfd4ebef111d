"""Shared by the sweep benchmarks: run a sweep inside an already running Ray, and count each
trial's own compute from the reports Tune stored (result.json, one line per report)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from lrc_ray import api
from lrc_ray.distributed.tune import WALL_PREFIX, run_sweep
from lrc_ray.storage import location
from lrc_ray.search_space import SearchSpace, run_config_for


def base_config(space: SearchSpace, data_dir: Path, cache_root: Path):
    return run_config_for(space, {}).replace(data={"data_dir": str(data_dir), "cache_root": str(cache_root)})


def timed_sweep(space: SearchSpace, *, base, storage: Path, name: str, search: str, num_samples=None, **options) -> float:
    """Wall seconds of `run_sweep` (`options`: its other keywords, e.g. resume, parts)."""
    started = time.perf_counter()
    run_sweep(space, base=base, storage=location(storage), name=name, search=search, num_samples=num_samples, **options)
    return time.perf_counter() - started


def trial_reports(experiment: Path) -> dict[str, list[dict]]:
    reports = {}
    for result_file in sorted(experiment.glob("run_trial_*/result.json")):
        lines = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        if lines:
            reports[lines[0]["trial_id"]] = lines
    return reports


def own_compute_seconds(lines: list[dict]) -> float:
    """What a trial computed itself: pre-training epochs it trained (not replayed from a shared
    checkpoint) with their probes, and its fine-tuning with evaluation unless an identical one
    was reused; a finished trial reports the sum as `compute_seconds`."""
    final = [report for report in lines if "compute_seconds" in report]
    if final:
        return final[-1]["compute_seconds"]
    return pretrain_compute_seconds(lines)


def pretrain_compute_seconds(lines: list[dict]) -> float:
    """The pre-training epochs a trial trained itself (not replayed) with their probes: only the
    epochs' reports carry `seconds` and `probe_seconds`."""
    return sum(report.get("seconds", 0.0) + report.get("probe_seconds", 0.0) for report in lines if not report.get("replayed"))


def stage_overheads(lines: list[dict]) -> dict[str, float] | None:
    """A finished trial's seconds beyond its own compute, stage by stage (the trial reports each
    stage's wall time, `wall_seconds/<stage>`): worker and task start-ups, data set-up, result
    handling. The super-pixel stage counts whole (a warm cache: reading it). None if ASHA stopped
    the trial before it fine-tuned."""
    final = lines[-1]
    if WALL_PREFIX + "finetune" not in final:
        return None
    pretrain_compute = pretrain_compute_seconds(lines)
    return {"superpixels": final[WALL_PREFIX + "superpixels"],
            "pretrain": final[WALL_PREFIX + "pretrain"] - pretrain_compute,
            "finetune": final[WALL_PREFIX + "finetune"] - (final["compute_seconds"] - pretrain_compute)}


def built_in_data(space: SearchSpace, workdir: Path) -> Path:
    spec = space.data
    return api.make_synthetic_data(out=workdir / "data", cases=spec.cases, unlabeled=spec.unlabeled,
                                   size=run_config_for(space, {}).data.size, slices=spec.slices, seed=0)


def with_sweep_settings(space: SearchSpace, **changes) -> SearchSpace:
    """The space with some `sweep` settings changed (e.g. workers_per_trial, seed)."""
    return dataclasses.replace(space, sweep=dataclasses.replace(space.sweep, **changes))
