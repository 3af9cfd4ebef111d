"""The Python API: keyword-only functions that the `lrc-ray` command line calls."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lrc_ray import stages
from lrc_ray.atomic import write_json_atomic
from lrc_ray.data.msd import load_dataset
from lrc_ray.data.slices import DEFAULT_WINDOW_HU
from lrc_ray.config import DataConfig, RunConfig, config_from_dict, save_config
from lrc_ray.errors import TrainingError, UserInputError
from lrc_ray.stages import PretrainingData, check_batch_fits, pretrains
from lrc_ray.storage import Location, check_writable, checked_location, location, upload_dir
from lrc_ray.superpixels.cache import CacheEntry
from lrc_ray.superpixels.felzenszwalb import FelzenszwalbParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SuperpixelResult:
    entry: CacheEntry
    cache_hit: bool


def make_synthetic_data(
    *, out: str | Path, cases: int, unlabeled: int, size: int, slices: int, seed: int,
    field_of_view_mm: float | None = None,
) -> Path:
    """Write the built-in synthetic abdominal CT data set (MSD layout) to `out`; `field_of_view_mm`
    fixes the scanner's field (default: fitted to each patient)."""
    from lrc_ray.data.phantom import write_synthetic_dataset

    return write_synthetic_dataset(out, cases=cases, unlabeled=unlabeled, size=size, slices=slices, seed=seed,
                                   field_of_view_mm=field_of_view_mm)


def build_superpixels(
    *,
    data: str | Path | None,
    cache_root: str | Path,
    scale: float = FelzenszwalbParams.scale,
    sigma: float = FelzenszwalbParams.sigma,
    min_size: int = FelzenszwalbParams.min_size,
    window_hu: tuple[float, float] = DEFAULT_WINDOW_HU,
    size: int | None = None,
    spacing_mm: float | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    address: str | None = None,
    datalist: str | Path | None = None,
    key: str = "training",
) -> SuperpixelResult:
    """Get the super-pixel cache entry for a data set and parameters, building it if needed.

    The data set is `data` (a directory in MSD or nnU-Net v2 layout) or the `key` entries of a
    MONAI `datalist`. A second call with the same data and parameters returns the existing entry
    at once; concurrent callers for one entry build it once (the others wait and hit).
    """
    # Imported here so that the plain layers (and `lrc-ray data synth`) never load Ray.
    from lrc_ray.distributed.superpixels import ray_data_extract

    if (data is None) == (datalist is None):
        raise UserInputError("--data or --datalist: expected exactly one data set")
    if workers is not None and workers < 1:
        raise UserInputError(f"--workers: expected at least 1, got {workers}")
    params = stages.extraction_params(scale=scale, sigma=sigma, min_size=min_size, window_hu=window_hu, size=size,
                                      spacing_mm=spacing_mm)
    entry, hit = stages.superpixel_entry(load_dataset(data, datalist=datalist, key=key), cache_root, params,
                                         extract=ray_data_extract(workers=workers, address=address), overwrite=overwrite)
    return SuperpixelResult(entry=entry, cache_hit=hit)


def find_superpixels(config: DataConfig) -> CacheEntry:
    """The existing cache entry for a run config's data and super-pixel settings.

    Raises:
        UserInputError: when it was never built, naming the command that builds it.
    """
    return stages.run_data(config).entry


def superpixels_for(config: DataConfig, *, address: str | None = None) -> SuperpixelResult:
    """Get or build the super-pixel cache entry a run config asks for."""
    return build_superpixels(
        data=None if config.datalist else config.data_dir, cache_root=config.cache_root, scale=config.scale,
        sigma=config.sigma, min_size=config.min_size, window_hu=config.window_hu, size=config.size,
        spacing_mm=config.spacing_mm, address=address, datalist=config.datalist, key=config.datalist_key,
    )


def describe_entry(entry: CacheEntry) -> dict:
    """Numbers a user wants to see about a cache entry."""
    import pyarrow.compute as pc

    from lrc_ray.superpixels.cache import read_entry_table

    table = read_entry_table(entry, columns=["case_id", "n_regions", "height", "width"])
    return {
        "path": entry.uri,
        "slices": table.num_rows,
        "cases": len(pc.unique(table.column("case_id"))),
        "labelled_cases": entry.manifest["num_labelled_cases"],
        "slice_size": f"{table.column('height')[0].as_py()}x{table.column('width')[0].as_py()}",
        "mean_regions_per_slice": round(pc.mean(table.column("n_regions")).as_py(), 1),
        "megabytes": round(entry.manifest["bytes"] / 2**20, 2),
        "params": entry.manifest["params"],
    }


def pretrain(
    *,
    config: RunConfig,
    out_dir: str | Path,
    workers: int = 0,
    use_gpu: bool = False,
    name: str = "ray_train",
    address: str | None = None,
    progress: bool = True,
) -> Path:
    """Pre-train with `config.pretrain.method` on the cached super-pixels; returns the checkpoint path.

    `workers` 0 runs the plain loop in this process; N >= 1 runs Ray Train with N data-parallel
    workers (one GPU each with `use_gpu`), whose run `out_dir/name` resumes from its last epoch
    when started again. Validation and test volumes are left out of pre-training. The checkpoint
    (`out_dir/checkpoint.pt`, written atomically after every epoch of the plain loop and at the
    end of a Ray Train run) carries the config and the loss history.
    """
    from lrc_ray.engine.checkpoint import save_checkpoint

    if workers < 0:
        raise UserInputError(f"--workers: expected 0 (in-process) or more, got {workers}")
    if use_gpu and workers == 0:
        raise UserInputError("--gpu: needs --workers 1 or more (one GPU per Ray Train worker)")
    out_dir = Path(out_dir).resolve()
    data = pretraining_data(config)
    save_config(config, out_dir / "config.yaml")
    checkpoint = out_dir / "checkpoint.pt"
    if workers == 0 or not pretrains(config):
        return _pretrain_in_process(config, data, checkpoint, progress=progress)

    from lrc_ray.distributed.runtime import ray_session
    from lrc_ray.distributed.train import check_train_resources, pretrain_with_ray_train

    check_batch_fits(config, data, workers=workers)
    with ray_session(address=address):
        check_train_resources(workers, use_gpu=use_gpu)
        outcome = pretrain_with_ray_train(
            config, parquet_dir=data.entry.uri, selection=data.selection, num_slices=data.num_slices,
            storage=location(out_dir), name=name, workers=workers, use_gpu=use_gpu, num_classes=data.num_classes,
        )
    return save_checkpoint(checkpoint, state_dict=outcome.state_dict, config=config.to_dict(), epoch=outcome.epoch,
                           history=outcome.history)


def pretraining_data(config: RunConfig) -> PretrainingData:
    """The cached slices `config` pre-trains on (`stages.pretraining_data`)."""
    return stages.pretraining_data(config, stages.run_data(config.data))


def in_process_pretrain_fn(*, progress: bool = False) -> stages.PretrainFn:
    """The run stages' `PretrainFn` for pre-training in this process, without Ray."""

    def pretrain_here(config: RunConfig, data: PretrainingData, checkpoint: Location) -> list[dict]:
        from lrc_ray.engine.checkpoint import load_checkpoint

        return load_checkpoint(_pretrain_in_process(config, data, checkpoint, progress=progress))["history"]

    return pretrain_here


def _pretrain_in_process(config: RunConfig, data: PretrainingData, checkpoint: Path | Location, *,
                         progress: bool) -> Path | Location:
    """The plain loop in this process; `scratch` (or zero epochs) saves the random initialisation."""
    import torch

    from lrc_ray.data.shard import compact_slices, sorted_by_row_key
    from lrc_ray.engine.checkpoint import save_checkpoint
    from lrc_ray.engine.pretrain import LrcPretrainer
    from lrc_ray.engine.pretrain_loop import LocalRun, run_pretraining
    from lrc_ray.superpixels.cache import read_entry_table

    if not pretrains(config):
        torch.manual_seed(config.seed)
        initial = LrcPretrainer(config.pretrain, config.network, seed=config.seed, num_classes=data.num_classes)
        return save_checkpoint(checkpoint, state_dict=initial.online.state_dict(), config=config.to_dict(), epoch=-1,
                               history=[])
    check_batch_fits(config, data)
    arrays = sorted_by_row_key(compact_slices(read_entry_table(data.entry), data.selection))
    logger.info("pre-training %s on %d slices, %d epochs, batch %d", config.pretrain.method, data.num_slices,
                config.pretrain.epochs, config.pretrain.batch_size)
    run_pretraining(config, LocalRun(config, arrays, checkpoint, progress=progress), num_classes=data.num_classes)
    return checkpoint


def finetune(
    *, config: RunConfig, checkpoint: str | Path | None = None, out_dir: str | Path | None = None, progress: bool = True
) -> dict:
    """Fine-tune at `config.finetune.label_fraction` and return per-organ and mean 3D Dice on the
    validation volumes, each on its native grid.

    Without a checkpoint the network starts from random weights (the `scratch` baseline). With
    `out_dir`, the model goes to `out_dir/model.pt` (for `lrc-ray predict --model`) and the
    results, with its path as `model`, to `out_dir/results.json`.
    """
    from lrc_ray.engine.saved_model import save_model
    from lrc_ray.superpixels.cache import read_entry_table

    data = stages.run_data(config.data)
    model, summary = stages.finetune_model(config, data, read_entry_table(data.entry), checkpoint, progress=progress)
    scores = stages.evaluate_model(model, config, data, "validation")
    results = {key: value for key, value in scores.items() if key not in ("cases", "seconds")}
    results |= {"validation_cases": scores["cases"]} | summary
    if out_dir is not None:
        results["model"] = str(save_model(Path(out_dir) / stages.MODEL_FILE, model, config=config, labels=data.labels))
        write_json_atomic(Path(out_dir) / "results.json", results)
    return results


def export(*, checkpoint: str | Path, out: str | Path) -> dict[str, Path]:
    """Write a pre-training checkpoint's encoder-decoder as a plain MONAI BasicUNet state_dict and a
    YAML of its constructor arguments and preprocessing (see `lrc_ray.engine.export`)."""
    from lrc_ray.engine.export import export_basic_unet

    return export_basic_unet(checkpoint, out)


# From this many scans on, `predict` runs as Ray Data batch inference (one model per CPU or GPU);
# fewer run in this process, where a local Ray's start (~5-10 s) would cost more than it saves.
RAY_DATA_MIN_SCANS = 8


def predict(
    *, model: str | Path, out: str | Path, data: str | Path | None = None, images: list[str | Path] | None = None,
    address: str | None = None, progress: bool = True,
) -> dict[str, Path]:
    """Segment scans with a fine-tuned model and write OUT/<case>.nii.gz (uint8 labels with each
    scan's shape and affine) and OUT/labels.json (label value -> organ name); returns case -> file.

    The scans are `images` (NIfTI files), or every volume of the data set at `data` (a directory
    with dataset.json). With `address`, or RAY_DATA_MIN_SCANS scans or more, they are segmented
    with Ray Data (`distributed.predict`); otherwise here, with a progress bar.

    Raises:
        UserInputError: neither or both of `data` and `images`; a model file that is not an lrc_ray
            model; a scan that is not a readable 3D NIfTI file; an `out` that is not writable.
            Nothing is written then.
    """
    from lrc_ray.engine.predict import output_paths, scans_of_files, segment_file, write_label_names
    from lrc_ray.engine.saved_model import load_model

    if (data is None) == (not images):
        raise UserInputError("--data or --images: expected exactly one source of scans, got "
                             + ("both" if data is not None else "neither"))
    # a data set's own case ids: an nnU-Net image <case>_0000.nii.gz comes out as <case>.nii.gz
    scans = scans_of_files(images) if images else [(case.case_id, case.image_path) for case in load_dataset(data).cases]
    saved = load_model(model)
    outputs = output_paths(scans, out)
    check_writable(location(out), "--out")
    if address is not None or len(scans) >= RAY_DATA_MIN_SCANS:
        from lrc_ray.distributed.predict import segment_with_ray_data

        segment_with_ray_data(model, [image for _, image in scans], outputs, address=address)
    else:
        from tqdm import tqdm

        for (_, image), output in tqdm(list(zip(scans, outputs)), desc="predict", unit="scan", disable=not progress):
            segment_file(saved.model, saved.slicing, image, output)
    write_label_names(out, saved.labels)
    return {output.name.removesuffix(".nii.gz"): output for output in outputs}


DEFAULT_STORAGE = Path(".lrc_ray/sweeps")
BUILT_IN_DATA_ROOT = Path(".lrc_ray/data")


def tune(
    *,
    space: str | Path,
    data: str | Path | None = None,
    storage: str | Path | Location | None = None,
    name: str | None = None,
    num_samples: int | None = None,
    resume: bool = False,
    address: str | None = None,
    search: str = "tpe",
    datalist: str | Path | None = None,
    key: str = "training",
    optuna_storage: str | None = None,
    cache_root: str | None = None,
) -> Location:
    """Run a sweep of `space` (a search-space YAML) on Ray, then its finalists when the space has a
    `finalists:` section; returns the experiment directory.

    `storage` is a local path or a URI (`s3://bucket/prefix`, `gs://...`, `file://...`): Tune's
    storage, the sweep's stage outputs and its record.

    The data are `data` (a directory), or the `key` entries of a MONAI `datalist`; without
    either, the space's built-in synthetic data set is made (once) and used. With `resume`, an
    interrupted sweep continues with its finished trials kept, and so do its finalists. The TPE
    searcher's Optuna studies are kept in `optuna_storage` (a database URL or a journal file;
    default: a journal file in the experiment directory), which optuna-dashboard reads.
    `cache_root` replaces the space's `base.data.cache_root` (where the super-pixel cache is).
    """
    import yaml

    from lrc_ray.distributed.runtime import ray_session
    from lrc_ray.distributed.tune import SWEEP_FILE, TRIAL_SLOT, run_sweep, summarise_failures
    from lrc_ray.search_space import load_search_space, parse_search_space, run_config_for

    search_space = load_search_space(space)
    if num_samples is not None and num_samples < 1:
        raise UserInputError(f"--samples: expected at least 1, got {num_samples}")
    if optuna_storage is not None and search != "tpe":
        raise UserInputError(f"--optuna-storage: only a tpe search keeps an Optuna study, not --search {search}")
    name = name or Path(space).stem
    storage = checked_location(storage or DEFAULT_STORAGE)
    check_writable(storage, "--storage")
    experiment = storage.join(name)
    if resume and not experiment.join(SWEEP_FILE).is_file():
        raise UserInputError(f"--resume: no sweep to resume at {experiment}")
    if resume:
        # The sweep continues as it started, whatever the space file says now.
        recorded = _read_json(experiment.join(SWEEP_FILE))
        if optuna_storage is not None and optuna_storage != recorded.get("optuna_storage"):
            raise UserInputError(f"--optuna-storage {optuna_storage}: the sweep keeps its studies in "
                                 f"{recorded.get('optuna_storage')}; resume it without --optuna-storage")
        base = config_from_dict(recorded["base"], source=str(experiment.join(SWEEP_FILE)))
        if cache_root is not None and base.data.cache_root != location(cache_root).uri:
            raise UserInputError(f"--cache-root {cache_root}: the sweep keeps its cache in {base.data.cache_root}; "
                                 "resume it without --cache-root")
        if recorded.get("space_yaml"):
            search_space = parse_search_space(yaml.safe_load(recorded["space_yaml"]), source=recorded["source"])
    else:
        base = run_config_for(search_space, {})
        if cache_root is not None:
            base = base.replace(data={"cache_root": cache_root})
        if data is not None and datalist is not None:
            raise UserInputError("--data or --datalist: expected at most one data set")
        if datalist is not None:
            base = base.replace(data={"datalist": str(Path(datalist).resolve()), "datalist_key": key})
        else:
            data_dir = Path(data) if data is not None else _built_in_data(search_space, base)
            base = base.replace(data={"data_dir": str(data_dir.resolve())})
        dataset = stages.dataset_for(base.data)
        _check_metric(search_space.sweep.metric, dataset.labels, search_space.source)
        _check_split(base.data, dataset, search_space.source)
        base = base.replace(data={"cache_root": checked_location(base.data.cache_root).uri})
    with ray_session(address=address, resources={TRIAL_SLOT: os.cpu_count() or 1}):
        result_grid = run_sweep(search_space, base=base, storage=storage, name=name, num_samples=num_samples,
                                resume=resume, search=search, optuna_storage=optuna_storage)
        failure = summarise_failures(result_grid)
        if failure:
            raise TrainingError(f"sweep {experiment}: {failure}")
        if search_space.finalists is not None and _search_finished(experiment):
            _run_finalists(experiment, top=search_space.finalists.top, seeds=search_space.finalists.seeds)
        elif search_space.finalists is not None:
            logger.warning("sweep %s: its search was interrupted before every trial finished; no finalists yet "
                           "(continue it with --resume)", experiment)
    return experiment


def _search_finished(experiment: Location) -> bool:
    from lrc_ray.distributed.tune import read_trials
    from lrc_ray.finalists import search_finished

    _, recorded = _sweep_info(experiment)
    return search_finished(read_trials(experiment), expected=recorded.get("trials", 0))


def finalists(*, experiment: str | Path | Location, top: int | None = None, seeds: int | None = None,
              address: str | None = None) -> Location:
    """Run (or continue) the finalists of a sweep: per label fraction, its `top` distinct settings
    and scratch, re-run at `seeds` seeds that no search trial used, scored on validation and test
    volumes (defaults: the space's `finalists:` section, else 2 and 3). Returns the experiment
    directory; `results` reads the finalists table."""
    from lrc_ray.distributed.runtime import ray_session
    from lrc_ray.distributed.tune import TRIAL_SLOT
    from lrc_ray.search_space import FinalistSettings

    for option, value in (("--top", top), ("--seeds", seeds)):
        if value is not None and value < 1:
            raise UserInputError(f"{option}: expected at least 1, got {value}")
    experiment = checked_location(experiment)
    space = _recorded_space(experiment)
    defaults = (space.finalists if space is not None else None) or FinalistSettings()
    with ray_session(address=address, resources={TRIAL_SLOT: os.cpu_count() or 1}):
        _run_finalists(experiment, top=top or defaults.top, seeds=seeds or defaults.seeds)
    return experiment


def _run_finalists(experiment: Location, *, top: int, seeds: int) -> None:
    """Plan the finalists from the search's trials and run them (in the connected Ray)."""
    import hashlib
    import json

    from lrc_ray.distributed.tune import FINALISTS_FILE, read_trials, run_finalists, summarise_failures
    from lrc_ray.finalists import plan_finalists
    from lrc_ray.search_space import SweepSettings, label_fractions

    records = read_trials(experiment)
    info, recorded = _sweep_info(experiment)
    base = config_from_dict(recorded["base"], source=str(experiment))
    if base.data.test_cases < 1:
        raise UserInputError(
            f"{experiment}: its data.test_cases is 0; finalists are scored on test volumes that the search never "
            "saw, so run a sweep with base.data.test_cases of at least 1"
        )
    space = _recorded_space(experiment)
    plan = plan_finalists(records, info, top=top, seeds=seeds, fractions=label_fractions(space) if space else None)
    if not plan.runs:
        raise UserInputError(f"{experiment}: no trial has finished with {info.metric} at any label fraction; "
                             "nothing to re-run (resume the sweep first)")
    name = "finalists-" + hashlib.blake2b(json.dumps(plan.to_dict(), sort_keys=True).encode(), digest_size=6).hexdigest()
    experiment.join(FINALISTS_FILE).write_json(plan.to_dict() | {"experiment": name, "metric": info.metric})
    settings = space.sweep if space is not None else SweepSettings(metric=info.metric, mode=info.mode)
    grid = run_finalists(settings, base=base, fixed=recorded["fixed"], runs=[run.values for run in plan.runs],
                         experiment=experiment, name=name)
    failure = summarise_failures(grid)
    if failure:
        raise TrainingError(f"finalists {experiment.join(name)}: {failure}")


def results(
    *, experiment: str | Path | Location, metric: str | None = None, by: str = "label_fraction",
    out: str | Path | Location | None = None,
) -> dict:
    """Read a sweep (finished, interrupted or resumed) and its finalists, if any; write its tables,
    chosen configs (with the finalists' numbers beside them) and plots.

    `experiment` and `out` are local paths or URIs (default `out`: EXPERIMENT/results). Files for
    an object store are written locally first, then uploaded.
    """
    experiment = checked_location(experiment)
    if not experiment.is_dir():
        raise UserInputError(f"{experiment}: no such sweep directory")
    out_place = checked_location(out) if out is not None else experiment.join("results")
    if out_place.is_local:
        return _write_results(experiment, metric, by, out_place.local_path)
    with tempfile.TemporaryDirectory(prefix="lrc_ray_results_") as directory:
        written = _write_results(experiment, metric, by, Path(directory))
        upload_dir(Path(directory), out_place)
    return _relocated(written, Path(directory), out_place)


def _relocated(value, local: Path, place: Location):
    """`value` (as `results` returns it) with the local paths under `local` named at `place`."""
    if isinstance(value, Path) and (value == local or local in value.parents):
        relative = value.relative_to(local).parts
        return place.join(*relative) if relative else place
    if isinstance(value, dict):
        return {key: _relocated(item, local, place) for key, item in value.items()}
    if isinstance(value, list):
        return [_relocated(item, local, place) for item in value]
    return value


def _write_results(experiment: Location, metric: str | None, by: str, out_dir: Path) -> dict:
    from lrc_ray.distributed.tune import read_trials
    from lrc_ray.results import write_results

    records = read_trials(experiment)
    info, _ = _sweep_info(experiment, metric)
    reported = sorted({key for record in records for key in record.metrics if key.startswith("dice")})
    if metric is not None and reported and metric not in reported:
        import difflib

        close = difflib.get_close_matches(metric, reported, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; the trials report {', '.join(reported)}"
        raise UserInputError(f"--metric {metric}: no trial reports it{hint}")
    finalists = _finalists_table(experiment, info)
    found = chosen_values = None
    if finalists is not None:
        from lrc_ray.finalists import choices

        found = choices(finalists[0])
        if by == "label_fraction":  # the finalists' choice replaces the search's single-run best
            chosen_values = {choice.label_fraction: choice.chosen["setting"] for choice in found}
    written = write_results(records, info, out_dir, by=by, space=_recorded_space(experiment), chosen_values=chosen_values)
    written |= {"out_dir": out_dir, "metric": info.metric, "mode": info.mode, "by": by, "finalists": None, "missing": ()}
    if finalists is not None:
        from lrc_ray.finalists import write_finalists

        table, plan = finalists
        written |= write_finalists(table, found, info, out_dir, written["chosen"] if chosen_values else {},
                                   stage_root=experiment)
        written["missing"] = plan.missing
    return written


def _finalists_table(experiment: Location, info):
    """(the finalists table, their plan) of a sweep, or None when it has no finalists yet."""
    from lrc_ray.distributed.tune import FINALISTS_FILE, read_tune_experiment
    from lrc_ray.finalists import FinalistPlan, finalists_table

    if not experiment.join(FINALISTS_FILE).is_file():
        return None
    recorded = _read_json(experiment.join(FINALISTS_FILE))
    plan = FinalistPlan.from_dict(recorded)
    try:
        records = read_tune_experiment(experiment.join(recorded["experiment"]))
    except UserInputError:  # planned, but killed before Tune recorded a trial
        records = []
    outcomes = {record.values["finalist"]: record.metrics for record in records if "finalist" in record.values}
    return finalists_table(plan, outcomes, info), plan


def _sweep_info(experiment: Location, metric: str | None = None):
    """(SweepInfo, the recorded sweep file) of an experiment directory."""
    from lrc_ray.results import SweepInfo

    recorded = _recorded_sweep(experiment)
    info = SweepInfo(metric=metric or recorded["metric"], mode=recorded["mode"], base=recorded["base"], fixed=recorded["fixed"])
    return info, recorded


def _recorded_sweep(experiment: Location) -> dict:
    """The sweep file `lrc-ray tune` wrote in an experiment directory."""
    from lrc_ray.distributed.tune import SWEEP_FILE

    if not experiment.join(SWEEP_FILE).is_file():
        raise UserInputError(f"{experiment}: not an lrc-ray sweep (no {SWEEP_FILE}); pass the directory that `lrc-ray tune` printed")
    return _read_json(experiment.join(SWEEP_FILE))


def _recorded_space(experiment: Location):
    """The search space a sweep started with (None for sweeps started from an in-memory space)."""
    import yaml

    from lrc_ray.search_space import parse_search_space

    recorded = _recorded_sweep(experiment)
    if not recorded.get("space_yaml"):
        return None
    return parse_search_space(yaml.safe_load(recorded["space_yaml"]), source=recorded["source"])


def _check_split(data: DataConfig, dataset, source: str) -> None:
    """Enough labelled volumes for training, validation and test, before any trial starts."""
    from lrc_ray.engine.splits import split_labelled_cases

    try:
        split_labelled_cases([case.case_id for case in dataset.labelled_cases], validation_cases=data.validation_cases,
                             test_cases=data.test_cases, seed=data.split_seed)
    except UserInputError as exc:
        raise UserInputError(f"{source}: {dataset.root}: {exc}") from None


def _check_metric(metric: str, labels: dict[int, str], source: str) -> None:
    """Trials report dice_mean and dice/<organ>; a sweep on another name would never see it."""
    import difflib

    reported = ["dice_mean", *(f"dice/{name}" for value, name in sorted(labels.items()) if value != 0)]
    if metric not in reported:
        close = difflib.get_close_matches(metric, reported, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of {', '.join(reported)}"
        raise UserInputError(f"{source}: sweep.metric: trials do not report '{metric}'{hint}")


def _built_in_data(space, base: RunConfig) -> Path:
    if space.data is None:
        raise UserInputError(f"{space.source}: has no data: section for built-in data; pass --data with an MSD-layout data set")
    spec = space.data
    data_dir = BUILT_IN_DATA_ROOT / f"synthetic_{spec.cases}c_{spec.unlabeled}u_{spec.slices}s_{base.data.size}px"
    if not (data_dir / "dataset.json").is_file():
        make_synthetic_data(out=data_dir, cases=spec.cases, unlabeled=spec.unlabeled, size=base.data.size,
                            slices=spec.slices, seed=0)
        logger.info("wrote the built-in synthetic data set to %s", data_dir)
    return data_dir


def _read_json(place: Location) -> dict:
    import json

    try:
        return json.loads(place.read_bytes())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{place}: unreadable ({exc})") from None
