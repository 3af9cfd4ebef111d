"""Ray Train around the plain pre-training loop (`engine.pretrain_loop`): DDP workers, Ray Data
input, checkpoints, resume.

The loop is `engine.pretrain_loop.run_pretraining`; this module supplies its Ray surroundings:
- data: Ray Data reads the cache's Parquet files and its map tasks decode the selected rows into
  compact arrays (`data.shard.compact_record_batch`), on the node's spare CPUs. A worker in the device
  input mode reads the whole set once and keeps it on its device; in the stream mode it reads
  its own split (`get_dataset_shard`) every epoch (`engine.input_path`);
- the model is wrapped by `prepare_model` (DistributedDataParallel when there are several
  workers: gloo on CPU, NCCL on GPU), and GPU runs use bfloat16 autocast;
- every epoch ends in `ray.train.report` with a checkpoint (rank 0 writes it), so a rerun
  under the same name, or a worker group restarted by `FailureConfig`, resumes from the last
  finished epoch.
Inside a Tune trial the same loop can also run in the trial's own process (`workers=0`): it
reads the whole data set, and reports and checkpoints through the trial instead.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from pathlib import Path

import ray
import ray.train
import torch
from ray import tune
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from lrc_ray.config import RunConfig, config_from_dict, global_batch_size
from lrc_ray.data.shard import compact_arrays, compact_record_batch, concat_compact
from lrc_ray.distributed.runtime import cluster_autoscales, ray_error_message
from lrc_ray.engine.input_path import STREAM_WINDOW_ROWS
from lrc_ray.engine.pretrain_loop import DDP_OPTIONS, PretrainOutcome, Surroundings, input_slices, run_pretraining
from lrc_ray.engine.splits import ProbeSource
from lrc_ray.errors import TrainingError, UserInputError
from lrc_ray.storage import Location, location
from lrc_ray.superpixels.selection import RowSelection

logger = logging.getLogger(__name__)

STATE_FILE = "pretrain_state.pt"
FAULT_ENV = "LRC_RAY_FAULT_KILL_AT_EPOCH"
# Train's controller polls its workers this often (Ray's default: 2 s) and only then sees a run
# start or end; 0.25 s made a short 1-worker run about 3 s faster on 2 cores. Train passes the
# variable on to its controller; a value the user set is kept.
POLL_INTERVAL_ENV, POLL_INTERVAL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"
# The two Ray datasets a run may get: every rank's own split (stream mode), and the whole set (device mode).
SPLIT, WHOLE = "split", "whole"
# Pixels a Ray Data task reads and decodes for pre-training: 64 slices of 256 x 256, about 0.2 s.
PIXELS_PER_READ_TASK = 64 * 256 * 256


def pretrain_with_ray_train(
    config: RunConfig,
    *,
    parquet_dir: str,
    selection: RowSelection,
    num_slices: int,
    storage: Location,
    name: str,
    workers: int,
    use_gpu: bool = False,
    num_classes: int | None = None,
    probe: ProbeSource | None = None,
    report_to_tune: bool = False,
    max_failures: int = 2,
) -> PretrainOutcome:
    """Run (or resume) pre-training on `workers` Ray Train workers; returns the final weights.

    `parquet_dir` is the cache entry (a path or URI); the run's checkpoints go to `storage`/`name`.
    `num_slices` is how many slices `selection` keeps (it sizes the input modes and the steps).
    `workers=0` (only inside a Tune trial) runs the same loop in the trial's own process, on the
    trial's device, reporting and checkpointing through the trial (`tune.report`), so Tune's own
    trial retries resume it. It skips a worker group's start-up: a controller and a worker process,
    each importing torch, about 20 s a run on 2 CPUs. (Train's own local mode, `num_workers=0`,
    refuses to run inside a Tune function in Ray 2.60.)

    Raises:
        UserInputError: a worker's input mode was forced to `device` and the slices do not fit.
        TrainingError: the run failed (the cause in one line).
    """
    dataset = ray_dataset(parquet_dir, selection, config.data.size, num_slices)
    loop_config = {"config": config.to_dict(), "num_classes": num_classes, "probe": probe, "num_slices": num_slices}
    if workers == 0:
        if not report_to_tune:
            raise ValueError("workers=0 runs inside a Tune trial; use api.pretrain(workers=0) for a plain run")
        return _run(lambda: run_pretraining(config, _TrialProcess(dataset, num_slices, use_gpu=use_gpu),
                                            num_classes=num_classes, probe=probe), name)
    callbacks = []
    if report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    logger.info(
        "Ray Train: %d worker(s)%s, global batch %d (= %d workers x %d)",
        workers, " with one GPU each" if use_gpu else "", global_batch_size(config.pretrain.batch_size, workers),
        workers, config.pretrain.batch_size,
    )
    # Only the datasets the input mode may read: a split starts a coordinator actor of its own.
    readable = {"auto": (SPLIT, WHOLE), "stream": (SPLIT,), "device": (WHOLE,)}[config.pretrain.input_mode]
    datasets = {name: dataset for name in readable}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[SPLIT] if SPLIT in datasets else []),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    os.environ.setdefault(POLL_INTERVAL_ENV, POLL_INTERVAL_S)
    result = _run(trainer.fit, name)
    if result.return_value is None:
        raise TrainingError(f"pre-training run {name} finished without its final weights")
    return result.return_value


def check_train_resources(workers: int, *, use_gpu: bool) -> None:
    """Refuse at once a Train run the cluster cannot hold, instead of waiting forever: each worker
    takes a CPU (and a GPU with `use_gpu`), and Ray Data needs one CPU more to read the slices.
    A cluster that autoscales may hold it later: the run waits while Ray Train asks for the nodes.

    Raises:
        UserInputError: naming what the run needs and what the cluster has.
    """
    resources = ray.cluster_resources()
    if cluster_autoscales():
        logger.info("the cluster autoscales: the run waits for %d worker(s)' resources (it has %s now)",
                    workers, resources)
        return
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if cpus < workers + 1:
        raise UserInputError(
            f"--workers {workers}: needs {workers + 1} CPUs (one per Train worker, one for Ray Data to read the "
            f"slices), the Ray cluster has {cpus}; use --workers {max(cpus - 1, 0)} or a larger cluster"
        )
    if use_gpu and gpus < workers:
        raise UserInputError(f"--workers {workers} --gpu: needs {workers} GPUs (one per worker), the Ray cluster has {gpus}")


def _run(fit, name: str):
    """Call `fit`; a user error stays one (exit 2), any other failure becomes a TrainingError,
    each with the cause in one line, not Ray's wrapping."""
    try:
        return fit()
    except Exception as exc:  # Train wraps worker errors; show the cause, not the wrapper
        message = ray_error_message(exc)
        if _caused_by_user_input(exc):
            raise UserInputError(message) from None
        raise TrainingError(f"pre-training run {name} failed: {message}") from None


def _caused_by_user_input(error: BaseException | None) -> bool:
    """Whether a worker's UserInputError is behind `error`: Train's WorkerGroupError keeps each
    rank's error, and Ray re-raises a task's error as an instance of its cause's class."""
    while error is not None:
        failures = getattr(error, "worker_failures", {}) or {}
        if isinstance(error, UserInputError) or any(map(_caused_by_user_input, failures.values())):
            return True
        error = error.__cause__ or getattr(error, "cause", None)
    return False


def ray_dataset(parquet_dir: str, selection: RowSelection, side: int, num_slices: int):
    """The cache's Parquet files as a Ray dataset of compact arrays (`data.shard`): its map tasks
    decode the rows that `selection` keeps (about `num_slices`), `PIXELS_PER_READ_TASK` a task."""
    data_context = ray.data.DataContext.get_current()
    # Workers read quietly: a progress bar per epoch and worker would bury Train's own reports.
    data_context.enable_progress_bars = False
    # Blocks in file order, so a seed gives the same stream windows run after run (they are permuted, seeded).
    data_context.execution_options.preserve_order = True
    # Ray 2.60's default Parquet reader (DataSource V2) lists the files and reads their footers
    # in new actors on every pass, i.e. every epoch: 1-1.7 s an epoch of 112 slices read in one
    # process against 0.17 s with V1, which reads the footers once, when the dataset is made.
    # Side by side, 2-epoch 1-worker Train runs on 2 CPUs: epoch loops 18.4-19.0 s with V1,
    # 21.1-21.6 s with V2, wall time equal (V1 pays its footers up front); longer runs gain more.
    data_context.use_datasource_v2 = False
    place = location(parquet_dir)
    # Left to itself, Ray Data cut 4 files of 64 slices into 88 blocks, each a map task of 2-3
    # slices: 3.1 s an epoch of 224 slices on 2 CPUs, against 0.84 s for 4 blocks (0.88 s decoding
    # them in one process).
    blocks = max(1, -(-num_slices * side * side // PIXELS_PER_READ_TASK))
    return ray.data.read_parquet(place.path, filesystem=place.filesystem, file_extensions=["parquet"],
                                 override_num_blocks=blocks).map_batches(
        compact_record_batch, fn_kwargs={"selection": selection, "side": side}, batch_format="pyarrow", batch_size=None
    )


def slices_for(config: RunConfig, where: Surroundings, num_slices: int, *, with_labels: bool, dataset):
    """The input mode's slices; `dataset(WHOLE)` and `dataset(SPLIT)` give the Ray data of each mode
    (the whole set; this rank's split, which Ray Data makes equal on every rank)."""
    def read_whole():
        tables = dataset(WHOLE).iter_batches(batch_size=None, batch_format="pyarrow")
        return concat_compact([compact_arrays(table) for table in tables])

    def windows(epoch: int):
        for table in dataset(SPLIT).iter_batches(batch_size=STREAM_WINDOW_ROWS, batch_format="pyarrow",
                                                 prefetch_batches=2):
            yield compact_arrays(table)

    return input_slices(config, where, num_slices, with_labels=with_labels, read_whole=read_whole, windows=windows,
                        stream_rows=num_slices // where.world_size)


class _RaySurroundings(Surroundings):
    def before_epoch(self, epoch: int) -> None:
        _maybe_inject_fault(epoch)


class _TrainWorker(_RaySurroundings):
    """A Ray Train worker: its rank, device and datasets, Train's checkpoints and reports."""

    def __init__(self, num_slices: int) -> None:
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.num_slices = num_slices

    def slices(self, config: RunConfig, *, with_labels: bool):
        return slices_for(config, self, self.num_slices, with_labels=with_labels, dataset=ray.train.get_dataset_shard)

    def prepare(self, pretrainer):
        return ray.train.torch.prepare_model(pretrainer, parallel_strategy_kwargs=DDP_OPTIONS)

    def last_state(self) -> dict | None:
        return _state_of(ray.train.get_checkpoint(), self.device)

    def report(self, metrics: dict, state: dict | None) -> None:
        _report(ray.train.report, Checkpoint, metrics, state)


class _TrialProcess(_RaySurroundings):
    """The same inside a Tune trial's own process: rank 0 of 1, the whole data set, Tune's checkpoints."""

    def __init__(self, dataset, num_slices: int, *, use_gpu: bool) -> None:
        self.dataset, self.num_slices = dataset, num_slices
        self.device = torch.device("cuda" if use_gpu else "cpu")

    def slices(self, config: RunConfig, *, with_labels: bool):
        return slices_for(config, self, self.num_slices, with_labels=with_labels, dataset=lambda name: self.dataset)

    def last_state(self) -> dict | None:
        return _state_of(tune.get_checkpoint(), self.device)

    def report(self, metrics: dict, state: dict | None) -> None:
        _report(tune.report, tune.Checkpoint, metrics, state)


def _state_of(checkpoint, device: torch.device) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=True)


def _report(report, checkpoint_type, metrics: dict, state: dict | None) -> None:
    """Report an epoch, with a checkpoint of `state` where there is one (rank 0)."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if state is not None:
            torch.save(state, Path(directory) / STATE_FILE)
            checkpoint = checkpoint_type.from_directory(directory)
        report(metrics, checkpoint=checkpoint)


def _worker_loop(loop_config: dict) -> PretrainOutcome | None:
    config = config_from_dict(loop_config["config"])
    return run_pretraining(config, _TrainWorker(loop_config["num_slices"]), num_classes=loop_config["num_classes"],
                           probe=loop_config["probe"])


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
