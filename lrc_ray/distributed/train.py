"""Ray Train around the plain pre-training epoch: DDP workers, streamed shards, checkpoints, resume.

The loop is `engine.pretrain.pretrain_one_epoch` with three differences, all here:
- data: each worker streams its shard of the super-pixel Parquet (`get_dataset_shard`), so
  no worker holds the whole data set; rows become two-view batches in the worker;
- the model is wrapped by `prepare_model` (DistributedDataParallel when there are several
  workers: gloo on CPU, NCCL on GPU), and GPU runs use bfloat16 autocast;
- every epoch ends in `ray.train.report` with a checkpoint (rank 0 writes it), so a rerun
  under the same name, or a worker group restarted by `FailureConfig`, resumes from the last
  finished epoch.
Inside a Tune trial the same loop can also run in the trial's own process (`workers=0`): it
streams the whole data set, and reports and checkpoints through the trial instead.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from ray import tune
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from lrc_ray.config import RunConfig, config_from_dict, global_batch_size
from lrc_ray.superpixels.selection import RowSelection, select_rows
from lrc_ray.distributed.runtime import ray_error_message
from lrc_ray.engine.splits import ProbeSource
from lrc_ray.errors import TrainingError

logger = logging.getLogger(__name__)

STATE_FILE = "pretrain_state.pt"
FAULT_ENV = "LRC_RAY_FAULT_KILL_AT_EPOCH"
# Rows a worker shuffles among while streaming: enough to mix neighbouring slices of a volume.
SHUFFLE_BUFFER_ROWS = 256
# Train's controller polls its workers this often (Ray's default: 2 s) and only then sees a run
# start or end; 0.25 s made a short 1-worker run about 3 s faster on 2 cores. Train passes the
# variable on to its controller; a value the user set is kept.
POLL_INTERVAL_ENV, POLL_INTERVAL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"


@dataclass(frozen=True)
class TrainOutcome:
    state_dict: dict  # the online network's weights
    epoch: int  # last finished epoch (0-based)
    history: list[dict]


def pretrain_with_ray_train(
    config: RunConfig,
    *,
    parquet_dir: str,
    selection: RowSelection,
    storage_path: str,
    name: str,
    workers: int,
    use_gpu: bool = False,
    num_classes: int | None = None,
    probe: ProbeSource | None = None,
    report_to_tune: bool = False,
    max_failures: int = 2,
) -> TrainOutcome:
    """Run (or resume) pre-training on `workers` Ray Train workers; returns the final weights.

    `workers=0` (only inside a Tune trial) runs the same loop in the trial's own process, on the
    trial's device, reporting and checkpointing through the trial (`tune.report`), so Tune's own
    trial retries resume it. It skips a worker group's start-up: a controller and a worker process,
    each importing torch, about 20 s a run on 2 CPUs. (Train's own local mode, `num_workers=0`,
    refuses to run inside a Tune function in Ray 2.60.)
    """
    data_context = ray.data.DataContext.get_current()
    # Workers stream quietly: a progress bar per epoch and worker would bury Train's own reports.
    data_context.enable_progress_bars = False
    # Blocks in file order, so a seed gives the same batches run after run (the shuffle is seeded).
    data_context.execution_options.preserve_order = True
    # Ray 2.60's default Parquet reader (DataSource V2) lists the files and reads their footers
    # in new actors on every pass, i.e. every epoch: 1-1.7 s an epoch of 112 slices read in one
    # process against 0.17 s with V1, which reads the footers once, when the dataset is made.
    # Side by side, 2-epoch 1-worker Train runs on 2 CPUs: epoch loops 18.4-19.0 s with V1,
    # 21.1-21.6 s with V2, wall time equal (V1 pays its footers up front); longer runs gain more.
    data_context.use_datasource_v2 = False
    dataset = ray.data.read_parquet(parquet_dir, file_extensions=["parquet"]).map_batches(
        select_rows, fn_kwargs={"selection": selection}, batch_format="pyarrow", batch_size=None
    )
    loop_config = {"config": config.to_dict(), "use_gpu": use_gpu, "num_classes": num_classes, "probe": probe}
    if workers == 0:
        if not report_to_tune:
            raise ValueError("workers=0 runs inside a Tune trial; use api.pretrain(workers=0) for a plain run")
        try:
            return _pretrain_loop(loop_config, _TrialProcess(dataset, use_gpu=use_gpu))
        except Exception as exc:  # as for a Train run: the cause, in one line
            raise TrainingError(f"pre-training run {name} failed: {ray_error_message(exc)}") from None
    callbacks = []
    if report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    logger.info(
        "Ray Train: %d worker(s)%s, global batch %d (= %d workers x %d)",
        workers, " with one GPU each" if use_gpu else "", global_batch_size(config.pretrain.batch_size, workers),
        workers, config.pretrain.batch_size,
    )
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        datasets={"train": dataset},
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    os.environ.setdefault(POLL_INTERVAL_ENV, POLL_INTERVAL_S)
    try:
        result = trainer.fit()
    except Exception as exc:  # Train wraps worker errors; show the cause, not the wrapper
        raise TrainingError(f"pre-training run {name} failed: {ray_error_message(exc)}") from None
    if result.return_value is None:
        raise TrainingError(f"pre-training run {name} finished without its final weights")
    return result.return_value


class _TrainWorker:
    """The loop's surroundings on a Ray Train worker: rank, device, data shard, checkpoints, reports."""

    checkpoint_type = Checkpoint

    def __init__(self) -> None:
        self.rank = ray.train.get_context().get_world_rank()
        self.device = ray.train.torch.get_device()

    def batches(self, **kwargs):
        return ray.train.get_dataset_shard("train").iter_batches(**kwargs)

    def prepare(self, pretrainer):
        # DDP (static graph: each method leaves the same heads unused every step); the MoCo queue
        # is kept identical on every rank by all-gathering keys, so buffers need no broadcast.
        return ray.train.torch.prepare_model(
            pretrainer, parallel_strategy_kwargs={"static_graph": True, "broadcast_buffers": False}
        )

    def last_checkpoint(self):
        return ray.train.get_checkpoint()

    def report(self, metrics: dict, checkpoint) -> None:
        ray.train.report(metrics, checkpoint=checkpoint)


class _TrialProcess:
    """The same inside a Tune trial's own process: rank 0 of 1, the whole data set, Tune's checkpoints."""

    rank = 0
    checkpoint_type = tune.Checkpoint

    def __init__(self, dataset, *, use_gpu: bool) -> None:
        self.dataset = dataset
        self.device = torch.device("cuda" if use_gpu else "cpu")

    def batches(self, **kwargs):
        return self.dataset.iter_batches(**kwargs)

    def prepare(self, pretrainer):
        return pretrainer

    def last_checkpoint(self):
        return tune.get_checkpoint()

    def report(self, metrics: dict, checkpoint) -> None:
        tune.report(metrics, checkpoint=checkpoint)


def _worker_loop(loop_config: dict) -> TrainOutcome | None:
    return _pretrain_loop(loop_config, _TrainWorker())


def _pretrain_loop(loop_config: dict, where: _TrainWorker | _TrialProcess) -> TrainOutcome | None:
    """Pre-train on this worker's shard; rank 0 returns the final weights (Train hands them to `fit`)."""
    from lrc_ray.augment.two_views import TwoViewAugment
    from lrc_ray.engine.pretrain import LrcPretrainer, build_optimizer, pretrain_one_epoch
    from lrc_ray.engine.probe import linear_probe_dice, probe_slices
    from lrc_ray.superpixels.cache import read_parquet_dir

    config = config_from_dict(loop_config["config"])
    settings = config.pretrain
    rank, device = where.rank, where.device
    use_gpu = loop_config["use_gpu"]
    torch.manual_seed(config.seed)
    pretrainer = LrcPretrainer(settings, config.network, seed=config.seed, num_classes=loop_config["num_classes"])
    pretrainer.to(device)
    optimizer = build_optimizer(pretrainer, settings)

    start_epoch, history = 0, []
    checkpoint = where.last_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=True)
        pretrainer.load_state_dict(state["pretrainer"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, list(state["history"])

    step_model = where.prepare(pretrainer)
    probe = None
    if rank == 0 and loop_config["probe"] is not None:
        source: ProbeSource = loop_config["probe"]
        table = read_parquet_dir(Path(source.parquet_dir), columns=["image", "label", "height", "width"])
        probe = probe_slices(table, train_case=source.train_case, validation_cases=source.validation_cases,
                             num_classes=source.num_classes)

    augment = TwoViewAugment(config.augment, output_size=config.data.size)
    generator = torch.Generator(device=device)
    for epoch in range(start_epoch, settings.epochs):
        _maybe_inject_fault(epoch)
        generator.manual_seed(_derived_seed(config.seed, epoch, rank))
        arrow_batches = where.batches(
            batch_size=settings.batch_size, batch_format="pyarrow", drop_last=True,
            local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS, local_shuffle_seed=_derived_seed(config.seed, epoch, rank),
        )
        batches = two_view_batches(arrow_batches, augment, seed=config.seed, epoch=epoch, rank=rank,
                                   with_labels=settings.uses_supervised, device=device)
        metrics = pretrain_one_epoch(
            pretrainer, batches, optimizer, generator=generator, epoch=epoch, progress=False, step_model=step_model,
            device=device, autocast_dtype=torch.bfloat16 if use_gpu else None,
        )
        metrics = _mean_over_ranks(metrics, device) | {"epoch": epoch + 1, "run_start_epoch": start_epoch}
        if probe is not None:
            started = time.perf_counter()
            metrics["probe_dice"] = linear_probe_dice(pretrainer.online.backbone, probe, seed=config.seed)
            metrics["probe_seconds"] = time.perf_counter() - started
        history.append(metrics)
        with tempfile.TemporaryDirectory() as directory:
            epoch_checkpoint = None
            if rank == 0:
                torch.save({"pretrainer": pretrainer.state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch, "history": history}, Path(directory) / STATE_FILE)
                epoch_checkpoint = where.checkpoint_type.from_directory(directory)
            where.report(metrics, epoch_checkpoint)
    if rank != 0:
        return None
    online = {key: value.cpu() for key, value in pretrainer.online.state_dict().items()}
    return TrainOutcome(state_dict=online, epoch=len(history) - 1, history=history)


def _maybe_inject_fault(epoch: int) -> None:
    """For the recovery tests: LRC_RAY_FAULT_KILL_AT_EPOCH="E:MARKER" makes this worker SIGKILL
    itself at the start of epoch E (0-based), once: the marker file records that it happened."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    at_epoch, marker = spec.split(":", 1)
    if int(at_epoch) == epoch and not Path(marker).exists():
        Path(marker).write_text(f"killed at epoch {epoch}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def two_view_batches(arrow_batches, augment, *, seed: int, epoch: int, rank: int, with_labels: bool, device=None):
    """Arrow record batches of cached slices -> two-view training batches, augmented on `device`
    (a GPU worker's augmentation runs on its GPU, batched).

    Each batch's augmentation is seeded by (seed, epoch, rank, batch index), so a resumed or
    retried epoch draws the same views.
    """
    from lrc_ray.data.superpixel_dataset import TwoViewSliceDataset

    for step, table in enumerate(arrow_batches):
        dataset = TwoViewSliceDataset(table, augment, seed=_derived_seed(seed, rank, step), with_labels=with_labels)
        dataset.set_epoch(epoch)
        yield dataset.augmented_batch(range(len(dataset)), device=device)


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _mean_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each rank's loss is over its shard; report the mean over ranks (steps are equal)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return metrics
    names = sorted(metrics)
    values = torch.tensor([float(metrics[name]) for name in names], device=device, dtype=torch.float64)
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return {name: (int(round(value)) if name == "steps" else float(value)) for name, value in zip(names, values.tolist())}
