"""The super-pixel cache: keys, entries, atomic commits, on a local path or an object store
(`lrc_ray.storage`: `s3://bucket/prefix`, ...).

Layout:

    CACHE_ROOT/
      .lrc_ray_cache                 marker: this directory is a cache (we never write elsewhere)
      .file_hashes.json              memo of file content hashes, keyed by (path, size, mtime)
      <key>/                         one complete entry: part-*.parquet + manifest.json
      .tmp-<key>-<pid>-<nonce>/      an entry being built; never read, removed when stale

An entry's key is derived from the data set's content fingerprint and the extraction
parameters, so equal data and parameters hit the same entry and any change makes a new
one. An entry counts as complete only with its manifest, written last (locally by the rename
of its finished temporary directory; on object stores, which cannot rename, after its parts
are copied to the key), so an interrupted build never leaves a half entry that a later call
takes for a hit. The manifest lists the entry's parts, and readers read only those.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterator

import pyarrow.parquet as pq

from lrc_ray import __version__
from lrc_ray.data.msd import MsdDataset
from lrc_ray.data.slices import SliceParams
from lrc_ray.errors import UserInputError
from lrc_ray.storage import Location, checked_location, key_lock, location, publish_dir, retire_dir, staging_location
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
    location: Location  # the entry's directory (a local path or an object-store prefix)
    manifest: dict

    @property
    def key(self) -> str:
        return self.location.name

    @property
    def uri(self) -> str:
        return self.location.uri

    @property
    def path(self) -> Path:
        """The entry's directory on this machine (local caches only)."""
        return self.location.local_path

    @property
    def num_slices(self) -> int:
        return int(self.manifest["num_slices"])


def entry_key(data_fingerprint: str, params: ExtractionParams) -> str:
    params_json = json.dumps(params.as_dict(), sort_keys=True)
    params_hash = hashlib.blake2b(params_json.encode(), digest_size=8).hexdigest()
    return f"{data_fingerprint[:16]}-{params_hash}"


def open_cache_root(path: str | Path | Location) -> Location:
    """Create a cache root, or accept an existing one; refuse any other existing path.

    Raises:
        UserInputError: an existing file, a non-empty directory that is no cache, or (object
            stores) an unreachable endpoint, refused credentials or a missing bucket.
    """
    root = checked_location(path)
    if root.is_file():
        raise UserInputError(f"{root}: exists and is not a directory; expected a super-pixel cache directory")
    marker = root.join(CACHE_MARKER)
    if not marker.is_file() and root.listdir():
        raise UserInputError(
            f"{root}: exists and is not an lrc_ray super-pixel cache (no {CACHE_MARKER} marker); "
            "choose a new or empty directory"
        )
    root.makedirs()
    if not marker.is_file():
        marker.write_json({"format_version": FORMAT_VERSION})
    return root


def dataset_fingerprint(dataset: MsdDataset, cache_root: Location) -> str:
    """A content hash of every file of the data set (paths relative to its root, and bytes).

    File hashes are memoised in the cache root by (path, size, mtime, inode), as make and rsync
    do, so a repeated call on unchanged data reads no volume again.
    """
    memo_file = location(cache_root).join(FILE_HASHES)
    memo = memo_file.read_json() or {}
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
        memo_file.write_json(memo)
    return digest.hexdigest()


def find_entry(cache_root: Location, key: str) -> CacheEntry | None:
    """The complete entry for `key`, or None (a directory without manifest is not an entry)."""
    directory = location(cache_root).join(key)
    manifest = directory.join(MANIFEST).read_json()
    return CacheEntry(directory, manifest) if manifest is not None else None


def entry_lock(cache_root: Location, key: str) -> ContextManager[None]:
    """Hold an exclusive lock on one key, so concurrent builders of one entry build it once
    (`storage.key_lock`: flock locally, a cluster-wide lease for object stores)."""
    return key_lock(location(cache_root), key)


@contextlib.contextmanager
def staging_dir(cache_root: Location, key: str) -> Iterator[Location]:
    """A fresh temporary directory for building `key`; removed if the build does not commit.

    Call with the key's lock held: leftovers of earlier, interrupted builds of the same key
    are then known to be stale and are removed first.
    """
    root = location(cache_root)
    for stale in root.listdir():
        if stale.name.startswith(f"{TMP_PREFIX}{key}-"):
            stale.delete()
    staged = staging_location(root, f"{TMP_PREFIX}{key}-")
    try:
        yield staged
    finally:
        staged.delete()


def commit_entry(
    staged: Location, cache_root: Location, key: str, manifest: dict, *, expected_slices: int, overwrite: bool
) -> CacheEntry:
    """Check a finished staging directory, write its manifest and publish it under `key` (the
    manifest last: `storage.publish_dir`)."""
    staged, root = location(staged), location(cache_root)
    manifest = {**manifest, "key": key, "format_version": FORMAT_VERSION, "lrc_ray_version": __version__}
    parts = [part for part in staged.listdir() if part.name.endswith(".parquet")]
    manifest["parts"] = [part.name for part in parts]
    manifest["num_slices"] = sum(_parquet_metadata(part).num_rows for part in parts)
    manifest["bytes"] = sum(staged.filesystem.get_file_info(part.path).size for part in parts)
    if manifest["num_slices"] != expected_slices:
        raise RuntimeError(f"{staged}: wrote {manifest['num_slices']} slices, expected {expected_slices}")
    staged.join(MANIFEST).write_json(manifest)
    final = root.join(key)
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"{final}: entry already exists")
        # Retire the old entry first (its manifest first) so the key is never half old, half new.
        retire_dir(final, last=MANIFEST)
    publish_dir(staged, final, last=MANIFEST)
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
    return read_parquet_dir(entry.location, columns, parts=entry.manifest.get("parts"))


def read_parquet_dir(directory: str | Path | Location, columns: list[str] | None = None, *,
                     parts: list[str] | None = None):
    """All rows of a directory of slice Parquet files (a path or URI; only the files `parts` names,
    when given), sorted by (case_id, slice_index)."""
    place = location(directory)
    names = parts if parts is not None else [child.name for child in place.listdir() if child.name.endswith(".parquet")]
    if columns is not None:
        columns = list(dict.fromkeys(["case_id", "slice_index", *columns]))
    table = pq.read_table([place.join(name).path for name in sorted(names)], columns=columns,
                          filesystem=place.filesystem)
    return table.sort_by([("case_id", "ascending"), ("slice_index", "ascending")])


def _parquet_metadata(part: Location):
    with part.filesystem.open_input_file(part.path) as handle:
        return pq.ParquetFile(handle).metadata


def _file_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()



