"""The super-pixel cache on disk: keys, entries, atomic commits.

Layout:

    CACHE_ROOT/
      .lrc_ray_cache                 marker: this directory is a cache (we never write elsewhere)
      .file_hashes.json              memo of file content hashes, keyed by (path, size, mtime)
      <key>/                         one complete entry: part-*.parquet + manifest.json
      .tmp-<key>-<pid>-<nonce>/      an entry being built; never read, removed when stale

An entry's key is derived from the data set's content fingerprint and the extraction
parameters, so equal data and parameters hit the same entry and any change makes a new
one. An entry becomes visible only by the rename of its finished temporary directory,
and it counts as complete only with its manifest (written last), so an interrupted build
never leaves a half entry that a later call takes for a hit.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from lrc_ray import __version__
from lrc_ray.atomic import write_json_atomic
from lrc_ray.data.msd import MsdDataset
from lrc_ray.data.slices import SliceParams
from lrc_ray.errors import UserInputError
from lrc_ray.superpixels.felzenszwalb import FelzenszwalbParams

CACHE_MARKER = ".lrc_ray_cache"
FILE_HASHES = ".file_hashes.json"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 2  # 2: slices resampled to one spacing, then cropped or padded (was: resized)
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ExtractionParams:
    """Everything that changes the content of a cache entry (besides the data)."""

    felzenszwalb: FelzenszwalbParams
    slicing: SliceParams

    def as_dict(self) -> dict:
        return {
            "scale": float(self.felzenszwalb.scale),
            "sigma": float(self.felzenszwalb.sigma),
            "min_size": int(self.felzenszwalb.min_size),
            "window_hu": [float(v) for v in self.slicing.window_hu],
            "size": self.slicing.size,
            # Resolved, so an explicit spacing equal to the size's default shares the entry.
            "spacing_mm": self.slicing.working_spacing_mm,
            "format_version": FORMAT_VERSION,
        }


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    manifest: dict

    @property
    def num_slices(self) -> int:
        return int(self.manifest["num_slices"])


def entry_key(data_fingerprint: str, params: ExtractionParams) -> str:
    params_json = json.dumps(params.as_dict(), sort_keys=True)
    params_hash = hashlib.blake2b(params_json.encode(), digest_size=8).hexdigest()
    return f"{data_fingerprint[:16]}-{params_hash}"


def open_cache_root(path: str | Path) -> Path:
    """Create a cache root, or accept an existing one; refuse any other existing path."""
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise UserInputError(f"{root}: exists and is not a directory; expected a super-pixel cache directory")
    if root.is_dir() and not (root / CACHE_MARKER).is_file():
        if any(root.iterdir()):
            raise UserInputError(
                f"{root}: exists and is not an lrc_ray super-pixel cache (no {CACHE_MARKER} marker); "
                "choose a new or empty directory"
            )
    root.mkdir(parents=True, exist_ok=True)
    marker = root / CACHE_MARKER
    if not marker.is_file():
        write_json_atomic(marker, {"format_version": FORMAT_VERSION})
    return root


def dataset_fingerprint(dataset: MsdDataset, cache_root: Path) -> str:
    """A content hash of every file of the data set (paths relative to its root, and bytes).

    File hashes are memoised in the cache root by (path, size, mtime, inode), as make and rsync
    do, so a repeated call on unchanged data reads no volume again.
    """
    memo_path = cache_root / FILE_HASHES
    memo = _read_json(memo_path) or {}
    digest = hashlib.blake2b(digest_size=16)
    changed = False
    for path in dataset.files:
        stat = path.stat()
        memo_key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
        if memo_key not in memo:
            memo[memo_key] = _file_hash(path)
            changed = True
        digest.update(os.path.relpath(path, dataset.root).encode())
        digest.update(memo[memo_key].encode())
    if changed:
        write_json_atomic(memo_path, memo)
    return digest.hexdigest()


def find_entry(cache_root: Path, key: str) -> CacheEntry | None:
    """The complete entry for `key`, or None (a directory without manifest is not an entry)."""
    manifest = _read_json(cache_root / key / MANIFEST)
    return CacheEntry(cache_root / key, manifest) if manifest is not None else None


@contextlib.contextmanager
def entry_lock(cache_root: Path, key: str) -> Iterator[None]:
    """Hold an exclusive lock on one key, so concurrent builders of one entry build it once."""
    with open(cache_root / f".{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def staging_dir(cache_root: Path, key: str) -> Iterator[Path]:
    """A fresh temporary directory for building `key`; removed if the build does not commit.

    Call with the key's lock held: leftovers of earlier, interrupted builds of the same key
    are then known to be stale and are removed first.
    """
    for stale in cache_root.glob(f"{TMP_PREFIX}{key}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    path = cache_root / f"{TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def commit_entry(
    staged: Path, cache_root: Path, key: str, manifest: dict, *, expected_slices: int, overwrite: bool
) -> CacheEntry:
    """Check a finished staging directory, write its manifest and move it into place."""
    manifest = {**manifest, "key": key, "format_version": FORMAT_VERSION, "lrc_ray_version": __version__}
    parts = sorted(staged.glob("*.parquet"))
    manifest["num_slices"] = sum(pq.ParquetFile(part).metadata.num_rows for part in parts)
    manifest["bytes"] = sum(part.stat().st_size for part in parts)
    if manifest["num_slices"] != expected_slices:
        raise RuntimeError(f"{staged}: wrote {manifest['num_slices']} slices, expected {expected_slices}")
    write_json_atomic(staged / MANIFEST, manifest)
    final = cache_root / key
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"{final}: entry already exists")
        # Move the old entry aside first so the key is never half old, half new.
        retired = cache_root / f"{TMP_PREFIX}{key}-retired-{uuid.uuid4().hex[:8]}"
        os.rename(final, retired)
        os.rename(staged, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staged, final)
    return CacheEntry(final, manifest)


def build_manifest(dataset: MsdDataset, fingerprint: str, params: ExtractionParams, seconds: float) -> dict:
    return {
        "data_dir": str(dataset.root.resolve()),
        "dataset_name": dataset.name,
        "data_fingerprint": fingerprint,
        "labels": {str(k): v for k, v in dataset.labels.items()},
        "params": params.as_dict(),
        "num_cases": len(dataset.cases),
        "num_labelled_cases": len(dataset.labelled_cases),
        "build_seconds": round(seconds, 3),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def read_entry_table(entry: CacheEntry, columns: list[str] | None = None):
    """All rows of an entry as one pyarrow Table, sorted by (case_id, slice_index)."""
    return read_parquet_dir(entry.path, columns)


def read_parquet_dir(path: Path, columns: list[str] | None = None):
    """All rows of a directory of slice Parquet files, sorted by (case_id, slice_index)."""
    parts = [str(part) for part in sorted(Path(path).glob("*.parquet"))]
    if columns is not None:
        columns = list(dict.fromkeys(["case_id", "slice_index", *columns]))
    table = pq.read_table(parts, columns=columns)
    return table.sort_by([("case_id", "ascending"), ("slice_index", "ascending")])


def _file_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None

