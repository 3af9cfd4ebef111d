"""The one pre-training loop, for every surrounding: this process, a Ray Train worker, a Tune trial.

What differs between surroundings is passed in as a `Surroundings`: rank and world size, the
device, where the slices come from (`engine.input_path`), how the model is wrapped for data
parallelism, the last state to resume from, and where an epoch's metrics and state go. The loop
itself (model, optimizer, resume, epochs, the per-epoch probe, the mean of the metrics over
ranks) is written once, here; `distributed/train.py` supplies the Ray surroundings, and
`LocalRun` below runs it in this process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lrc_ray.augment.two_views import TwoViewAugment
from lrc_ray.config import RunConfig
from lrc_ray.engine.input_path import (
    STREAM_WINDOW_ROWS, DeviceResidentSlices, StreamedSlices, TwoViewBatches, choose_input_mode, free_memory_bytes,
)
from lrc_ray.engine.pretrain import GLOBAL_TOP1, LrcPretrainer, build_optimizer, pretrain_one_epoch
from lrc_ray.engine.splits import ProbeSource
from lrc_ray.storage import Location

logger = logging.getLogger(__name__)


# DistributedDataParallel's options for the pre-trainer. Each method leaves some heads unused,
# which DDP must be told; `static_graph=True` instead (used until 2026-11-29) never averaged the
# gradients of this model: ranks trained apart (a 2-rank step's gradients differed from the
# 1-process ones by 100 %; with these options they agree to rounding, tests/engine/test_pretrain_loop.py).
# The MoCo queue is kept identical on every rank by all-gathering keys, so buffers need no broadcast.
DDP_OPTIONS = {"find_unused_parameters": True, "broadcast_buffers": False}


@dataclass(frozen=True)
class PretrainOutcome:
    state_dict: dict  # the online network's weights, on the CPU
    epoch: int  # last finished epoch (0-based)
    history: list[dict]


class Surroundings:
    """Where the loop runs. Defaults: one process, rank 0 of 1, nothing to resume, no reports."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    progress: bool = False

    def slices(self, config: RunConfig, *, with_labels: bool) -> DeviceResidentSlices | StreamedSlices:
        raise NotImplementedError

    def prepare(self, pretrainer: LrcPretrainer) -> nn.Module:
        """The module whose forward computes the loss (a DistributedDataParallel wrapper, say)."""
        return pretrainer

    def last_state(self) -> dict | None:
        """The state `report` saved last, to resume from."""
        return None

    def before_epoch(self, epoch: int) -> None:
        pass

    def report(self, metrics: dict, state: dict | None) -> None:
        """An epoch's metrics (every rank) and, on rank 0, the state to resume from."""


def run_pretraining(
    config: RunConfig, where: Surroundings, *, num_classes: int | None = None, probe: ProbeSource | None = None
) -> PretrainOutcome | None:
    """Pre-train (or resume) `config.pretrain` in `where`; rank 0 returns the final weights."""
    from lrc_ray.engine.probe import linear_probe_dice, probe_slices
    from lrc_ray.superpixels.cache import read_parquet_dir

    settings = config.pretrain
    device = where.device
    torch.manual_seed(config.seed)
    pretrainer = LrcPretrainer(settings, config.network, seed=config.seed, num_classes=num_classes)
    pretrainer.to(device, memory_format=torch.channels_last if settings.channels_last else torch.preserve_format)
    optimizer = build_optimizer(pretrainer, settings)
    start_epoch, history = 0, []
    state = where.last_state()
    if state is not None:
        pretrainer.load_state_dict(state["pretrainer"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, list(state["history"])
    if settings.compile:
        compile_networks(pretrainer)
    step_model = where.prepare(pretrainer)
    probe_data = None
    if where.rank == 0 and probe is not None:
        table = read_parquet_dir(probe.parquet_dir, columns=["image", "label", "height", "width"])
        probe_data = probe_slices(table, train_case=probe.train_case, validation_cases=probe.validation_cases,
                                  num_classes=probe.num_classes)

    batches = TwoViewBatches(TwoViewAugment(config.augment, output_size=config.data.size), seed=config.seed,
                             with_labels=settings.uses_supervised)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    # closing: the stream mode's reader thread stops with the loop, whatever ends it.
    with closing(where.slices(config, with_labels=settings.uses_supervised)) as slices:
        for epoch in range(start_epoch, settings.epochs):
            where.before_epoch(epoch)
            metrics = pretrain_one_epoch(pretrainer, slices.batches(batches, epoch), optimizer, epoch=epoch,
                                         progress=where.progress, step_model=step_model, autocast_dtype=autocast,
                                         total=slices.steps_per_epoch)
            metrics = mean_over_ranks(metrics, device) | {
                "epoch": epoch + 1, "run_start_epoch": start_epoch, "input_mode": slices.mode,
                "ended_at": time.time(),
            }
            if probe_data is not None:
                started = time.perf_counter()
                metrics["probe_dice"] = linear_probe_dice(pretrainer.online.backbone, probe_data, seed=config.seed)
                metrics["probe_seconds"] = time.perf_counter() - started
            history.append(metrics)
            logger.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                         if isinstance(v, float)))
            state = None
            if where.rank == 0:
                state = {"pretrainer": pretrainer.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                         "history": history}
            where.report(metrics, state)
    if where.rank != 0:
        return None
    if history:
        warn_if_global_branch_collapsed(history[-1], settings.batch_size)
    online = {key: value.detach().cpu() for key, value in pretrainer.online.state_dict().items()}
    return PretrainOutcome(state_dict=online, epoch=len(history) - 1, history=history)


# The global (MoCo) branch is called collapsed when a view finds its partner among the batch at
# most this many times as often as chance (1 / batch); a branch that learned finds it far more
# often (bench/global_embedding.py prints the figures).
COLLAPSED_TOP1_OVER_CHANCE = 2.0


def warn_if_global_branch_collapsed(metrics: dict, batch_size: int) -> None:
    """A warning when the last epoch's GLOBAL_TOP1 says the global branch tells no slices apart:
    its loss alone does not show it (the queue's older keys keep it below chance)."""
    top1, chance = metrics.get(GLOBAL_TOP1), 1.0 / batch_size
    # In batches of fewer than 4 slices twice chance is over half: the figure cannot tell.
    if top1 is not None and batch_size >= 4 and top1 <= COLLAPSED_TOP1_OVER_CHANCE * chance:
        logger.warning(
            "pre-training epoch %d: the global (MoCo) branch has collapsed: a view finds its partner among the "
            "batch's %.2f of the time, chance %.2f (global_top1), so the global loss teaches nothing (what was "
            "measured: docs/reference.md#pre-training)",
            metrics["epoch"] - 1, top1, chance)


def compile_networks(pretrainer: LrcPretrainer) -> None:
    """torch.compile the encoder-decoders in place (their weights keep their names). The loss and
    the sampling, whose shapes change from step to step, stay eager."""
    pretrainer.online.backbone.compile()
    if pretrainer.momentum_network is not None:
        pretrainer.momentum_network.backbone.compile()


def mean_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each rank's loss is over its part of the batches; report the mean over ranks (steps are equal)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return metrics
    names = sorted(metrics)
    values = torch.tensor([float(metrics[name]) for name in names], device=device, dtype=torch.float64)
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return {name: (int(round(value)) if name == "steps" else float(value)) for name, value in zip(names, values.tolist())}


def input_slices(config: RunConfig, where: Surroundings, num_slices: int, *, with_labels: bool,
                 read_whole: Callable[[], dict[str, np.ndarray]],
                 windows: Callable[[int], Iterator[dict[str, np.ndarray]]], stream_rows: int
                 ) -> DeviceResidentSlices | StreamedSlices:
    """The input mode's slices (`engine.input_path`): `read_whole()` gives every selected slice (the
    device mode reads them once), `windows(epoch)` this rank's `stream_rows` rows (the stream mode)."""
    settings = config.pretrain
    mode = choose_input_mode(settings.input_mode, num_slices=num_slices, size=config.data.size,
                             free_bytes=free_memory_bytes(where.device))
    shape = dict(batch_size=settings.batch_size, world_size=where.world_size, rank=where.rank, with_labels=with_labels)
    if mode == "device":
        return DeviceResidentSlices(read_whole(), where.device, **shape)
    return StreamedSlices(windows, where.device, steps_per_epoch=stream_rows // settings.batch_size,
                          epochs=settings.epochs, **shape)


def slices_from_arrays(arrays: dict[str, np.ndarray], config: RunConfig, where: Surroundings, *,
                       with_labels: bool) -> DeviceResidentSlices | StreamedSlices:
    """All the selected slices, in memory already (in process: the stream mode just walks them in windows)."""
    count = len(arrays["row_key"])

    def windows(epoch: int):
        for start in range(0, count, STREAM_WINDOW_ROWS):
            yield {name: values[start : start + STREAM_WINDOW_ROWS] for name, values in arrays.items()}

    return input_slices(config, where, count, with_labels=with_labels, read_whole=lambda: arrays, windows=windows,
                        stream_rows=count)


class LocalRun(Surroundings):
    """This process, on the CPU: every epoch's weights, config and history go to `checkpoint` (the
    `engine.checkpoint` format), so the file is always the last finished epoch's."""

    def __init__(self, config: RunConfig, arrays: dict[str, np.ndarray], checkpoint: Path | Location, *,
                 progress: bool) -> None:
        self.config, self.arrays, self.checkpoint, self.progress = config, arrays, checkpoint, progress

    def slices(self, config: RunConfig, *, with_labels: bool):
        return slices_from_arrays(self.arrays, config, self, with_labels=with_labels)

    def report(self, metrics: dict, state: dict | None) -> None:
        from lrc_ray.engine.checkpoint import save_checkpoint

        online = {key[len("online."):]: value for key, value in state["pretrainer"].items() if key.startswith("online.")}
        save_checkpoint(self.checkpoint, state_dict=online, config=self.config.to_dict(), epoch=state["epoch"],
                        history=state["history"])
