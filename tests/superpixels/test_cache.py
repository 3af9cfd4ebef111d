import numpy as np
import pyarrow as pa
import pytest

from lrc_ray.data.msd import load_msd_dataset
from lrc_ray.data.slices import SliceParams
from lrc_ray.errors import UserInputError
from lrc_ray.superpixels.cache import (
    CACHE_MARKER,
    ExtractionParams,
    commit_entry,
    dataset_fingerprint,
    entry_key,
    find_entry,
    open_cache_root,
    staging_dir,
)
from lrc_ray.superpixels.felzenszwalb import FelzenszwalbParams


def _params(**kwargs) -> ExtractionParams:
    slicing = {k: kwargs.pop(k) for k in ("window_hu", "size") if k in kwargs}
    return ExtractionParams(felzenszwalb=FelzenszwalbParams(**kwargs), slicing=SliceParams(**slicing))


def test_key_is_stable_and_changes_with_every_parameter():
    base = entry_key("f" * 32, _params())
    assert base == entry_key("f" * 32, _params())
    variants = [_params(scale=200), _params(sigma=0.5), _params(min_size=21), _params(size=64), _params(window_hu=(-100, 200))]
    keys = {entry_key("f" * 32, params) for params in variants}
    assert base not in keys and len(keys) == len(variants)
    assert entry_key("e" * 32, _params()) != base, "other data, other key"


def test_fingerprint_follows_content_not_timestamps(dataset_copy, tmp_path):
    root = open_cache_root(tmp_path / "cache").local_path
    dataset = load_msd_dataset(dataset_copy)
    first = dataset_fingerprint(dataset, root)
    assert first == dataset_fingerprint(dataset, root)
    image = dataset.cases[0].image_path
    image.touch()  # new mtime, same bytes: the memo misses but the hash is equal
    assert dataset_fingerprint(dataset, root) == first
    image.write_bytes(image.read_bytes() + b"\x00")
    assert dataset_fingerprint(dataset, root) != first


def test_cache_root_accepts_new_empty_or_marked_directories(tmp_path):
    assert (open_cache_root(tmp_path / "new") / CACHE_MARKER).is_file()
    (tmp_path / "empty").mkdir()
    open_cache_root(tmp_path / "empty")
    open_cache_root(tmp_path / "new")  # reopening an existing cache


def test_cache_root_refuses_other_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserInputError, match=r"file: exists and is not a directory"):
        open_cache_root(tmp_path / "file")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "important.csv").write_text("x")
    with pytest.raises(UserInputError, match=r"results: exists and is not an lrc_ray super-pixel cache"):
        open_cache_root(tmp_path / "results")
    assert (tmp_path / "results" / "important.csv").read_text() == "x", "nothing touched"


def _write_part(directory, rows: int) -> None:
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"case_id": ["a"] * rows, "slice_index": np.arange(rows, dtype=np.int32)}), directory / "part-0.parquet")


def test_entry_appears_only_when_committed(tmp_path):
    root = open_cache_root(tmp_path / "cache").local_path
    with staging_dir(root, "k1") as staged:
        _write_part(staged, 3)
        assert find_entry(root, "k1") is None, "a staging directory is no entry"
        entry = commit_entry(staged, root, "k1", {"x": 1}, expected_slices=3, overwrite=False)
    assert find_entry(root, "k1").manifest["num_slices"] == 3 == entry.num_slices
    assert not list(root.glob(".tmp-*"))


def test_failed_build_leaves_nothing(tmp_path):
    root = open_cache_root(tmp_path / "cache").local_path
    with pytest.raises(RuntimeError, match="wrote 2 slices, expected 5"):
        with staging_dir(root, "k2") as staged:
            _write_part(staged, 2)
            commit_entry(staged, root, "k2", {}, expected_slices=5, overwrite=False)
    assert find_entry(root, "k2") is None
    assert not (root / "k2").exists() and not list(root.glob(".tmp-*"))


def test_stale_staging_directories_are_removed_by_the_next_build(tmp_path):
    root = open_cache_root(tmp_path / "cache").local_path
    stale = root / ".tmp-k3-999999-deadbeef"
    stale.mkdir()
    (stale / "part-0.parquet").write_bytes(b"half written")
    with staging_dir(root, "k3"):
        assert not stale.exists()


def test_overwrite_replaces_an_entry(tmp_path):
    root = open_cache_root(tmp_path / "cache").local_path
    for rows in (2, 4):
        with staging_dir(root, "k4") as staged:
            _write_part(staged, rows)
            commit_entry(staged, root, "k4", {}, expected_slices=rows, overwrite=True)
    assert find_entry(root, "k4").num_slices == 4
    assert not list(root.glob(".tmp-*"))
