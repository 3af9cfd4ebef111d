"""Ray Tune sweeps: Optuna TPE proposes settings, ASHA stops poor pre-trainings early.

One trial, run by a Tune function. With `workers_per_trial` N >= 1 it is a driver that holds one
`trial_slot` (a custom resource, so it takes no CPU that its Train workers and Ray Data tasks
need); with 0 it holds one CPU (or GPU) and trains in its own process, which Tune reuses.
1. get or build the super-pixel cache entry of its Felzenszwalb settings (trials share
   entries; concurrent builders of one entry build it once);
2. pre-train (a TorchTrainer of N workers, or the same loop in the trial's process), reporting
   a frozen-feature probe Dice every epoch (the number ASHA compares). Trials whose
   pre-training settings are equal share one pre-trained checkpoint: the first trains it, the
   others replay its reports and only fine-tune;
3. fine-tune at the trial's label fraction (in a Ray task of one CPU or GPU, or in the trial's
   process) and report the per-organ and mean 3D Dice (the number Optuna optimises by
   default). A fine-tuning that repeats an earlier trial's exactly is not run again.
`scratch` has nothing to pre-train, so ASHA never sees a probe value for it: it always
reaches fine-tuning.
The searcher proposes each distinct run once: TPE on a space of a few choices proposes points it
has already run (a quarter of the quick-start's trials, replayed), and each repeat would spend one
of the sweep's trials on a result it already has.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lrc_ray.atomic import write_json_atomic
from lrc_ray.config import RunConfig, config_from_dict
from lrc_ray.distributed.cluster import TRIAL_SLOT
from lrc_ray.distributed.runtime import ray_error_message, user_error_line
from lrc_ray.errors import UserInputError
from lrc_ray.search_space import (
    Choice, Fixed, LogUniform, QUniform, RandInt, SearchSpace, Uniform, config_with_values, grid_points,
)

logger = logging.getLogger(__name__)

PROBE_METRIC = "probe_dice"
EPOCH = "epoch"  # pre-training epochs finished (ASHA's time attribute)
SWEEP_FILE = "lrc_ray_sweep.json"  # what `results` needs beyond Tune's own files
PRETRAINED_DIR = "pretrained"
FINETUNED_DIR = "finetuned"  # fine-tuning results by finetuning_key, shared by the trials of a sweep
HISTORY_FILE = "history.json"  # a shared pre-training's epoch reports, written after its checkpoint


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs besides its sampled values (plain data: it is pickled to trials)."""

    base: dict  # the run config before the trial's values, with absolute paths
    space_params: dict  # dotted key -> fixed value, merged under the trial's values
    pretrained_root: str
    workers: int
    use_gpu: bool


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


def trial_concurrency(resources: dict[str, float], *, workers: int, use_gpu: bool, cap: int | None) -> int:
    """Trials that fit at once: each needs `workers` CPUs (or GPUs) for Train, or one for a trial
    that pre-trains in its own process (`workers` 0), plus one CPU for its Ray Data reads and
    fine-tuning; never more than the trial slots."""
    devices, cpus = max(workers, 1), trial_cpus(workers)
    fits = int(resources.get("CPU", 1) // cpus)
    if use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // devices))
    if TRIAL_SLOT in resources:
        fits = min(fits, int(resources[TRIAL_SLOT]))
    if fits < 1:
        need = f"{devices} GPU(s) and {cpus} CPUs" if use_gpu else f"{cpus} CPUs"
        raise UserInputError(
            f"sweep.workers_per_trial: a trial needs {need}, the cluster has {resources}; on an autoscaling "
            "cluster, request the nodes first (see cluster/aws-gpu.yaml)"
        )
    return min(fits, cap) if cap else fits


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


def pretraining_key(config: RunConfig, superpixel_key: str, workers: int) -> str:
    """Equal for trials whose pre-training would be identical: they differ only in fine-tuning, or
    in settings their method does not use (e.g. the LRC temperature of a `global` trial)."""
    pretrain = config.to_dict()["pretrain"]
    unused = {
        "local": ("temperature", "regions_per_image", "pixels_per_region", "negatives", "w_local"),
        "global": ("moco_momentum", "moco_temperature", "queue_size", "w_global"),
        "supervised": ("w_supervised", "source_data_dir"),
    }
    uses = {"local": config.pretrain.uses_local, "global": config.pretrain.uses_global,
            "supervised": config.pretrain.uses_supervised}
    for part, names in unused.items():
        if not uses[part]:
            for name in names:
                pretrain.pop(name)
    relevant = {
        "superpixels": superpixel_key,
        "split": [config.data.validation_cases, config.data.split_seed],
        "augment": config.to_dict()["augment"],
        "network": config.to_dict()["network"],
        "pretrain": pretrain,
        "seed": config.seed,
        "workers": workers,  # the global batch
    }
    return f"{config.pretrain.method.replace('+', '_')}-{_digest(relevant)}"


def finetuning_key(config: RunConfig, pretrained: str | None) -> str:
    """Equal for trials whose fine-tuning would be identical: the same pre-trained checkpoint (or
    none: `scratch`), data, split, network, fine-tuning settings and seed. Felzenszwalb settings
    matter only through the checkpoint: fine-tuning reads images and labels, not super-pixels."""
    data = config.to_dict()["data"]
    relevant = {
        "pretrained": pretrained,
        "data": {name: data[name] for name in ("data_dir", "datalist", "datalist_key", "size", "spacing_mm", "window_hu",
                                               "validation_cases", "split_seed")},
        "network": config.to_dict()["network"],
        "finetune": config.to_dict()["finetune"],
        "seed": config.seed,
    }
    return _digest(relevant)


def _digest(relevant: dict) -> str:
    return hashlib.blake2b(json.dumps(relevant, sort_keys=True).encode(), digest_size=10).hexdigest()


def run_keys(config: RunConfig, workers: int) -> tuple[str | None, str]:
    """(pre-training key or None, fine-tuning key) from a trial's config alone, as a searcher sees
    it before the trial runs: the super-pixels stand for themselves by their cache parameters."""
    from lrc_ray import api

    superpixels = json.dumps(api.extraction_params_for(config.data).as_dict(), sort_keys=True)
    pretrained = pretraining_key(config, superpixels, workers) if api.pretrains(config) else None
    return pretrained, finetuning_key(config, pretrained)


def _trial_run_key(context: SweepContext, trial_values: dict) -> str:
    try:
        return run_keys(trial_config(context, trial_values), context.workers)[1]
    except UserInputError:  # values the config refuses: the trial runs and fails with that error
        return "invalid-" + _digest(trial_values)


class SweepOptunaSearch(OptunaSearch):
    """OptunaSearch as a sweep needs it: each distinct run proposed once, final results only.

    - A proposal whose run (`run_key` of the trial's values: equal when the fine-tuning and its
      pre-training would be) was proposed before is told to Optuna with that run's outcome (its
      metric; pruned when it was stopped or failed; failed, i.e. ignored, while it still runs)
      and drawn again, up to `max_redraws` times; after that the repeat runs (its results are
      reused, so it costs little). Without this, TPE repeats about a quarter of the quick-start
      sweep's trials (`bench/search_simulation.py`).
    - The per-epoch probe reports, which lack the searched metric, are not passed on: Optuna's
      intermediate values feed only pruners, and OptunaSearch runs a no-op pruner (ASHA stops).
    """

    def __init__(self, *, run_key: Callable[[dict], str], max_redraws: int = 20, **kwargs) -> None:
        super().__init__(**kwargs)
        self._run_key = run_key
        self._max_redraws = max_redraws
        self._key_of_trial: dict[str, str] = {}
        self._outcome: dict[str, float | None] = {}  # run key -> its metric (None: not known yet)
        self._finished_keys: set[str] = set()

    def suggest(self, trial_id: str) -> dict | None:
        for redraw in range(self._max_redraws + 1):
            values = super().suggest(trial_id)
            key = self._run_key(values)
            if key not in self._outcome or redraw == self._max_redraws:
                break
            value = self._outcome[key]
            if value is not None:
                state = optuna.trial.TrialState.COMPLETE
            else:
                state = optuna.trial.TrialState.PRUNED if key in self._finished_keys else optuna.trial.TrialState.FAIL
            self._ot_study.tell(self._ot_trials.pop(trial_id), value, state=state)
        self._key_of_trial[trial_id] = key
        self._outcome.setdefault(key, None)
        return values

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self._key_of_trial.get(trial_id)
        if key is not None and key not in self._finished_keys:
            self._finished_keys.add(key)
            self._outcome[key] = (result or {}).get(self.metric)
        super().on_trial_complete(trial_id, result=result, error=error)


def make_searcher(space: SearchSpace, context: SweepContext, trials: int, *, sampler: str = "tpe") -> SweepOptunaSearch:
    """The sweep's searcher: TPE (seeded from the space) or, for comparison, random sampling."""
    settings = space.sweep
    if sampler == "tpe":
        optuna_sampler = optuna.samplers.TPESampler(seed=settings.seed,
                                                    n_startup_trials=settings.tpe_startup_trials(trials))
    else:
        optuna_sampler = optuna.samplers.RandomSampler(seed=settings.seed)
    return SweepOptunaSearch(metric=settings.metric, mode=settings.mode, sampler=optuna_sampler,
                             run_key=partial(_trial_run_key, context))


def run_sweep(
    space: SearchSpace,
    *,
    base: RunConfig,
    storage: Path,
    name: str,
    num_samples: int | None = None,
    resume: bool = False,
    search: str = "tpe",
):
    """Run (or, with `resume`, continue) a sweep in the connected Ray cluster; returns the ResultGrid.

    `search` "tpe": Optuna TPE proposes `num_samples` settings and ASHA stops weak pre-trainings
    early. "grid": every point of a space of choices, each run to the end (no early stopping).
    """
    experiment = storage / name
    settings = space.sweep
    # Per-epoch probe reports lack the searched metric by design (only fine-tuning reports it);
    # Tune's check would refuse them. The metric name is checked against the data's organs instead.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    resources = ray.cluster_resources()
    concurrency = trial_concurrency(
        resources, workers=settings.workers_per_trial, use_gpu=settings.use_gpu, cap=settings.max_concurrent_trials
    )
    context = SweepContext(
        base=base.to_dict(), space_params=fixed_values(space), pretrained_root=str(experiment / PRETRAINED_DIR),
        workers=settings.workers_per_trial, use_gpu=settings.use_gpu,
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context),
        driver_resources(resources, workers=settings.workers_per_trial, use_gpu=settings.use_gpu),
    )
    if resume:
        if not tune.Tuner.can_restore(str(experiment)):
            raise UserInputError(f"--resume: no sweep to resume at {experiment}")
        logger.info("resuming %s with up to %d trial(s) at a time", experiment, concurrency)
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, restart_errored=True)
        return tuner.fit()
    if experiment.exists() and any(experiment.iterdir()):
        raise UserInputError(f"--name {name}: {experiment} already holds a sweep; pass --resume to continue it or pick another name")
    (experiment / PRETRAINED_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(experiment / SWEEP_FILE, {
        "source": space.source, "description": space.description, "metric": settings.metric, "mode": settings.mode,
        "base": base.to_dict(), "fixed": fixed_values(space), "searched": sorted(tune_param_space(space)),
        "space_yaml": Path(space.source).read_text() if Path(space.source).is_file() else None,
    })
    # A trial that trains in its own process (workers 0) waits inside `tune.report` whenever Tune
    # looks at its results, so a trial ASHA stops ends there and its process can take the next
    # trial, with torch and MONAI already imported. A driver of Train workers waits in `fit()`
    # instead: reused, a stopped trial's Train run would go on holding its CPUs (seen with Tune
    # 2.60), so those trials get a fresh process each.
    reuse = settings.workers_per_trial == 0
    if search == "grid":
        trials = len(grid_points(space))  # also refuses continuous parameters, by name
        param_space = {key: tune.grid_search(list(spec.values)) for key, spec in space.params.items() if isinstance(spec, Choice)}
        tune_config = tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrency, reuse_actors=reuse)
    else:
        trials = num_samples or settings.num_samples
        scheduler = early_stopping(settings, _largest_epochs(space, base))
        searcher = make_searcher(space, context, trials)
        param_space = tune_param_space(space)
        tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=trials,
                                      max_concurrent_trials=concurrency, reuse_actors=reuse)
    logger.info("sweep %s (%s): %d trial(s), up to %d at a time", experiment, search, trials, concurrency)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name=name, storage_path=str(storage), failure_config=tune.FailureConfig(max_failures=settings.max_failures),
        ),
    )
    return tuner.fit()


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


def run_trial(trial_values: dict, context: SweepContext) -> None:
    """One Tune trial: steps 1-3 of the module's description."""
    from lrc_ray import api
    from lrc_ray.superpixels.cache import entry_lock

    config = trial_config(context, trial_values)
    ray.data.DataContext.get_current().enable_progress_bars = False  # Tune's table is the progress shown
    # Lines per epoch that Tune's table already says: checkpoint written, data stream started and finished.
    for chatty in ("ray.train._internal.storage", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    entry = api.superpixels_for(config.data).entry
    checkpoint, key, epochs_run, reused, history, pretrain_seconds = None, None, 0, False, [], 0.0
    if api.pretrains(config):
        data = api.pretraining_data(config)
        api.check_batch_fits(config, data, workers=context.workers)
        key = pretraining_key(config, data.entry.path.name, context.workers)
        root = Path(context.pretrained_root)
        final, history_file = root / key / "checkpoint.pt", root / key / HISTORY_FILE
        with entry_lock(root, key):
            if history_file.is_file():  # another trial pre-trained these settings: replay its epochs for ASHA
                history, reused = json.loads(history_file.read_text()), True
                for metrics in history:
                    tune.report(metrics | {"replayed": True})
            else:
                history = _pretrain(config, data, entry, final, context)
                pretrain_seconds = sum(metrics["seconds"] + metrics.get("probe_seconds", 0.0) for metrics in history)
                write_json_atomic(history_file, history)  # last: it marks the shared checkpoint complete
        checkpoint, epochs_run = str(final), len(history)
    # Fine-tuning is seeded: a trial whose fine-tuning would repeat an earlier one's exactly (TPE
    # proposes a point again; `scratch` at another scale) reports that trial's Dice.
    finetuned_root = Path(context.pretrained_root).parent / FINETUNED_DIR
    finetuned_key = finetuning_key(config, key)
    results_file = finetuned_root / f"{finetuned_key}.json"
    finetuned_root.mkdir(parents=True, exist_ok=True)
    with entry_lock(finetuned_root, finetuned_key):
        finetune_reused = results_file.is_file()
        if finetune_reused:
            results = json.loads(results_file.read_text())
        else:
            results = _finetune(config, checkpoint, context)
            write_json_atomic(results_file, results)
    final_metrics = {
        "dice_mean": results["dice_mean"],
        **{f"dice/{organ}": value for organ, value in results["dice_per_organ"].items() if value is not None},
        "label_fraction": config.finetune.label_fraction,
        EPOCH: epochs_run,
        **({PROBE_METRIC: history[-1][PROBE_METRIC]} if epochs_run and PROBE_METRIC in history[-1] else {}),
        "pretrained_reused": reused,
        "finetune_reused": finetune_reused,
        "finetune_seconds": results["seconds"],
        # This trial's own training compute (replayed work costs nothing): what search budgets compare.
        "compute_seconds": pretrain_seconds + (0.0 if finetune_reused else results["seconds"]),
    }
    tune.report(final_metrics)


def _finetune(config: RunConfig, checkpoint: str | None, context: SweepContext) -> dict:
    if context.workers == 0:  # the trial holds its device: fine-tune here too
        # On CPU, with every CPU set aside for the trial: the one kept for its pre-training's Ray Data
        # reads is idle now (2 threads on 2 cores: ~1.4x faster, measured).
        threads = None if context.use_gpu else trial_cpus(0)
        return _finetune_task(config.to_dict(), checkpoint, torch_threads=threads)
    # a task outside the trial's placement group, which holds only its trial slot
    task = ray.remote(_finetune_task).options(
        num_cpus=0 if context.use_gpu else 1, num_gpus=1 if context.use_gpu else 0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )
    return ray.get(task.remote(config.to_dict(), checkpoint))


def trial_config(context: SweepContext, trial_values: dict) -> RunConfig:
    return config_with_values(context.base, {**context.space_params, **trial_values}, source="trial config")


def _pretrain(config, data, entry, final: Path, context: SweepContext) -> list[dict]:
    """Pre-train with Ray Train, save the online network's weights at `final`; returns the epoch reports.
    (Torch is imported here only: trials that replay or fine-tune from scratch start without it.)"""
    from lrc_ray import api
    from lrc_ray.distributed.train import pretrain_with_ray_train
    from lrc_ray.engine.checkpoint import save_checkpoint

    outcome = pretrain_with_ray_train(
        config, parquet_dir=str(data.entry.path), selection=data.selection, num_slices=data.num_slices,
        storage_path=str(final.parent.parent),
        name=final.parent.name, workers=context.workers, use_gpu=context.use_gpu, num_classes=data.num_classes,
        probe=api.probe_source(config, entry), report_to_tune=True,
    )
    save_checkpoint(final, state_dict=outcome.state_dict, config=config.to_dict(), epoch=outcome.epoch,
                    history=outcome.history)
    return outcome.history


def _finetune_task(config: dict, checkpoint: str | None, torch_threads: int | None = None) -> dict:
    """Fine-tune and evaluate; with `torch_threads`, torch computes on that many threads meanwhile."""
    import importlib
    import time

    import torch

    from lrc_ray import api

    importlib.import_module("lrc_ray.engine.finetune")  # torch and MONAI load before the clock: start-up, not compute
    threads_before = torch.get_num_threads()
    torch.set_num_threads(torch_threads or threads_before)
    try:
        started = time.perf_counter()
        results = api.finetune(config=config_from_dict(config), checkpoint=checkpoint, progress=False)
        return results | {"seconds": time.perf_counter() - started}
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


def read_trials(experiment: Path) -> list:
    """Every trial of a sweep (finished, stopped, failed or interrupted), read with Tune's own
    `ExperimentAnalysis`, as plain `TrialRecord`s."""
    from ray.tune import ExperimentAnalysis

    from lrc_ray.results import TrialRecord

    if not (experiment / SWEEP_FILE).is_file():
        raise UserInputError(f"{experiment}: not an lrc-ray sweep (no {SWEEP_FILE}); pass the directory that `lrc-ray tune` printed")
    try:
        analysis = ExperimentAnalysis(str(experiment))
    except Exception as exc:  # Tune raises several types for a missing or empty experiment state
        raise UserInputError(f"{experiment}: no trials recorded yet ({ray_error_message(exc)})") from None
    records = []
    for trial in analysis.trials:
        error = None
        error_file = Path(trial.path) / "error.txt"  # synced to storage; readable without Ray running
        if trial.status == "ERROR" and error_file.is_file():
            error = user_error_line(error_file.read_text())
        records.append(TrialRecord(
            trial_id=trial.trial_id, status=trial.status, values=dict(trial.config), metrics=dict(trial.last_result or {}),
            error=error,
        ))
    if not records:
        raise UserInputError(f"{experiment}: the sweep has no trials")
    return records
