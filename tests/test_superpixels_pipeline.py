"""The Ray Data super-pixel pipeline end to end on a local 2-CPU Ray (integration)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lrc_ray import api
from lrc_ray.data.nifti import read_volume, write_volume
from lrc_ray.errors import DataValidationError
from lrc_ray.superpixels.cache import read_entry_table
from lrc_ray.superpixels.felzenszwalb import FelzenszwalbParams, count_regions, superpixels_for_slice
from lrc_ray.superpixels.table import SLICE_SCHEMA, decode_row

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def built(local_ray, tiny_dataset, tmp_path_factory):
    cache_root = tmp_path_factory.mktemp("cache")
    return api.build_superpixels(data=tiny_dataset, cache_root=cache_root, scale=100, sigma=0.5, min_size=10)


def test_entry_has_one_row_per_slice_in_the_documented_format(built):
    assert not built.cache_hit
    table = read_entry_table(built.entry)
    assert table.num_rows == built.entry.num_slices == 3 * 6
    assert table.schema.equals(SLICE_SCHEMA)
    assert sorted(set(table.column("case_id").to_pylist())) == ["case_000", "case_001", "unlabeled_000"]
    unlabelled = [decode_row(table, i) for i in range(table.num_rows) if table.column("case_id")[i].as_py() == "unlabeled_000"]
    assert all(record.label is None for record in unlabelled)
    assert set(table.column("scale").to_pylist()) == {100.0}


def test_stored_superpixels_equal_the_per_slice_function(built):
    table = read_entry_table(built.entry)
    params = FelzenszwalbParams(scale=100, sigma=0.5, min_size=10)
    for row in range(0, table.num_rows, 5):
        record = decode_row(table, row)
        assert record.image.shape == (48, 48)
        expected = superpixels_for_slice(record.image, record.body_mask, params)
        np.testing.assert_array_equal(record.superpixels, expected)
        assert table.column("n_regions")[row].as_py() == count_regions(expected)
        assert (record.superpixels[~record.body_mask] == -1).mean() > 0.9


def test_files_are_plain_parquet_for_other_readers(built):
    frame = pq.read_table(sorted(built.entry.path.glob("*.parquet"))[0]).to_pandas()
    row = frame.iloc[0]
    assert len(row["image"]) == row["height"] * row["width"]


def test_second_call_is_a_cache_hit(built, tiny_dataset):
    parts_before = {p: p.stat().st_mtime_ns for p in built.entry.path.glob("*.parquet")}
    started = time.perf_counter()
    again = api.build_superpixels(data=tiny_dataset, cache_root=built.entry.path.parent, scale=100, sigma=0.5, min_size=10)
    assert again.cache_hit and again.entry.path == built.entry.path
    assert time.perf_counter() - started < 5
    assert {p: p.stat().st_mtime_ns for p in again.entry.path.glob("*.parquet")} == parts_before


def test_other_scale_makes_a_new_entry_with_fewer_regions(built, tiny_dataset):
    coarse = api.build_superpixels(data=tiny_dataset, cache_root=built.entry.path.parent, scale=1000, sigma=0.5, min_size=10)
    assert not coarse.cache_hit and coarse.entry.path != built.entry.path
    mean_regions = lambda entry: np.mean(read_entry_table(entry, ["n_regions"]).column("n_regions").to_numpy())
    assert mean_regions(coarse.entry) < mean_regions(built.entry)


def test_working_size_resamples_then_crops_or_pads(local_ray, tiny_dataset, tmp_path):
    result = api.build_superpixels(data=tiny_dataset, cache_root=tmp_path / "cache", size=32)
    table = read_entry_table(result.entry)
    record = decode_row(table, 0)
    assert record.image.shape == record.superpixels.shape == record.label.shape == (32, 32)
    assert set(table.column("spacing_mm").to_pylist()) == {400 / 32}, "32 px over a 400 mm field"
    assert result.entry.manifest["params"]["spacing_mm"] == 12.5
    # The same spacing given explicitly is the same entry; another spacing is another one.
    assert api.build_superpixels(data=tiny_dataset, cache_root=tmp_path / "cache", size=32, spacing_mm=12.5).cache_hit
    finer = api.build_superpixels(data=tiny_dataset, cache_root=tmp_path / "cache", size=32, spacing_mm=10.0)
    assert not finer.cache_hit


def test_nnunet_layout_and_datalist_give_the_same_slices(local_ray, built, tiny_dataset, tmp_path, as_nnunet,
                                                         as_datalist):
    """int32 images (nnU-Net v2 layout) and float64 images (a MONAI datalist) read as the MSD original."""
    reference = read_entry_table(built.entry)
    params = dict(cache_root=tmp_path / "cache", scale=100, sigma=0.5, min_size=10)
    nnunet = api.build_superpixels(data=as_nnunet(tiny_dataset, tmp_path / "nn"), **params)
    datalist = api.build_superpixels(data=None, datalist=as_datalist(tiny_dataset, tmp_path / "btcv"), key="validation",
                                     **params)
    for result, cases in ((nnunet, ["case_000", "case_001"]), (datalist, ["case_001"])):
        table = read_entry_table(result.entry)
        assert sorted(set(table.column("case_id").to_pylist())) == cases
        for case in cases:
            ours = table.filter(pc.equal(table.column("case_id"), case))
            theirs = reference.filter(pc.equal(reference.column("case_id"), case))
            for name in ("image", "label", "superpixels"):
                assert ours.column(name).equals(theirs.column(name)), (case, name)


def _assert_no_entry(cache_root: Path) -> None:
    assert [p.name for p in cache_root.iterdir() if not p.name.startswith(".")] == []
    assert not list(cache_root.glob(".tmp-*")), "the staging directory was removed"


def test_corrupt_volume_fails_cleanly(local_ray, dataset_copy, tmp_path):
    image = dataset_copy / "imagesTr" / "case_001.nii.gz"
    image.write_bytes(image.read_bytes()[:3000])
    with pytest.raises(DataValidationError, match=r"case_001.nii.gz: corrupt or truncated NIfTI data") as info:
        api.build_superpixels(data=dataset_copy, cache_root=tmp_path / "cache")
    assert "\n" not in str(info.value)
    _assert_no_entry(tmp_path / "cache")


def test_nan_voxels_fail_cleanly(local_ray, dataset_copy, tmp_path):
    path = dataset_copy / "imagesUnlabeled" / "unlabeled_000.nii.gz"
    volume = read_volume(path)
    damaged = volume.array.copy()
    damaged[2, 10, 10] = np.nan
    write_volume(path, damaged, volume.spacing_mm)
    with pytest.raises(DataValidationError, match=r"unlabeled_000.nii.gz: 1 voxels are NaN or infinite"):
        api.build_superpixels(data=dataset_copy, cache_root=tmp_path / "cache")
    _assert_no_entry(tmp_path / "cache")


def test_label_values_outside_the_map_fail_cleanly(local_ray, dataset_copy, tmp_path):
    path = dataset_copy / "labelsTr" / "case_000.nii.gz"
    label = read_volume(path, dtype=np.uint8)
    damaged = label.array.copy()
    damaged[0, 0, 0] = 200
    write_volume(path, damaged, label.spacing_mm)
    with pytest.raises(DataValidationError, match=r"case_000.nii.gz: label values \{200\}"):
        api.build_superpixels(data=dataset_copy, cache_root=tmp_path / "cache")
    _assert_no_entry(tmp_path / "cache")


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lrc_ray.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs,
    )


def test_cli_prints_one_line_for_a_corrupt_volume(dataset_copy, tmp_path):
    image = dataset_copy / "imagesTr" / "case_000.nii.gz"
    image.write_bytes(image.read_bytes()[:3000])
    process = _cli("superpixels", "--data", str(dataset_copy), "--out", str(tmp_path / "cache"), "--workers", "1")
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 2
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("lrc-ray: error:")]
    assert errors == [f"lrc-ray: error: {image}: corrupt or truncated NIfTI data "
                      "(Compressed file ended before the end-of-stream marker was reached)"]


def test_killed_run_leaves_no_entry_and_the_rerun_completes(tmp_path):
    """SIGKILL mid-build (the driver and its Ray): no half entry; the next run builds it whole."""
    from lrc_ray.data.phantom import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", cases=3, unlabeled=0, size=128, slices=16, seed=1)
    cache_root = tmp_path / "cache"
    args = ("superpixels", "--data", str(data), "--out", str(cache_root), "--workers", "1", "--min-size", "5", "--scale", "20")
    process = _cli(*args)
    # Kill once the pipeline runs: Ray is up and the staging directory exists.
    for line in process.stderr:
        if "started a local Ray instance" in line:
            break
    time.sleep(1.5)
    assert process.poll() is None, "the build finished before it could be interrupted"
    assert list(cache_root.glob(".tmp-*"))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert [p.name for p in cache_root.iterdir() if not p.name.startswith(".")] == [], "no entry after a kill"
    assert list(cache_root.glob(".tmp-*")), "the interrupted staging directory is still there, and ignored"

    rerun = _cli(*args)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert stdout.startswith("built: ")
    assert not list(cache_root.glob(".tmp-*")), "the stale staging directory was cleaned"
    entry_dirs = [p for p in cache_root.iterdir() if not p.name.startswith(".")]
    assert len(entry_dirs) == 1 and (entry_dirs[0] / "manifest.json").is_file()
    assert pq.read_table(sorted(str(p) for p in entry_dirs[0].glob("*.parquet"))).num_rows == 3 * 16
