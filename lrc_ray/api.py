"""The Python API: keyword-only functions that the `lrc-ray` command line calls."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from lrc_ray.atomic import write_json_atomic
from lrc_ray.data.msd import check_headers, load_dataset
from lrc_ray.data.slices import DEFAULT_WINDOW_HU, SliceParams
from lrc_ray.config import DataConfig, RunConfig, config_from_dict, save_config
from lrc_ray.engine.splits import ProbeSource, label_fraction_subset, split_labelled_cases
from lrc_ray.errors import TrainingError, UserInputError
from lrc_ray.superpixels.cache import (
    CACHE_MARKER,
    CacheEntry,
    ExtractionParams,
    build_manifest,
    commit_entry,
    dataset_fingerprint,
    entry_key,
    entry_lock,
    find_entry,
    open_cache_root,
    staging_dir,
)
from lrc_ray.superpixels.felzenszwalb import FelzenszwalbParams
from lrc_ray.superpixels.selection import RowSelection, select_rows

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
    if (data is None) == (datalist is None):
        raise UserInputError("--data or --datalist: expected exactly one data set")
    if workers is not None and workers < 1:
        raise UserInputError(f"--workers: expected at least 1, got {workers}")
    params = _extraction_params(scale=scale, sigma=sigma, min_size=min_size, window_hu=window_hu, size=size,
                                spacing_mm=spacing_mm)
    dataset = load_dataset(data, datalist=datalist, key=key)
    headers = check_headers(dataset)
    root = open_cache_root(cache_root)
    fingerprint = dataset_fingerprint(dataset, root)
    key = entry_key(fingerprint, params)
    with entry_lock(root, key):
        existing = find_entry(root, key)
        if existing is not None and not overwrite:
            logger.info("cache hit: %s", existing.path)
            return SuperpixelResult(entry=existing, cache_hit=True)
        # Imported here so that the plain layers (and `lrc-ray data synth`) never load Ray.
        from lrc_ray.distributed.runtime import cluster_cpus, ray_session
        from lrc_ray.distributed.superpixels import extract_to_parquet

        spacing = params.slicing.working_spacing_mm
        if spacing is not None:
            fitted = f", cropped or padded to {size} x {size} px (a {size * spacing:.0f} mm field)" if size else ""
            logger.info("slices resampled to %.4g mm%s", spacing, fitted)
        started = time.perf_counter()
        with staging_dir(root, key) as staged, ray_session(address=address, num_cpus=workers):
            extract_to_parquet(
                dataset.cases,
                dataset.labels,
                params,
                str(staged),
                workers=workers or cluster_cpus(),
                total_slices=headers.total_slices,
                slice_pixels=size * size if size else headers.max_slice_pixels,
            )
            manifest = build_manifest(dataset, fingerprint, params, time.perf_counter() - started)
            entry = commit_entry(
                staged, root, key, manifest, expected_slices=headers.total_slices, overwrite=overwrite
            )
    logger.info("built %s (%d slices) in %.1f s", entry.path, entry.num_slices, entry.manifest["build_seconds"])
    return SuperpixelResult(entry=entry, cache_hit=False)


def find_superpixels(config: DataConfig) -> CacheEntry:
    """The existing cache entry for a run config's data and super-pixel settings.

    Raises:
        UserInputError: when it was never built, naming the command that builds it.
    """
    params = extraction_params_for(config)
    dataset = dataset_for(config)
    root = Path(config.cache_root)
    entry = None
    if (root / CACHE_MARKER).is_file():
        entry = find_entry(root, entry_key(dataset_fingerprint(dataset, root), params))
    if entry is None:
        source = f"--datalist {config.datalist} --key {config.datalist_key}" if config.datalist else f"--data {config.data_dir}"
        spacing = f" --spacing {config.spacing_mm:g}" if config.spacing_mm is not None else ""
        raise UserInputError(
            f"{config.datalist or config.data_dir}: no super-pixel cache under {root} for scale={config.scale:g} "
            f"sigma={config.sigma:g} min_size={config.min_size} size={config.size} spacing_mm={config.spacing_mm}; "
            f"make it with `lrc-ray superpixels {source} --out {root} --scale {config.scale:g} --sigma {config.sigma:g} "
            f"--min-size {config.min_size} --size {config.size}{spacing}`"
        )
    return entry


def dataset_for(config: DataConfig):
    """The volumes a run config's data section names (its datalist, else its data directory)."""
    return load_dataset(config.data_dir, datalist=config.datalist, key=config.datalist_key)


def extraction_params_for(config: DataConfig) -> ExtractionParams:
    """The super-pixel cache parameters of a run config's data section."""
    return _extraction_params(
        scale=config.scale, sigma=config.sigma, min_size=config.min_size, window_hu=config.window_hu, size=config.size,
        spacing_mm=config.spacing_mm,
    )


def superpixels_for(config: DataConfig, *, address: str | None = None) -> SuperpixelResult:
    """Get or build the super-pixel cache entry a run config asks for."""
    return build_superpixels(
        data=None if config.datalist else config.data_dir, cache_root=config.cache_root, scale=config.scale, sigma=config.sigma,
        min_size=config.min_size, window_hu=config.window_hu, size=config.size, spacing_mm=config.spacing_mm,
        address=address, datalist=config.datalist, key=config.datalist_key,
    )


def _extraction_params(*, scale, sigma, min_size, window_hu, size, spacing_mm=None) -> ExtractionParams:
    return ExtractionParams(
        felzenszwalb=FelzenszwalbParams(scale=scale, sigma=sigma, min_size=min_size),
        slicing=SliceParams(window_hu=tuple(window_hu), size=size, spacing_mm=spacing_mm),
    )


def describe_entry(entry: CacheEntry) -> dict:
    """Numbers a user wants to see about a cache entry."""
    import pyarrow.compute as pc

    from lrc_ray.superpixels.cache import read_entry_table

    table = read_entry_table(entry, columns=["case_id", "n_regions", "height", "width"])
    return {
        "path": str(entry.path),
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
    when started again. Validation volumes are left out of pre-training. The checkpoint
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
            config, parquet_dir=str(data.entry.path), selection=data.selection, num_slices=data.num_slices,
            storage_path=str(out_dir), name=name, workers=workers, use_gpu=use_gpu, num_classes=data.num_classes,
        )
    return save_checkpoint(checkpoint, state_dict=outcome.state_dict, config=config.to_dict(), epoch=outcome.epoch,
                           history=outcome.history)


@dataclass(frozen=True)
class PretrainingData:
    """The cached slices pre-training reads, and the number of classes when labels are used."""

    entry: CacheEntry
    selection: RowSelection
    num_classes: int | None
    num_slices: int  # the slices the selection keeps


def pretraining_data(config: RunConfig) -> PretrainingData:
    """Self-supervised methods use every volume of the data set except the validation ones; the
    supervised methods use the labelled volumes of `pretrain.source_data_dir`, a separate set."""

    from lrc_ray.superpixels.cache import read_entry_table

    settings = config.pretrain
    if not settings.uses_supervised:
        _, _, split = _training_table(config, columns=["label"])
        entry, num_classes = find_superpixels(config.data), None
        selection = RowSelection(exclude_cases=split.validation, min_regions=settings.min_regions)
    else:
        if Path(settings.source_data_dir).resolve() == Path(config.data.data_dir).resolve():
            raise UserInputError(
                f"pretrain.source_data_dir: {settings.source_data_dir} is the fine-tuning data set; supervised "
                "pre-training on it would use labels beyond the label fraction"
            )
        entry = find_superpixels(replace(config.data, data_dir=settings.source_data_dir, datalist=None))
        selection, num_classes = RowSelection(labelled_only=True, min_regions=settings.min_regions), max(_entry_labels(entry)) + 1
    kept = select_rows(read_entry_table(entry, columns=["n_regions", "label"]), selection).num_rows
    return PretrainingData(entry, selection, num_classes, kept)


def pretrains(config: RunConfig) -> bool:
    """False when there is nothing to optimise (`scratch`, or zero epochs)."""
    settings = config.pretrain
    return settings.epochs > 0 and (settings.uses_global or settings.uses_local or settings.uses_supervised)


def probe_source(config: RunConfig, entry: CacheEntry) -> ProbeSource:
    """The per-epoch probe's data: one labelled training volume that every label fraction's
    subset contains (the first of the nested order), and the validation volumes."""

    _, labels, split = _training_table(config, columns=["label"])
    smallest = 1 / (len(split.train_pool) + 1)  # rounds to a single volume
    (train_case,) = label_fraction_subset(split.train_pool, smallest, seed=config.data.split_seed)
    return ProbeSource(parquet_dir=str(entry.path), train_case=train_case, validation_cases=split.validation,
                       num_classes=max(labels) + 1)


def check_batch_fits(config: RunConfig, data: PretrainingData, *, workers: int = 1) -> None:
    """Refuse a global batch larger than the slices to pre-train on (no step would run)."""
    batch = config.pretrain.batch_size
    if data.num_slices < batch * max(workers, 1):
        across = f" x {workers} workers" if workers > 1 else ""
        raise UserInputError(f"pretrain.batch_size: {batch}{across} is more than the {data.num_slices} slices to pre-train on")


def _pretrain_in_process(config: RunConfig, data: PretrainingData, checkpoint: Path, *, progress: bool) -> Path:
    """The plain loop in this process; `scratch` (or zero epochs) saves the random initialisation."""
    import torch

    from lrc_ray.data.shard import compact_slices
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
    arrays = compact_slices(read_entry_table(data.entry), data.selection)
    logger.info("pre-training %s on %d slices, %d epochs, batch %d", config.pretrain.method, data.num_slices,
                config.pretrain.epochs, config.pretrain.batch_size)
    run_pretraining(config, LocalRun(config, arrays, checkpoint, progress=progress), num_classes=data.num_classes)
    return checkpoint


def finetune(
    *, config: RunConfig, checkpoint: str | Path | None = None, out_dir: str | Path | None = None, progress: bool = True
) -> dict:
    """Fine-tune at `config.finetune.label_fraction` and return per-organ and mean 3D Dice.

    Without a checkpoint the network starts from random weights (the `scratch` baseline).
    """
    from lrc_ray.engine.checkpoint import load_checkpoint
    from lrc_ray.engine.finetune import build_segmentation_model, evaluate, finetune as run_finetune

    pretrained_state, source = None, "random initialisation"
    if checkpoint is not None:
        payload = load_checkpoint(checkpoint)
        saved_network = payload["config"].get("network")
        if saved_network != config.to_dict()["network"]:
            raise UserInputError(
                f"{checkpoint}: built with network {saved_network}, but the config asks for {config.to_dict()['network']}"
            )
        pretrained_state, source = payload["state_dict"], f"{checkpoint} ({payload['config']['pretrain']['method']})"
    table, labels, split = _training_table(config)
    train_cases = label_fraction_subset(split.train_pool, config.finetune.label_fraction, seed=config.data.split_seed)
    import torch

    torch.manual_seed(config.seed)  # the new head (and, for scratch, the backbone) starts the same in any process
    model = build_segmentation_model(config.network, max(labels) + 1, pretrained_state)
    logger.info("fine-tuning from %s on %d of %d volumes", source, len(train_cases), len(split.train_pool))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a Ray task given a GPU sees one
    history = run_finetune(model, table, train_cases=train_cases, config=config.finetune, seed=config.seed,
                           progress=progress, device=device)
    results = evaluate(model, table, cases=split.validation, labels=labels) | {
        "label_fraction": config.finetune.label_fraction,
        "train_cases": list(train_cases),
        "initialisation": source,
        "history": history,
    }
    if out_dir is not None:
        write_json_atomic(Path(out_dir) / "results.json", results)
    return results


def export(*, checkpoint: str | Path, out: str | Path) -> dict[str, Path]:
    """Write a pre-training checkpoint's encoder-decoder as a plain MONAI BasicUNet state_dict and a
    YAML of its constructor arguments and preprocessing (see `lrc_ray.engine.export`)."""
    from lrc_ray.engine.export import export_basic_unet

    return export_basic_unet(checkpoint, out)


def _cached_slices(data: DataConfig, columns: list[str] | None = None):
    """The cached slices of a data set (all columns, or `columns`), and its label names (kept in
    the entry's manifest)."""
    from lrc_ray.superpixels.cache import read_entry_table

    entry = find_superpixels(data)
    return read_entry_table(entry, columns=columns), _entry_labels(entry)


def _entry_labels(entry: CacheEntry) -> dict[int, str]:
    """Label value -> name, as kept in the entry's manifest."""
    return {int(value): name for value, name in entry.manifest["labels"].items()}


def _training_table(config: RunConfig, columns: list[str] | None = None):
    """The cached slices of the run's data, its label names, and the validation split of its labelled
    volumes. Callers that need only the split read `columns=["label"]`, not the images."""
    import pyarrow.compute as pc

    table, labels = _cached_slices(config.data, columns)
    labelled = table.filter(pc.is_valid(table.column("label")))
    case_ids = [str(value) for value in pc.unique(labelled.column("case_id")).to_pylist()]
    split = split_labelled_cases(case_ids, validation_cases=config.data.validation_cases, seed=config.data.split_seed)
    return table, labels, split


DEFAULT_STORAGE = Path(".lrc_ray/sweeps")
BUILT_IN_DATA_ROOT = Path(".lrc_ray/data")


def tune(
    *,
    space: str | Path,
    data: str | Path | None = None,
    storage: str | Path | None = None,
    name: str | None = None,
    num_samples: int | None = None,
    resume: bool = False,
    address: str | None = None,
    search: str = "tpe",
    datalist: str | Path | None = None,
    key: str = "training",
) -> Path:
    """Run a sweep of `space` (a search-space YAML) on Ray; returns the experiment directory.

    The data are `data` (a directory), or the `key` entries of a MONAI `datalist`; without
    either, the space's built-in synthetic data set is made (once) and used. With `resume`, an
    interrupted sweep continues with its finished trials kept.
    """
    import yaml

    from lrc_ray.distributed.runtime import ray_session
    from lrc_ray.distributed.tune import SWEEP_FILE, TRIAL_SLOT, run_sweep, summarise_failures
    from lrc_ray.search_space import load_search_space, parse_search_space, run_config_for

    search_space = load_search_space(space)
    if num_samples is not None and num_samples < 1:
        raise UserInputError(f"--samples: expected at least 1, got {num_samples}")
    name = name or Path(space).stem
    storage = Path(storage or DEFAULT_STORAGE).resolve()
    _check_writable(storage)
    experiment = storage / name
    if resume and not (experiment / SWEEP_FILE).is_file():
        raise UserInputError(f"--resume: no sweep to resume at {experiment}")
    if resume:
        # The sweep continues as it started, whatever the space file says now.
        recorded = _read_json(experiment / SWEEP_FILE)
        base = config_from_dict(recorded["base"], source=str(experiment / SWEEP_FILE))
        if recorded.get("space_yaml"):
            search_space = parse_search_space(yaml.safe_load(recorded["space_yaml"]), source=recorded["source"])
    else:
        base = run_config_for(search_space, {})
        if data is not None and datalist is not None:
            raise UserInputError("--data or --datalist: expected at most one data set")
        if datalist is not None:
            base = base.replace(data={"datalist": str(Path(datalist).resolve()), "datalist_key": key})
        else:
            data_dir = Path(data) if data is not None else _built_in_data(search_space, base)
            base = base.replace(data={"data_dir": str(data_dir.resolve())})
        _check_metric(search_space.sweep.metric, dataset_for(base.data).labels, search_space.source)
        base = base.replace(data={"cache_root": str(Path(base.data.cache_root).resolve())})
    with ray_session(address=address, resources={TRIAL_SLOT: os.cpu_count() or 1}):
        result_grid = run_sweep(search_space, base=base, storage=storage, name=name, num_samples=num_samples,
                                resume=resume, search=search)
        failure = summarise_failures(result_grid)
    if failure:
        raise TrainingError(f"sweep {experiment}: {failure}")
    return experiment


def results(
    *, experiment: str | Path, metric: str | None = None, by: str = "label_fraction", out: str | Path | None = None
) -> dict:
    """Read a sweep (finished, interrupted or resumed) and write its tables, chosen configs and plots."""
    import yaml

    from lrc_ray.distributed.tune import SWEEP_FILE, read_trials
    from lrc_ray.results import SweepInfo, write_results
    from lrc_ray.search_space import parse_search_space

    experiment = Path(experiment).resolve()
    if not experiment.is_dir():
        raise UserInputError(f"{experiment}: no such sweep directory")
    records = read_trials(experiment)
    recorded = _read_json(experiment / SWEEP_FILE)
    info = SweepInfo(metric=metric or recorded["metric"], mode=recorded["mode"], base=recorded["base"], fixed=recorded["fixed"])
    reported = sorted({key for record in records for key in record.metrics if key.startswith("dice")})
    if metric is not None and reported and metric not in reported:
        import difflib

        close = difflib.get_close_matches(metric, reported, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; the trials report {', '.join(reported)}"
        raise UserInputError(f"--metric {metric}: no trial reports it{hint}")
    space = None
    if recorded.get("space_yaml"):
        space = parse_search_space(yaml.safe_load(recorded["space_yaml"]), source=recorded["source"])
    out_dir = Path(out) if out is not None else experiment / "results"
    written = write_results(records, info, out_dir, by=by, space=space)
    return written | {"out_dir": out_dir, "metric": info.metric, "mode": info.mode, "by": by}


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


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UserInputError(f"--storage {directory}: not writable ({exc.strerror or exc})") from None


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{path}: unreadable ({exc})") from None
