"""Ray Tune: the sweep's Tuner (Optuna TPE + ASHA), the finalists' Tuner, and the thin trial.

One trial, run by a Tune function. With `workers_per_trial` N >= 1 it is a driver that holds one
`trial_slot` (a custom resource, so it takes no CPU that its Train workers and Ray Data tasks
need); with 0 it holds one CPU (or GPU) and trains in its own process, which Tune reuses.
A trial runs the run stages (`lrc_ray.stages`), whose outputs are keyed and shared by the
trials of a sweep and its finalists:
1. super-pixels: the cache entry of its Felzenszwalb settings (built with Ray Data when missing);
2. pre-training (a TorchTrainer of N workers, or the same loop in the trial's process),
   reporting a frozen-feature probe Dice every epoch (the number ASHA compares). A pre-training
   an earlier trial made is not run again: its reports are replayed;
3. fine-tuning at the trial's label fraction and evaluation (in a Ray task of one CPU or GPU, or
   in the trial's process), reporting the per-organ and mean 3D Dice on the validation volumes
   (the number Optuna optimises by default) and, for finalists, on the test volumes.
`scratch` has nothing to pre-train, so ASHA never sees a probe value for it: it always
reaches fine-tuning. The searchers are in `distributed.search`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lrc_ray import stages
from lrc_ray.config import RunConfig
from lrc_ray.distributed import locks
from lrc_ray.distributed.cluster import TRIAL_SLOT
from lrc_ray.distributed.runtime import cluster_autoscales, ray_error_message, user_error_line
from lrc_ray.distributed.search import (
    ListedSearch, make_searcher, search_algorithm, storage_for_new_studies, study_names,
)
from lrc_ray.distributed.superpixels import ray_data_extract
from lrc_ray.engine.splits import SPLIT_PARTS
from lrc_ray.errors import UserInputError
from lrc_ray.finalists import TEST_PREFIX, space_to_search
from lrc_ray.search_space import (
    Choice, Fixed, LogUniform, QUniform, RandInt, SearchSpace, SweepSettings, Uniform, config_with_values, grid_points,
)
from lrc_ray.storage import Location, location

logger = logging.getLogger(__name__)

PROBE_METRIC = "probe_dice"
GLOBAL_TOP1 = "global_top1"  # engine.pretrain.GLOBAL_TOP1, named here: the driver imports no torch
EPOCH = "epoch"  # pre-training epochs finished (ASHA's time attribute)
WALL_PREFIX = "wall_seconds/"  # + superpixels, pretrain, finetune: a finished trial's stages by the clock
SWEEP_FILE = "lrc_ray_sweep.json"  # what `results` needs beyond Tune's own files
FINALISTS_FILE = "lrc_ray_finalists.json"  # the finalists' plan and the name of their Tune experiment
OPTUNA_JOURNAL = "optuna_journal.log"  # the searcher's Optuna studies, by default (optuna-dashboard reads it)
LOCAL_JOURNALS = Path(".lrc_ray/optuna")  # the default journals of sweeps kept on object stores


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs besides its sampled values (plain data: it is pickled to trials)."""

    base: dict  # the run config before the trial's values, with absolute paths
    space_params: dict  # dotted key -> fixed value, merged under the trial's values
    root: str  # the stage outputs' root (`stages`): the sweep's experiment directory (a path or URI)
    workers: int
    use_gpu: bool
    parts: tuple[str, ...] = ("validation",)  # the held-out parts a trial scores
    probe: bool = True  # report the probe Dice every pre-training epoch (for ASHA)
    runs: tuple[dict, ...] = ()  # finalists: trial {"finalist": i} runs the values runs[i]


def tune_param_space(space: SearchSpace) -> dict[str, Any]:
    """The searched keys as Tune domains (the whitelist of the schema); fixed keys are left out."""
    domains = {}
    for key, spec in space.params.items():
        if isinstance(spec, Fixed):
            continue
        if isinstance(spec, Choice):
            domains[key] = tune.choice(list(spec.values))
        elif isinstance(spec, Uniform):
            domains[key] = tune.uniform(spec.low, spec.high)
        elif isinstance(spec, LogUniform):
            domains[key] = tune.loguniform(spec.low, spec.high)
        elif isinstance(spec, RandInt):
            domains[key] = tune.randint(spec.low, spec.high + 1)  # Tune's upper end is exclusive
        elif isinstance(spec, QUniform) and spec.integral:
            domains[key] = tune.qrandint(int(spec.low), int(spec.high), int(spec.q))  # integer fields stay ints
        elif isinstance(spec, QUniform):
            domains[key] = tune.quniform(spec.low, spec.high, spec.q)
        else:  # a new schema type must be mapped here before it can be used
            raise TypeError(f"no Tune distribution for {type(spec).__name__}")
    return domains


def fixed_values(space: SearchSpace) -> dict[str, Any]:
    return {key: spec.value for key, spec in space.params.items() if isinstance(spec, Fixed)}


def trial_concurrency(resources: dict[str, float], *, workers: int, use_gpu: bool, cap: int | None,
                      autoscaling: bool = False) -> int:
    """Trials at once. On a static cluster, those that fit its `resources` now: each needs `workers`
    CPUs (or GPUs) for Train, or one for a trial that pre-trains in its own process (`workers` 0),
    plus one CPU for its Ray Data reads and fine-tuning (more would starve Ray Data of CPUs); at
    most `cap`. On a cluster that `autoscaling` can grow, `cap` (sweep.max_concurrent_trials) when
    set, whatever runs now: a trial whose workers have no node yet waits while Ray Train asks the
    autoscaler for them. Never more than the trial slots.

    Raises:
        UserInputError: not one trial fits (and, autoscaling, no `cap` says how many to run).
    """
    devices, cpus = max(workers, 1), trial_cpus(workers)
    slots = int(resources[TRIAL_SLOT]) if TRIAL_SLOT in resources else None
    if autoscaling and cap:
        fits = cap
    else:
        fits = int(resources.get("CPU", 1) // cpus)
        if use_gpu:
            fits = min(fits, int(resources.get("GPU", 0) // devices))
        fits = min(fits, cap) if cap else fits
    if slots is not None:
        fits = min(fits, slots)
    if fits < 1:
        need = f"{devices} GPU(s) and {cpus} CPUs" if use_gpu else f"{cpus} CPUs"
        hint = "set sweep.max_concurrent_trials" + (
            ": the cluster autoscales, and trials then wait for the nodes they ask for" if autoscaling
            else " on a cluster that autoscales, or add nodes")
        raise UserInputError(f"sweep.workers_per_trial: a trial needs {need}, the cluster has {resources}; {hint}")
    return fits


def trial_cpus(workers: int) -> int:
    """The CPUs set aside per trial: one per Train worker (or one for a trial that trains in its own
    process), plus one for its Ray Data reads and fine-tuning."""
    return max(workers, 1) + 1


def driver_resources(resources: dict[str, float], *, workers: int, use_gpu: bool) -> dict[str, float]:
    """What a trial's own process holds. A driver of Train workers: a trial slot where the cluster
    defines them (lrc_ray's local Ray and cluster files do), else one CPU (a driver must reserve
    something, and zero CPUs is refused). A trial that trains in its own process (`workers` 0):
    its device, one CPU or one GPU, besides its slot."""
    slot = {TRIAL_SLOT: 1} if TRIAL_SLOT in resources else {}
    if workers == 0:
        return slot | ({"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1})
    return slot or {"CPU": 1}


def trial_run_key(context: SweepContext, trial_values: dict) -> str:
    """The run a trial's values make (`stages.run_keys`'s fine-tuning key), for the searcher;
    values the config refuses get a key of their own (the trial runs and reports the error)."""
    try:
        return stages.run_keys(trial_config(context, trial_values), context.workers)[1]
    except UserInputError:
        return "invalid-" + hashlib.blake2b(json.dumps(trial_values, sort_keys=True, default=str).encode(),
                                            digest_size=10).hexdigest()


def run_sweep(
    space: SearchSpace,
    *,
    base: RunConfig,
    storage: Location,
    name: str,
    num_samples: int | None = None,
    resume: bool = False,
    search: str = "tpe",
    parts: tuple[str, ...] = ("validation",),
    optuna_storage: str | None = None,
):
    """Run (or, with `resume`, continue) a sweep in the connected Ray cluster; returns the ResultGrid.

    `search` "tpe": Optuna TPE proposes `num_samples` settings (shared among the label fractions,
    each its own search) and ASHA stops weak pre-trainings early. Its Optuna studies (named
    `search.study_names`) are kept in `optuna_storage` (an Optuna database URL or a journal
    file), by default the journal file OPTUNA_JOURNAL in the sweep's directory; a resumed sweep
    goes on in them. "grid": every point of a space of choices, each run to the end (no early
    stopping). Trials score the validation volumes; `parts` SPLIT_PARTS also scores the test
    volumes (for benchmarks that measure the truth a search is judged by: a search never reads them).
    """
    experiment = storage.join(name)
    settings = space.sweep
    # Per-epoch probe reports lack the searched metric by design (only fine-tuning reports it);
    # Tune's check would refuse them. The metric name is checked against the data's organs instead.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    context = SweepContext(base=base.to_dict(), space_params=fixed_values(space), root=str(experiment),
                           workers=settings.workers_per_trial, use_gpu=settings.use_gpu, parts=parts)
    trainable, concurrency = _trainable(run_trial, context, settings)
    if resume:  # the searcher comes back with its storage and studies
        if not tune.Tuner.can_restore(experiment.path, storage_filesystem=experiment.filesystem):
            raise UserInputError(f"--resume: no sweep to resume at {experiment}")
        logger.info("resuming %s with up to %d trial(s) at a time", experiment, concurrency)
        tuner = tune.Tuner.restore(experiment.path, trainable=trainable, resume_unfinished=True, restart_errored=True,
                                   storage_filesystem=experiment.filesystem)
        return tuner.fit()
    if experiment.listdir():
        raise UserInputError(f"--name {name}: {experiment} already holds a sweep; pass --resume to continue it or pick another name")
    if search == "grid":
        points = [{key: value for key, value in point.items() if isinstance(space.params[key], Choice)}
                  for point in grid_points(space)]  # grid_points also refuses continuous parameters, by name
        trials, param_space = len(points), None
        tune_config = tune.TuneConfig(search_alg=search_algorithm(ListedSearch(points), max_concurrent=concurrency),
                                      num_samples=trials, reuse_actors=_reuse_actors(settings))
    else:
        trials = num_samples or settings.num_samples
        scheduler = early_stopping(settings, _largest_epochs(space, base))
        optuna_storage = optuna_storage or default_optuna_journal(experiment, name)
        studies = storage_for_new_studies(optuna_storage, study_names(space, name))
        searched = space_to_search(space)
        searcher = make_searcher(searched, partial(trial_run_key, context), trials, storage=studies, study_name=name)
        logger.info("Optuna studies of the sweep: %s (watch them live: optuna-dashboard %s)", optuna_storage,
                    optuna_storage)
        param_space = tune_param_space(searched)
        tune_config = tune.TuneConfig(
            search_alg=search_algorithm(searcher, metric=settings.metric, mode=settings.mode, max_concurrent=concurrency),
            scheduler=scheduler, num_samples=trials, reuse_actors=_reuse_actors(settings),
        )
    experiment.makedirs()
    experiment.join(SWEEP_FILE).write_json({
        "source": space.source, "description": space.description, "metric": settings.metric, "mode": settings.mode,
        "base": base.to_dict(), "fixed": fixed_values(space), "searched": sorted(tune_param_space(space)),
        "space_yaml": Path(space.source).read_text() if Path(space.source).is_file() else None,
        "trials": trials,  # the search is finished when this many are
        "optuna_storage": optuna_storage,  # where the searcher's studies are (None for a grid)
    })
    logger.info("sweep %s (%s): %d trial(s), up to %d at a time", experiment, search, trials, concurrency)
    tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=_run_config(settings, storage, name))
    return tuner.fit()


def default_optuna_journal(experiment: Location, name: str) -> str:
    """The searcher's journal file when no --optuna-storage is given: in the sweep's directory when
    that is local; an object store cannot append to a file, so otherwise one on this machine
    (LOCAL_JOURNALS), named by the sweep's name and URI."""
    if experiment.is_local:
        experiment.local_path.mkdir(parents=True, exist_ok=True)
        return str(experiment.local_path / OPTUNA_JOURNAL)
    digest = hashlib.blake2b(experiment.uri.encode(), digest_size=4).hexdigest()
    LOCAL_JOURNALS.mkdir(parents=True, exist_ok=True)
    return str((LOCAL_JOURNALS / f"{name}-{digest}.log").resolve())


def run_finalists(settings: SweepSettings, *, base: RunConfig, fixed: dict, runs: list[dict], experiment: Location,
                  name: str):
    """Run (or continue, when `experiment/name` holds them) the finalist trials: trial i runs
    `runs[i]` (trial values) to the end and scores the validation and the test volumes. They share
    the sweep's stage outputs (`experiment`), so equal inputs are not computed again. Returns
    the ResultGrid."""
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    context = SweepContext(base=base.to_dict(), space_params=fixed, root=experiment.uri, workers=settings.workers_per_trial,
                           use_gpu=settings.use_gpu, parts=SPLIT_PARTS, probe=False, runs=tuple(runs))
    trainable, concurrency = _trainable(run_finalist, context, settings)
    path = experiment.join(name)
    if tune.Tuner.can_restore(path.path, storage_filesystem=path.filesystem):
        logger.info("continuing the finalists %s with up to %d trial(s) at a time", path, concurrency)
        return tune.Tuner.restore(path.path, trainable=trainable, resume_unfinished=True, restart_errored=True,
                                  storage_filesystem=path.filesystem).fit()
    logger.info("finalists %s: %d trial(s), up to %d at a time", path, len(runs), concurrency)
    finalists = ListedSearch([{"finalist": index} for index in range(len(runs))])
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=search_algorithm(finalists, max_concurrent=concurrency),
                                    num_samples=len(runs), reuse_actors=_reuse_actors(settings)),
        run_config=_run_config(settings, experiment, name),
    )
    return tuner.fit()


def _trainable(function, context: SweepContext, settings: SweepSettings):
    """A trial function with its context and resources, and how many trials run at once."""
    resources = ray.cluster_resources()
    concurrency = sweep_concurrency(settings, resources)
    trainable = tune.with_resources(
        tune.with_parameters(function, context=context),
        driver_resources(resources, workers=settings.workers_per_trial, use_gpu=settings.use_gpu),
    )
    return trainable, concurrency


def sweep_concurrency(settings: SweepSettings, resources: dict[str, float]) -> int:
    """`trial_concurrency` on the connected cluster, as autoscaling or static as it is."""
    autoscaling = cluster_autoscales()
    concurrency = trial_concurrency(resources, workers=settings.workers_per_trial, use_gpu=settings.use_gpu,
                                    cap=settings.max_concurrent_trials, autoscaling=autoscaling)
    if autoscaling:
        # Tune lets as many trials as run at once wait for their resources (its pending-trial limit
        # follows max_concurrent_trials), and Ray Train asks the autoscaler for each one's workers.
        logger.info("the cluster autoscales: up to %d trial(s) at a time; their nodes are requested as they "
                    "start (the cluster has %s now)", concurrency, resources)
    return concurrency


def _reuse_actors(settings: SweepSettings) -> bool:
    """A trial that trains in its own process (workers 0) waits inside `tune.report` whenever Tune
    looks at its results, so a trial ASHA stops ends there and its process can take the next
    trial, with torch and MONAI already imported. A driver of Train workers waits in `fit()`
    instead: reused, a stopped trial's Train run would go on holding its CPUs (seen with Tune
    2.60), so those trials get a fresh process each."""
    return settings.workers_per_trial == 0


def _run_config(settings: SweepSettings, storage: Location, name: str) -> tune.RunConfig:
    return tune.RunConfig(name=name, storage_path=storage.path, storage_filesystem=storage.filesystem,
                          failure_config=tune.FailureConfig(max_failures=settings.max_failures))


def early_stopping(settings, max_epochs: int) -> ASHAScheduler | None:
    """ASHA on the probe Dice, with every rung before the last pre-training epoch: a trial that
    has paid for its whole pre-training goes on to fine-tune. (Tune puts a rung at `max_t` when
    max_t / grace_period is a power of the reduction factor, and `stop_last_trials=False` does not
    spare a trial there.) None when there is at most one epoch: nothing to stop early."""
    if max_epochs < 2:
        return None
    last_rung = max_epochs - 1
    return ASHAScheduler(
        time_attr=EPOCH, metric=PROBE_METRIC, mode="max", max_t=last_rung, stop_last_trials=False,
        grace_period=min(settings.grace_period, last_rung), reduction_factor=settings.reduction_factor,
    )


def _largest_epochs(space: SearchSpace, base: RunConfig) -> int:
    spec = space.params.get("pretrain.epochs")
    if spec is None:
        return base.pretrain.epochs
    if isinstance(spec, Fixed):
        return int(spec.value)
    if isinstance(spec, Choice):
        return int(max(spec.values))
    return int(spec.high)


def quiet_trial_logs() -> None:
    """A trial's output: Tune's table, its results and real warnings."""
    ray.data.DataContext.get_current().enable_progress_bars = False  # Tune's table is the progress shown
    # Lines that Tune's table already says (checkpoint written, data stream started and finished)
    # or that tell a sweep's user nothing (Parquet read estimates, rows written, progress bars off).
    for chatty in ("ray.train._internal.storage", "ray.data._internal.execution.streaming_executor",
                   "ray.data._internal.datasource.parquet_datasource", "ray.data.dataset"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    logging.getLogger("ray.data.dataset").addFilter(_not_the_no_free_cpu_alarm)


def _not_the_no_free_cpu_alarm(record: logging.LogRecord) -> bool:
    """Ray Data warns that a dataset "will hang" when no CPU is free as it starts. A trial has a CPU
    set aside for its Ray Data work (`trial_cpus`): in the demo that CPU was free when a super-pixel
    build began, and the warning came as the build's own first tasks ran on it."""
    return "does not have any available CPUs" not in record.getMessage()


def run_trial(trial_values: dict, context: SweepContext) -> None:
    """One Tune trial: the run stages of the module's description, reported to Tune."""
    config = trial_config(context, trial_values)
    locks.install()  # object-store keys are locked cluster-wide
    quiet_trial_logs()
    extract = ray_data_extract()
    walls: dict[str, float] = {}
    with _wall_clock(walls, "superpixels"):
        data = stages.run_data(config.data, extract=extract)
        probe = stages.probe_source(config, data) if context.probe else None
    with _wall_clock(walls, "pretrain"):
        pretrained = stages.pretrain(config, data, root=context.root, workers=context.workers, extract=extract,
                                     pretrain_fn=partial(_pretrain_with_ray, context=context, probe=probe))
    history, pretrain_seconds = (pretrained.history if pretrained else []), 0.0
    if pretrained is not None and pretrained.reused:  # another trial pre-trained these settings: replay for ASHA
        for metrics in history:
            tune.report(metrics | {"replayed": True})
    elif pretrained is not None:
        pretrain_seconds = sum(metrics["seconds"] + metrics.get("probe_seconds", 0.0) for metrics in history)
    with _wall_clock(walls, "finetune"):
        finetuned = _finetune(config, data, pretrained, context)
    final_metrics = {}
    for part, scores in finetuned.scores.items():
        prefix = TEST_PREFIX if part == "test" else ""
        final_metrics[f"{prefix}dice_mean"] = scores["dice_mean"]
        final_metrics |= {f"{prefix}dice/{organ}": value for organ, value in scores["dice_per_organ"].items() if value is not None}
        final_metrics[f"evaluate_seconds/{part}"] = scores["seconds"]
    final_metrics |= {
        "label_fraction": config.finetune.label_fraction,
        EPOCH: len(history),
        # The last pre-training epoch's probe and, for the MoCo methods, whether their branch collapsed.
        **{name: history[-1][name] for name in (PROBE_METRIC, GLOBAL_TOP1) if history and name in history[-1]},
        "pretrained_reused": bool(pretrained and pretrained.reused),
        "finetune_reused": finetuned.reused,
        "finetune_key": finetuned.key,  # its model: <experiment>/finetuned/<key>/model.pt
        "finetune_seconds": finetuned.summary["seconds"],
        # This trial's own compute (replayed work costs nothing): what search budgets compare.
        "compute_seconds": pretrain_seconds + finetuned.seconds,
        # Each stage by the clock, start-ups included: where the rest of a trial's time goes.
        **{f"{WALL_PREFIX}{stage}": seconds for stage, seconds in walls.items()},
    }
    tune.report(final_metrics)


@contextlib.contextmanager
def _wall_clock(walls: dict[str, float], stage: str):
    started = time.perf_counter()
    yield
    walls[stage] = time.perf_counter() - started


def run_finalist(trial_values: dict, context: SweepContext) -> None:
    """One finalist trial: the run its index names (`SweepContext.runs`)."""
    run_trial(context.runs[trial_values["finalist"]], context)


def trial_config(context: SweepContext, trial_values: dict) -> RunConfig:
    return config_with_values(context.base, {**context.space_params, **trial_values}, source="trial config")


def _pretrain_with_ray(config: RunConfig, data: stages.PretrainingData, checkpoint: Location, *, context: SweepContext,
                       probe) -> list[dict]:
    """The stages' `PretrainFn` in a trial: a Ray Train run of the trial's workers (or the same loop
    in the trial's process), reporting each epoch to Tune; saves the online network at `checkpoint`.
    (Torch is imported here only: trials that replay or fine-tune from scratch start without it.)"""
    from lrc_ray.distributed.train import pretrain_with_ray_train
    from lrc_ray.engine.checkpoint import save_checkpoint

    outcome = pretrain_with_ray_train(
        config, parquet_dir=data.entry.uri, selection=data.selection, num_slices=data.num_slices,
        storage=checkpoint.parent.parent, name=checkpoint.parent.name, workers=context.workers,
        use_gpu=context.use_gpu, num_classes=data.num_classes, probe=probe, report_to_tune=True,
    )
    save_checkpoint(checkpoint, state_dict=outcome.state_dict, config=config.to_dict(), epoch=outcome.epoch,
                    history=outcome.history)
    return outcome.history


def _finetune(config: RunConfig, data: stages.RunData, pretrained: stages.Pretrained | None,
              context: SweepContext) -> stages.Finetuned:
    if context.workers == 0:  # the trial holds its device: fine-tune here too
        # On CPU, with every CPU set aside for the trial: the one kept for its pre-training's Ray Data
        # reads is idle now (2 threads on 2 cores: ~1.4x faster, measured).
        threads = None if context.use_gpu else trial_cpus(0)
        return _finetune_task(config, data, pretrained, context.root, context.parts, torch_threads=threads)
    task = one_device_task(_finetune_task, use_gpu=context.use_gpu)
    return ray.get(task.remote(config, data, pretrained, context.root, context.parts))


def one_device_task(function, *, use_gpu: bool):
    """`function` as a Ray task on one GPU (or CPU), outside the trial's placement group, which holds
    only its trial slot. The resources are declared in `ray.remote`, not `.options()`: only there
    does a GPU task get a fresh process each time (Ray's `max_calls=1`). A reused process keeps the
    CUDA device of its first task whatever GPU Ray assigns it next (ray-project/ray#29624): on a
    node of several GPUs, a fine-tuning would run on another trial's GPU."""
    return ray.remote(num_cpus=0 if use_gpu else 1, num_gpus=1 if use_gpu else 0,
                      scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))(function)


def _finetune_task(config: RunConfig, data: stages.RunData, pretrained: stages.Pretrained | None, root: str,
                   parts: tuple[str, ...], torch_threads: int | None = None) -> stages.Finetuned:
    """Stages 3 and 4; with `torch_threads`, torch computes on that many threads meanwhile."""
    import torch

    locks.install()  # in a task of its own: object-store keys are locked cluster-wide
    threads_before = torch.get_num_threads()
    torch.set_num_threads(torch_threads or threads_before)
    try:
        return stages.finetune_and_evaluate(config, data, pretrained, root=root, parts=parts)
    finally:  # the process may run the next trial's pre-training, which leaves a CPU to Ray Data
        torch.set_num_threads(threads_before)


def summarise_failures(result_grid) -> str | None:
    """One line per distinct error when every trial failed (None otherwise)."""
    errors = [result.error for result in result_grid if result.error is not None]
    if not errors or len(errors) < len(result_grid):
        return None
    reasons: dict[str, int] = {}
    for error in errors:
        reasons[_first_line(error)] = reasons.get(_first_line(error), 0) + 1
    listed = "; ".join(f"{count} x {reason}" for reason, count in reasons.items())
    return f"all {len(errors)} trial(s) failed: {listed}"


def _first_line(error: BaseException) -> str:
    return ray_error_message(error)[:300]


def read_trials(experiment: Location) -> list:
    """Every trial of a sweep (finished, stopped, failed or interrupted), read with Tune's own
    `ExperimentAnalysis`, as plain `TrialRecord`s."""
    experiment = location(experiment)
    if not experiment.join(SWEEP_FILE).is_file():
        raise UserInputError(f"{experiment}: not an lrc-ray sweep (no {SWEEP_FILE}); pass the directory that `lrc-ray tune` printed")
    return read_tune_experiment(experiment)


def read_tune_experiment(path: Location) -> list:
    """Every trial of a Tune experiment directory (a path or URI), as plain `TrialRecord`s."""
    from ray.tune import ExperimentAnalysis

    from lrc_ray.results import TrialRecord

    path = location(path)
    try:
        analysis = ExperimentAnalysis(path.path, storage_filesystem=path.filesystem)
    except Exception as exc:  # Tune raises several types for a missing or empty experiment state
        raise UserInputError(f"{path}: no trials recorded yet ({ray_error_message(exc)})") from None
    records = []
    for trial in analysis.trials:
        error = None
        # synced to storage; readable without Ray running
        error_file = path.join(os.path.relpath(trial.path, path.path), "error.txt")
        if trial.status == "ERROR" and error_file.is_file():
            error = user_error_line(error_file.read_text())
        records.append(TrialRecord(
            trial_id=trial.trial_id, status=trial.status, values=dict(trial.config), metrics=dict(trial.last_result or {}),
            error=error,
        ))
    if not records:
        raise UserInputError(f"{path}: the sweep has no trials")
    return records
