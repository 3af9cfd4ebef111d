"""The Python API: keyword-only functions that the `lrc-ray` command line calls."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from lrc_ray.atomic import write_json_atomic
from lrc_ray.data.msd import check_headers, load_msd_dataset
from lrc_ray.data.slices import DEFAULT_WINDOW_HU, SliceParams
from lrc_ray.config import DataConfig, RunConfig, save_config
from lrc_ray.errors import UserInputError
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

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SuperpixelResult:
    entry: CacheEntry
    cache_hit: bool


def make_synthetic_data(*, out: str | Path, cases: int, unlabeled: int, size: int, slices: int, seed: int) -> Path:
    """Write the built-in synthetic abdominal CT data set (MSD layout) to `out`."""
    from lrc_ray.data.phantom import write_synthetic_dataset

    return write_synthetic_dataset(out, cases=cases, unlabeled=unlabeled, size=size, slices=slices, seed=seed)


def build_superpixels(
    *,
    data: str | Path,
    cache_root: str | Path,
    scale: float = FelzenszwalbParams.scale,
    sigma: float = FelzenszwalbParams.sigma,
    min_size: int = FelzenszwalbParams.min_size,
    window_hu: tuple[float, float] = DEFAULT_WINDOW_HU,
    size: int | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    address: str | None = None,
) -> SuperpixelResult:
    """Get the super-pixel cache entry for a data set and parameters, building it if needed.

    A second call with the same data and parameters returns the existing entry at once;
    concurrent callers for one entry build it once (the others wait and hit).
    """
    if workers is not None and workers < 1:
        raise UserInputError(f"--workers: expected at least 1, got {workers}")
    params = _extraction_params(scale=scale, sigma=sigma, min_size=min_size, window_hu=window_hu, size=size)
    dataset = load_msd_dataset(data)
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
    params = _extraction_params(
        scale=config.scale, sigma=config.sigma, min_size=config.min_size, window_hu=config.window_hu, size=config.size
    )
    dataset = load_msd_dataset(config.data_dir)
    root = Path(config.cache_root)
    entry = None
    if (root / CACHE_MARKER).is_file():
        entry = find_entry(root, entry_key(dataset_fingerprint(dataset, root), params))
    if entry is None:
        raise UserInputError(
            f"{config.data_dir}: no super-pixel cache under {root} for scale={config.scale:g} sigma={config.sigma:g} "
            f"min_size={config.min_size} size={config.size}; make it with `lrc-ray superpixels --data {config.data_dir} "
            f"--out {root} --scale {config.scale:g} --sigma {config.sigma:g} --min-size {config.min_size} --size {config.size}`"
        )
    return entry


def _extraction_params(*, scale, sigma, min_size, window_hu, size) -> ExtractionParams:
    return ExtractionParams(
        felzenszwalb=FelzenszwalbParams(scale=scale, sigma=sigma, min_size=min_size),
        slicing=SliceParams(window_hu=tuple(window_hu), size=size),
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


def pretrain(*, config: RunConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Pre-train with `config.pretrain.method` on the cached super-pixels; returns the checkpoint path.

    Validation volumes (see `data.validation_cases`) are left out of pre-training. A checkpoint
    is written after every epoch (atomically), with the config and the loss history.
    """
    import torch
    from torch.utils.data import DataLoader

    from lrc_ray.augment.two_views import TwoViewAugment
    from lrc_ray.data.superpixel_dataset import TwoViewSliceDataset
    from lrc_ray.engine.checkpoint import save_checkpoint
    from lrc_ray.engine.pretrain import LrcPretrainer, build_optimizer, pretrain_one_epoch

    out_dir = Path(out_dir)
    settings = config.pretrain
    pretrain_table, num_classes = _pretraining_table(config)
    torch.manual_seed(config.seed)
    pretrainer = LrcPretrainer(settings, config.network, seed=config.seed, num_classes=num_classes)
    dataset = TwoViewSliceDataset(
        pretrain_table, TwoViewAugment(config.augment, output_size=config.data.size), seed=config.seed,
        min_regions=settings.min_regions, with_labels=settings.uses_supervised,
    )
    if pretrainer.trains and len(dataset) < settings.batch_size:
        raise UserInputError(
            f"pretrain.batch_size: {settings.batch_size} is more than the {len(dataset)} slices to pre-train on"
        )
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, drop_last=True, generator=generator,
                        num_workers=settings.num_workers)
    logger.info("pre-training %s on %d slices, %d epochs, batch %d", settings.method, len(dataset), settings.epochs, settings.batch_size)
    save_config(config, out_dir / "config.yaml")
    history: list[dict] = []
    epochs = settings.epochs if pretrainer.trains else 0
    optimizer = build_optimizer(pretrainer, settings) if pretrainer.trains else None
    checkpoint = out_dir / "checkpoint.pt"
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        metrics = pretrain_one_epoch(pretrainer, loader, optimizer, generator=generator, epoch=epoch, progress=progress)
        history.append({"epoch": epoch, **metrics})
        logger.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        save_checkpoint(checkpoint, state_dict=pretrainer.online.state_dict(), config=config.to_dict(), epoch=epoch, history=history)
    if epochs == 0:
        save_checkpoint(checkpoint, state_dict=pretrainer.online.state_dict(), config=config.to_dict(), epoch=-1, history=[])
    return checkpoint


def finetune(
    *, config: RunConfig, checkpoint: str | Path | None = None, out_dir: str | Path | None = None, progress: bool = True
) -> dict:
    """Fine-tune at `config.finetune.label_fraction` and return per-organ and mean 3D Dice.

    Without a checkpoint the network starts from random weights (the `scratch` baseline).
    """
    from lrc_ray.engine.checkpoint import load_checkpoint
    from lrc_ray.engine.finetune import build_segmentation_model, evaluate, finetune as run_finetune
    from lrc_ray.engine.splits import label_fraction_subset

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
    model = build_segmentation_model(config.network, max(labels) + 1, pretrained_state)
    logger.info("fine-tuning from %s on %d of %d volumes", source, len(train_cases), len(split.train_pool))
    history = run_finetune(model, table, train_cases=train_cases, config=config.finetune, seed=config.seed, progress=progress)
    results = evaluate(model, table, cases=split.validation, labels=labels) | {
        "label_fraction": config.finetune.label_fraction,
        "train_cases": list(train_cases),
        "initialisation": source,
        "history": history,
    }
    if out_dir is not None:
        write_json_atomic(Path(out_dir) / "results.json", results)
    return results


def _pretraining_table(config: RunConfig):
    """Slices to pre-train on, and the number of classes when labels are used.

    Self-supervised methods use every volume of the data set except the validation ones; the
    supervised methods use the labelled volumes of `pretrain.source_data_dir`, a separate set.
    """
    source_dir = config.pretrain.source_data_dir
    if not config.pretrain.uses_supervised:
        table, _, split = _training_table(config)
        return table.filter(_not_in(table, split.validation)), None
    if Path(source_dir).resolve() == Path(config.data.data_dir).resolve():
        raise UserInputError(
            f"pretrain.source_data_dir: {source_dir} is the fine-tuning data set; supervised pre-training on it "
            "would use labels beyond the label fraction"
        )
    table, labels = _cached_slices(replace(config.data, data_dir=source_dir))
    return table, max(labels) + 1


def _cached_slices(data: DataConfig):
    """All cached slices of a data set, and its label names (kept in the entry's manifest)."""
    from lrc_ray.superpixels.cache import read_entry_table

    entry = find_superpixels(data)
    return read_entry_table(entry), {int(value): name for value, name in entry.manifest["labels"].items()}


def _training_table(config: RunConfig):
    """The cached slices of the run's data, its label names, and the validation split of its labelled volumes."""
    import pyarrow.compute as pc

    from lrc_ray.engine.splits import split_labelled_cases

    table, labels = _cached_slices(config.data)
    labelled = table.filter(pc.is_valid(table.column("label")))
    case_ids = [str(value) for value in pc.unique(labelled.column("case_id")).to_pylist()]
    split = split_labelled_cases(case_ids, validation_cases=config.data.validation_cases, seed=config.data.split_seed)
    return table, labels, split


def _not_in(table, case_ids):
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.invert(pc.is_in(table.column("case_id"), value_set=pa.array(list(case_ids), pa.string())))

