"""The run stages, plain: super-pixels -> pre-train -> fine-tune -> evaluate.

As in nnU-Net's staged pipeline, each stage's output lies under a key made from its inputs and
a stage whose output exists is skipped: trials of a sweep, its finalists and a resumed run
share every output whose inputs are equal. The layout under a stage root (a sweep's
experiment directory):

    pretrained/<pretraining key>/checkpoint.pt   the online network's weights
                                 history.json    its epoch reports, written last: marks it done
    finetuned/<fine-tuning key>/model.pt         the fine-tuned model: weights, config, label names and
                                                 preprocessing (`engine.saved_model`; `lrc-ray predict --model`)
                                finetune.json    its loss history and seconds, written last
                                validation.json  its Dice on each held-out part scored so far, on
                                                 each volume's native grid (`engine.predict`)
                                test.json

(super-pixels are keyed by the cache itself: `superpixels.cache.entry_key`). The root is a local
path or a URI (`s3://bucket/prefix`: `lrc_ray.storage`). A lock per key (`storage.key_lock`:
flock locally, a named Ray actor's lease on object stores) makes concurrent runs of one key compute
it once; each file is published whole and a stage's last file marks it done, so an interrupted
stage leaves nothing that a later run takes for done.

The work that needs Ray comes in as a function from the caller, so this module imports none:
building the super-pixel cache (`Extract`: the Ray Data pipeline) and pre-training
(`PretrainFn`: the plain loop in-process, a Ray Train run, or the loop inside a Tune trial).
`RunData` is read once per run (one read of dataset.json, none of the slice table) and handed
to every later stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lrc_ray.config import DataConfig, RunConfig
from lrc_ray.data.msd import CaseEntry, HeaderSummary, MsdDataset, check_headers, load_dataset, load_msd_dataset
from lrc_ray.data.slices import SliceParams
from lrc_ray.engine.splits import CaseSplit, ProbeSource, label_fraction_subset, split_labelled_cases
from lrc_ray.errors import UserInputError
from lrc_ray.superpixels.cache import (
    CACHE_MARKER, CacheEntry, ExtractionParams, build_manifest, commit_entry, dataset_fingerprint, entry_key, entry_lock, find_entry,
    open_cache_root, staging_dir,
)
from lrc_ray.storage import Location, checked_location, key_lock, location
from lrc_ray.superpixels.felzenszwalb import FelzenszwalbParams
from lrc_ray.superpixels.selection import RowSelection, select_rows

logger = logging.getLogger(__name__)

PRETRAINED_DIR = "pretrained"
FINETUNED_DIR = "finetuned"
MODEL_FILE = "model.pt"  # a fine-tuning's model (`engine.saved_model`)
HISTORY_FILE = "history.json"  # a pre-training's epoch reports, written after its checkpoint
FINETUNE_FILE = "finetune.json"  # a fine-tuning's history and seconds, written after its weights
FINETUNED_FORMAT = 2  # part of the fine-tuning key: outputs of another format are not reused

# Writes a data set's super-pixel table as Parquet files into a directory, a local path or an
# object-store prefix (the Ray Data pipeline).
Extract = Callable[[MsdDataset, ExtractionParams, Location, HeaderSummary], None]


@dataclass(frozen=True)
class PretrainingData:
    """The cached slices pre-training reads, and the number of classes when labels are used."""

    entry: CacheEntry
    selection: RowSelection
    num_classes: int | None
    num_slices: int  # the slices the selection keeps


# Pre-trains `config` on `data`, writes the online network's checkpoint at the location (with
# `engine.checkpoint.save_checkpoint`) and returns the epoch reports.
PretrainFn = Callable[[RunConfig, PretrainingData, Location], list[dict]]


@dataclass(frozen=True)
class RunData:
    """What the stages after the super-pixels read: the cache entry, its label names and the split of
    its labelled volumes."""

    entry: CacheEntry
    labels: dict[int, str]  # label value -> organ name (0: background)
    split: CaseSplit
    labelled_cases: tuple[CaseEntry, ...]  # their files, which evaluation reads on their native grid
    cache_hit: bool = True  # False: this call built the entry

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1


# --- stage 1: super-pixels -------------------------------------------------------------------


def extraction_params(
    *, scale: float, sigma: float, min_size: int, window_hu: tuple[float, float], size: int | None,
    spacing_mm: float | None = None,
) -> ExtractionParams:
    return ExtractionParams(
        felzenszwalb=FelzenszwalbParams(scale=scale, sigma=sigma, min_size=min_size),
        slicing=SliceParams(window_hu=tuple(window_hu), size=size, spacing_mm=spacing_mm),
    )


def extraction_params_for(data: DataConfig) -> ExtractionParams:
    """The super-pixel cache parameters of a run config's data section."""
    return extraction_params(scale=data.scale, sigma=data.sigma, min_size=data.min_size, window_hu=data.window_hu,
                             size=data.size, spacing_mm=data.spacing_mm)


def dataset_for(data: DataConfig) -> MsdDataset:
    """The volumes a run config's data section names (its datalist, else its data directory)."""
    return load_dataset(data.data_dir, datalist=data.datalist, key=data.datalist_key)


def superpixel_entry(
    dataset: MsdDataset, cache_root: str | Path, params: ExtractionParams, *, extract: Extract | None,
    overwrite: bool = False,
) -> tuple[CacheEntry, bool]:
    """The cache entry of a data set and parameters, built with `extract` when missing (or with
    `overwrite`); returns (entry, whether it was there). Concurrent callers build it once.

    Raises:
        UserInputError: when it is missing and there is no `extract` (naming the command that builds it).
    """
    if extract is None:
        root = checked_location(cache_root)
        existing = None
        if root.join(CACHE_MARKER).is_file():
            existing = find_entry(root, entry_key(dataset_fingerprint(dataset, root), params))
        if existing is None:
            raise UserInputError(_missing_entry_message(dataset, root, params))
        return existing, True
    headers = check_headers(dataset)  # before the cache root is made: a bad scan leaves nothing behind
    root = open_cache_root(cache_root)
    fingerprint = dataset_fingerprint(dataset, root)
    key = entry_key(fingerprint, params)
    with entry_lock(root, key):
        existing = find_entry(root, key)
        if existing is not None and not overwrite:
            logger.info("cache hit: %s", existing.uri)
            return existing, True
        spacing = params.slicing.working_spacing_mm
        if spacing is not None:
            size = params.slicing.size
            fitted = f", cropped or padded to {size} x {size} px (a {size * spacing:.0f} mm field)" if size else ""
            logger.info("slices resampled to %.4g mm%s", spacing, fitted)
        started = time.perf_counter()
        with staging_dir(root, key) as staged:
            extract(dataset, params, staged, headers)
            manifest = build_manifest(dataset, fingerprint, params, time.perf_counter() - started)
            entry = commit_entry(staged, root, key, manifest, expected_slices=headers.total_slices, overwrite=overwrite)
    logger.info("built %s (%d slices) in %.1f s", entry.uri, entry.num_slices, entry.manifest["build_seconds"])
    return entry, False


def _missing_entry_message(dataset: MsdDataset, root: Location, params: ExtractionParams) -> str:
    spec, slicing = params.felzenszwalb, params.slicing
    datalist = dataset.index_file if dataset.datalist_key is not None else None
    source = f"--datalist {datalist} --key {dataset.datalist_key}" if datalist else f"--data {dataset.root}"
    spacing = f" --spacing {slicing.spacing_mm:g}" if slicing.spacing_mm is not None else ""
    return (
        f"{datalist or dataset.root}: no super-pixel cache under {root} for scale={spec.scale:g} sigma={spec.sigma:g} "
        f"min_size={spec.min_size} size={slicing.size} spacing_mm={slicing.spacing_mm}; make it with "
        f"`lrc-ray superpixels {source} --out {root} --scale {spec.scale:g} --sigma {spec.sigma:g} "
        f"--min-size {spec.min_size} --size {slicing.size}{spacing}`"
    )


def run_data(data: DataConfig, *, extract: Extract | None = None) -> RunData:
    """Stage 1 for a run config: its super-pixel entry (built with `extract` when missing) and its
    split, from one read of dataset.json.

    Raises:
        UserInputError: no entry and no `extract`; too few labelled volumes for the split.
    """
    dataset = dataset_for(data)
    entry, hit = superpixel_entry(dataset, data.cache_root, extraction_params_for(data), extract=extract)
    split = split_labelled_cases([case.case_id for case in dataset.labelled_cases], validation_cases=data.validation_cases,
                                 test_cases=data.test_cases, seed=data.split_seed)
    return RunData(entry=entry, labels=entry_labels(entry), split=split, labelled_cases=dataset.labelled_cases,
                   cache_hit=hit)


def entry_labels(entry: CacheEntry) -> dict[int, str]:
    """Label value -> name, as kept in the entry's manifest."""
    return {int(value): name for value, name in entry.manifest["labels"].items()}


# --- stage 2: pre-training -------------------------------------------------------------------


def pretrains(config: RunConfig) -> bool:
    """False when there is nothing to optimise (`scratch`, or zero epochs)."""
    settings = config.pretrain
    return settings.epochs > 0 and (settings.uses_global or settings.uses_local or settings.uses_supervised)


def pretraining_data(config: RunConfig, data: RunData, *, extract: Extract | None = None) -> PretrainingData:
    """Self-supervised methods use every volume of the data set except the held-out ones
    (validation and test); the supervised methods use the labelled volumes of
    `pretrain.source_data_dir`, a separate set (its entry built with `extract` when missing)."""
    entry, selection, num_classes = _pretraining_source(config, data, extract)
    return PretrainingData(entry, selection, num_classes, _kept_slices(entry, selection))


def _pretraining_source(config: RunConfig, data: RunData, extract: Extract | None):
    """(cache entry, row selection, classes or None) of `pretraining_data`, without reading the slices."""
    settings = config.pretrain
    if not settings.uses_supervised:
        selection = RowSelection(exclude_cases=data.split.validation + data.split.test, min_regions=settings.min_regions)
        return data.entry, selection, None
    if Path(settings.source_data_dir).resolve() == Path(config.data.data_dir).resolve():
        raise UserInputError(
            f"pretrain.source_data_dir: {settings.source_data_dir} is the fine-tuning data set; supervised "
            "pre-training on it would use labels beyond the label fraction"
        )
    source = load_msd_dataset(settings.source_data_dir)
    entry, _ = superpixel_entry(source, config.data.cache_root, extraction_params_for(config.data), extract=extract)
    return entry, RowSelection(labelled_only=True, min_regions=settings.min_regions), max(entry_labels(entry)) + 1


def _kept_slices(entry: CacheEntry, selection: RowSelection) -> int:
    from lrc_ray.superpixels.cache import read_entry_table

    return select_rows(read_entry_table(entry, columns=["n_regions", "label"]), selection).num_rows


def check_batch_fits(config: RunConfig, data: PretrainingData, *, workers: int = 1) -> None:
    """Refuse a global batch larger than the slices to pre-train on (no step would run)."""
    batch = config.pretrain.batch_size
    if data.num_slices < batch * max(workers, 1):
        across = f" x {workers} workers" if workers > 1 else ""
        raise UserInputError(f"pretrain.batch_size: {batch}{across} is more than the {data.num_slices} slices to pre-train on")


def probe_source(config: RunConfig, data: RunData) -> ProbeSource:
    """The per-epoch probe's data: one labelled training volume that every label fraction's
    subset contains (the first of the nested order), and the validation volumes."""
    pool = data.split.train_pool
    (train_case,) = label_fraction_subset(pool, 1 / (len(pool) + 1), seed=config.data.split_seed)  # one volume
    return ProbeSource(parquet_dir=data.entry.uri, train_case=train_case, validation_cases=data.split.validation,
                       num_classes=data.num_classes)


def pretraining_key(config: RunConfig, superpixel_key: str, workers: int) -> str:
    """Equal for runs whose pre-training would be identical: they differ only in fine-tuning, or
    in settings their method does not use (e.g. the LRC temperature of a `global` run)."""
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
        # the held-out volumes, which pre-training leaves out
        "split": [config.data.validation_cases, config.data.test_cases, config.data.split_seed],
        "augment": config.to_dict()["augment"],
        "network": config.to_dict()["network"],
        "pretrain": pretrain,
        "seed": config.seed,
        "workers": workers,  # the global batch
    }
    return f"{config.pretrain.method.replace('+', '_')}-{_digest(relevant)}"


@dataclass(frozen=True)
class Pretrained:
    key: str
    checkpoint: Location
    history: list[dict]  # the epoch reports
    reused: bool  # an earlier run's output: nothing was trained by this call


def pretrain(config: RunConfig, data: RunData, *, root: str | Path | Location, workers: int, pretrain_fn: PretrainFn,
             extract: Extract | None = None) -> Pretrained | None:
    """Stage 2: the pre-trained checkpoint of `config` under `root`, made with `pretrain_fn` unless
    an earlier run made it; None for a run with nothing to pre-train (`scratch`).

    `workers` is part of the key (it sets the global batch).

    Raises:
        UserInputError: a batch larger than the slices to pre-train on, and what `pretraining_data` raises.
    """
    if not pretrains(config):
        return None
    entry, selection, num_classes = _pretraining_source(config, data, extract)
    key = pretraining_key(config, entry.key, workers)
    directory = location(root).join(PRETRAINED_DIR, key)
    directory.makedirs()
    checkpoint, history_file = directory.join("checkpoint.pt"), directory.join(HISTORY_FILE)
    with key_lock(directory.parent, key):
        if history_file.is_file():
            return Pretrained(key, checkpoint, json.loads(history_file.read_text()), reused=True)
        inputs = PretrainingData(entry, selection, num_classes, _kept_slices(entry, selection))
        check_batch_fits(config, inputs, workers=workers)
        history = pretrain_fn(config, inputs, checkpoint)
        history_file.write_json(history)  # last: it marks the checkpoint complete
    return Pretrained(key, checkpoint, history, reused=False)


# --- stages 3 and 4: fine-tuning and evaluation ----------------------------------------------


def finetuning_key(config: RunConfig, pretrained: str | None) -> str:
    """Equal for runs whose fine-tuning would be identical: the same pre-trained checkpoint (or
    none: `scratch`), data, split, network, fine-tuning settings and seed. Felzenszwalb settings
    matter only through the checkpoint: fine-tuning reads images and labels, not super-pixels."""
    data = config.to_dict()["data"]
    relevant = {
        "pretrained": pretrained,
        "data": {name: data[name] for name in ("data_dir", "datalist", "datalist_key", "size", "spacing_mm", "window_hu",
                                               "validation_cases", "test_cases", "split_seed")},
        "network": config.to_dict()["network"],
        "finetune": config.to_dict()["finetune"],
        "seed": config.seed,
        # 2: a self-describing model.pt, Dice on the native grid (1: weights only, Dice on working slices)
        "outputs": FINETUNED_FORMAT,
    }
    return _digest(relevant)


def run_keys(config: RunConfig, workers: int) -> tuple[str | None, str]:
    """(pre-training key or None, fine-tuning key) from a run's config alone, as a searcher sees it
    before the run: the super-pixels stand for themselves by their cache parameters, where a run
    keys its checkpoint by the cache entry (which also fingerprints the data files' contents)."""
    superpixels = json.dumps(extraction_params_for(config.data).as_dict(), sort_keys=True)
    pretrained = pretraining_key(config, superpixels, workers) if pretrains(config) else None
    return pretrained, finetuning_key(config, pretrained)


def finetune_model(config: RunConfig, data: RunData, table, checkpoint: str | Path | Location | None, *, progress: bool = False):
    """Fine-tune at `config.finetune.label_fraction` on the slices of `table` (the entry's table);
    returns (model, summary: label_fraction, train_cases, initialisation, history, seconds).

    Without a checkpoint the network starts from random weights (the `scratch` baseline).

    Raises:
        UserInputError: a checkpoint that is unreadable or of another network.
    """
    import torch

    from lrc_ray.engine.checkpoint import load_checkpoint
    from lrc_ray.engine.finetune import build_segmentation_model, finetune

    pretrained_state, source = None, "random initialisation"
    if checkpoint is not None:
        payload = load_checkpoint(checkpoint)
        saved_network = payload["config"].get("network")
        if saved_network != config.to_dict()["network"]:
            raise UserInputError(
                f"{checkpoint}: built with network {saved_network}, but the config asks for {config.to_dict()['network']}"
            )
        pretrained_state, source = payload["state_dict"], f"{checkpoint} ({payload['config']['pretrain']['method']})"
    train_cases = label_fraction_subset(data.split.train_pool, config.finetune.label_fraction, seed=config.data.split_seed)
    started = time.perf_counter()
    torch.manual_seed(config.seed)  # the new head (and, for scratch, the backbone) starts the same in any process
    model = build_segmentation_model(config.network, data.num_classes, pretrained_state)
    logger.info("fine-tuning from %s on %d of %d volumes", source, len(train_cases), len(data.split.train_pool))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a Ray task given a GPU sees one
    history = finetune(model, table, train_cases=train_cases, config=config.finetune, seed=config.seed,
                       progress=progress, device=device)
    summary = {"label_fraction": config.finetune.label_fraction, "train_cases": list(train_cases),
               "initialisation": source, "history": history, "seconds": time.perf_counter() - started}
    return model, summary


def evaluate_model(model, config: RunConfig, data: RunData, part: str) -> dict:
    """Per-organ and mean 3D Dice of a fine-tuned model on a held-out part ("validation" or
    "test") of the split, on each volume's native grid (its slices prepared as `config` says,
    predicted and put back, as `lrc-ray predict` does), with the volumes (`cases`) and the
    seconds it took.

    Raises:
        UserInputError: a part with no volumes (e.g. "test" with `data.test_cases` 0).
    """
    from lrc_ray.engine.predict import evaluate_cases
    from lrc_ray.engine.saved_model import slicing_for

    cases = data.split.part(part)
    if not cases:
        raise UserInputError(f"data.test_cases: 0, so there are no {part} volumes to score; set it to at least 1")
    started = time.perf_counter()
    files = {case.case_id: case for case in data.labelled_cases}
    scores = evaluate_cases(model, [files[case] for case in cases], labels=data.labels, slicing=slicing_for(config))
    return scores | {"cases": list(cases), "seconds": time.perf_counter() - started}


@dataclass(frozen=True)
class Finetuned:
    key: str
    summary: dict  # as `finetune_model` returns it (seconds: those of the run that trained it)
    scores: dict[str, dict]  # held-out part -> `evaluate_model`'s scores
    reused: bool  # the fine-tuning was an earlier run's
    seconds: float  # what this call computed: fine-tuning (unless reused) and the evaluations it ran


def finetuned_model(root: str | Path | Location, key: str) -> Location:
    """Where the fine-tuning of `key` under a stage root (a path or a URI) keeps its model."""
    return location(root).join(FINETUNED_DIR, key, MODEL_FILE)


def finetune_and_evaluate(
    config: RunConfig, data: RunData, pretrained: Pretrained | None, *, root: str | Path | Location, parts: tuple[str, ...],
    progress: bool = False,
) -> Finetuned:
    """Stages 3 and 4: fine-tune from `pretrained` (None: from scratch) unless an earlier run did,
    then score the held-out `parts` not scored before; both keyed under `root`."""
    from lrc_ray.engine.saved_model import load_model, save_model
    from lrc_ray.superpixels.cache import read_entry_table

    key = finetuning_key(config, pretrained.key if pretrained else None)
    model_file = finetuned_model(root, key)
    directory = model_file.parent
    directory.makedirs()
    summary_file = directory.join(FINETUNE_FILE)
    model, spent = None, 0.0
    with key_lock(directory.parent, key):
        reused = summary_file.is_file()
        if reused:
            summary = json.loads(summary_file.read_text())
        else:
            table = read_entry_table(data.entry)
            model, summary = finetune_model(config, data, table, pretrained.checkpoint if pretrained else None,
                                            progress=progress)
            spent += summary["seconds"]
            save_model(model_file, model, config=config, labels=data.labels)
            summary_file.write_json(summary)  # last: it marks the weights complete
        scores = {}
        for part in parts:
            part_file = directory.join(f"{part}.json")
            if part_file.is_file():
                scores[part] = json.loads(part_file.read_text())
                continue
            if model is None:
                import torch

                model = load_model(model_file).model.to("cuda" if torch.cuda.is_available() else "cpu")
            scores[part] = evaluate_model(model, config, data, part)
            spent += scores[part]["seconds"]
            part_file.write_json(scores[part])
    return Finetuned(key=key, summary=summary, scores=scores, reused=reused, seconds=spent)


def _digest(relevant: dict) -> str:
    return hashlib.blake2b(json.dumps(relevant, sort_keys=True).encode(), digest_size=10).hexdigest()
