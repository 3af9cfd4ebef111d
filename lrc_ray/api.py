"""The Python API: keyword-only functions that the `lrc-ray` command line calls."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lrc_ray.data.msd import check_headers, load_msd_dataset
from lrc_ray.data.slices import DEFAULT_WINDOW_HU, SliceParams
from lrc_ray.errors import UserInputError
from lrc_ray.superpixels.cache import (
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
    params = ExtractionParams(
        felzenszwalb=FelzenszwalbParams(scale=scale, sigma=sigma, min_size=min_size),
        slicing=SliceParams(window_hu=tuple(window_hu), size=size),
    )
    if workers is not None and workers < 1:
        raise UserInputError(f"--workers: expected at least 1, got {workers}")
    dataset = load_msd_dataset(data)
    expected_slices = check_headers(dataset)
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
                expected_slices=expected_slices,
            )
            manifest = build_manifest(dataset, fingerprint, params, time.perf_counter() - started)
            entry = commit_entry(
                staged, root, key, manifest, expected_slices=expected_slices, overwrite=overwrite
            )
    logger.info("built %s (%d slices) in %.1f s", entry.path, entry.num_slices, entry.manifest["build_seconds"])
    return SuperpixelResult(entry=entry, cache_hit=False)


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
