"""`lrc_ray.storage` and the super-pixel cache on a real S3 server (SeaweedFS, started by the
`s3_server` fixture) and on local paths: every write is read back and compared, since a store
that silently alters objects (checksum framing kept inside them) must fail here, not a user."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lrc_ray.errors import UserInputError
from lrc_ray.storage import (
    checked_location, key_lock, local_input, local_output, location, publish_dir, retire_dir, staging_location,
)
from lrc_ray.superpixels.cache import (
    CACHE_MARKER, MANIFEST, commit_entry, find_entry, open_cache_root, read_entry_table, staging_dir,
)


@pytest.fixture
def s3_root(s3_server, request):
    """A fresh prefix of the test bucket per test."""
    import re

    return checked_location(s3_server.uri(f"tests/{re.sub(r'[^A-Za-z0-9_-]', '-', request.node.name)}-{os.getpid()}"))


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """The same test on a local directory and on an S3 prefix."""
    if request.param == "local":
        return location(tmp_path / "root")
    return request.getfixturevalue("s3_root")


def test_paths_and_uris_name_locations(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    assert location("rel/dir") == location(tmp_path / "rel" / "dir") and location("rel/dir").is_local
    assert location(f"file://{tmp_path}/x").local_path == tmp_path / "x"
    remote = location("s3://bucket/sweeps?endpoint_override=127.0.0.1:9&scheme=http")
    assert not remote.is_local and remote.path == "bucket/sweeps"
    child = remote.join("tiny", "lrc_ray_sweep.json")
    assert child.uri == "s3://bucket/sweeps/tiny/lrc_ray_sweep.json?endpoint_override=127.0.0.1:9&scheme=http"
    assert child.path == "bucket/sweeps/tiny/lrc_ray_sweep.json" and child.name == "lrc_ray_sweep.json"
    assert child.parent.parent == remote
    with pytest.raises(UserInputError, match=r"^s3:/bucket/x: looks like a URI whose '//' was lost"):
        location(Path("s3://bucket/x"))  # what argparse's type=Path made of a URI: never a local folder


@pytest.mark.parametrize("size", [0, 5, 1 << 20, (5 << 20) + 3])  # empty, tiny, 1 MiB, past a multipart chunk
def test_bytes_written_are_the_bytes_read_back(s3_root, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    place = s3_root.join("blob.bin")
    place.write_bytes(data)
    assert place.read_bytes() == data
    assert place.filesystem.get_file_info(place.path).size == size, "the store keeps exactly what was written"


def test_files_go_up_and_down_whole(root, tmp_path):
    place = root.join("sub", "file.txt")
    with local_output(place) as tmp:
        tmp.write_text("written locally, published whole")
    assert place.read_text() == "written locally, published whole"
    with local_input(place) as local:
        assert local.read_text() == "written locally, published whole"
    with pytest.raises(RuntimeError):
        with local_output(root.join("failed.txt")) as tmp:
            tmp.write_text("half")
            raise RuntimeError("the writer failed")
    assert not root.join("failed.txt").exists(), "nothing published when the writer fails"
    assert [child.name for child in root.listdir()] == ["sub"]


def test_a_directory_is_published_with_its_manifest_last(root):
    staged = staging_location(root, ".tmp-entry-")
    staged.join("part-0.bin").write_bytes(b"part zero")
    staged.join(MANIFEST).write_json({"parts": ["part-0.bin"]})
    final = root.join("entry")
    publish_dir(staged, final, last=MANIFEST)
    assert final.join("part-0.bin").read_bytes() == b"part zero"
    assert final.join(MANIFEST).read_json() == {"parts": ["part-0.bin"]}
    assert not staged.exists(), "the staging directory is gone"
    retire_dir(final, last=MANIFEST)
    assert not final.exists()


def _write_part(staged, rows: int) -> pa.Table:
    table = pa.table({"case_id": ["a"] * rows, "slice_index": np.arange(rows, dtype=np.int32)[::-1].copy()})
    pq.write_table(table, staged.join("part-0.parquet").path, filesystem=staged.filesystem)
    return table


def test_a_cache_entry_on_s3_appears_only_with_its_manifest_and_reads_back(s3_root):
    cache = open_cache_root(s3_root.join("cache"))
    assert cache.join(CACHE_MARKER).is_file()
    with staging_dir(cache, "k1") as staged:
        written = _write_part(staged, 3)
        assert find_entry(cache, "k1") is None, "a staging prefix is no entry"
        entry = commit_entry(staged, cache, "k1", {"x": 1}, expected_slices=3, overwrite=False)
    found = find_entry(cache, "k1")
    assert found.manifest == entry.manifest and found.manifest["parts"] == ["part-0.parquet"]
    assert read_entry_table(found).equals(written.sort_by("slice_index"))
    assert [child.name for child in cache.listdir() if child.name.startswith(".tmp-")] == []

    # A half-copied entry (parts, no manifest), as a killed publisher leaves it: no entry.
    cache.join("k2", "part-0.parquet").write_bytes(b"half")
    assert find_entry(cache, "k2") is None

    # Overwrite: the old entry retired (its manifest first), the new one published.
    with staging_dir(cache, "k1") as staged:
        _write_part(staged, 5)
        commit_entry(staged, cache, "k1", {}, expected_slices=5, overwrite=True)
    assert find_entry(cache, "k1").num_slices == 5 == read_entry_table(find_entry(cache, "k1")).num_rows


def test_stale_staging_prefixes_on_s3_are_removed_by_the_next_build(s3_root):
    cache = open_cache_root(s3_root.join("cache"))
    stale = cache.join(".tmp-k3-999999-deadbeef")
    stale.join("part-0.parquet").write_bytes(b"half written")
    with staging_dir(cache, "k3"):
        assert not stale.exists()


def test_a_cache_root_on_s3_that_is_no_cache_is_refused(s3_root):
    s3_root.join("results", "important.csv").write_bytes(b"x")
    with pytest.raises(UserInputError, match=r"results\?endpoint_override=.*is not an lrc_ray super-pixel cache"):
        open_cache_root(s3_root.join("results"))
    assert s3_root.join("results", "important.csv").read_bytes() == b"x", "nothing touched"


def test_an_object_store_key_lock_without_ray_holds_within_the_process(s3_root):
    import threading

    inside, overlaps = [], []

    def hold():
        with key_lock(s3_root, "k"):
            overlaps.append(len(inside))
            inside.append(1)
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == [0, 0, 0]


# --- bad input: one line naming the URI and the cause --------------------------------------------


def _results(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lrc_ray.cli", "results", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def _one_line_error(completed: subprocess.CompletedProcess, *needles: str) -> None:
    assert completed.returncode == 2, completed.stderr[-2000:]
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrc-ray: error: "), completed.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_an_unknown_uri_scheme_is_one_line():
    _one_line_error(_results("foo://bucket/sweep"), "foo://bucket/sweep", "unknown URI scheme 'foo://'")


def test_an_unreachable_endpoint_is_reported_within_bounded_time():
    started = time.monotonic()
    closed = f"127.0.0.1:{_closed_port()}"
    completed = _results(f"s3://bucket/sweep?endpoint_override={closed}&scheme=http",
                         env={"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_EC2_METADATA_DISABLED": "true"})
    _one_line_error(completed, f"s3://bucket/sweep?endpoint_override={closed}", "unreachable", closed)
    assert time.monotonic() - started < 60


def test_missing_credentials_are_named(s3_server, tmp_path):
    env = {name: "" for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN")}
    env |= {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "HOME": str(tmp_path), "AWS_EC2_METADATA_DISABLED": "true"}
    completed = _results(s3_server.uri("sweeps/x"), env=env)
    _one_line_error(completed, s3_server.uri("sweeps/x"), "no credentials found")


def test_a_bucket_that_does_not_exist_is_named(s3_server):
    _one_line_error(_results(s3_server.uri("sweeps/x", bucket="no-such-bucket")), "the bucket 'no-such-bucket' does not exist")


def test_results_of_an_s3_prefix_without_a_sweep_is_one_line(s3_server):
    _one_line_error(_results(s3_server.uri("sweeps/none")), "no such sweep directory")


def test_resume_on_an_s3_prefix_without_a_sweep_is_one_line(s3_server, tmp_path, tiny_sweep_space):
    import yaml

    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(tiny_sweep_space(space={"pretrain.method": {"choice": ["scratch"]}})))
    completed = subprocess.run(
        [sys.executable, "-m", "lrc_ray.cli", "tune", str(space), "--storage", s3_server.uri("sweeps"), "--resume"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    _one_line_error(completed, "--resume: no sweep to resume at", s3_server.uri("sweeps/tiny"))


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.ray
def test_superpixels_built_on_s3_by_ray_data_are_read_back_and_hit(s3_server, tiny_dataset, tmp_path):
    """`lrc-ray superpixels --out s3://...`: Ray Data writes the Parquet parts to S3, the manifest
    last; a second run is a cache hit; the rows read back are the slices, whole."""
    from lrc_ray.superpixels.cache import find_entry
    from lrc_ray.superpixels.table import SLICE_SCHEMA, decode_row

    cache = s3_server.uri("pipeline/cache")
    args = [sys.executable, "-m", "lrc_ray.cli", "superpixels", "--data", str(tiny_dataset), "--out", cache,
            "--workers", "1", "--scale", "100", "--sigma", "0.5", "--min-size", "10"]
    built = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    first_line = built.stdout.splitlines()[0]
    assert first_line.startswith("built: s3://lrc-test/pipeline/cache/"), built.stdout
    key = first_line.split("/pipeline/cache/", 1)[1].split("?", 1)[0]
    entry = find_entry(location(cache), key)
    table = read_entry_table(entry)
    assert table.num_rows == entry.num_slices == 18 and table.schema.equals(SLICE_SCHEMA)
    assert all(decode_row(table, row).image.shape == (48, 48) for row in range(table.num_rows))
    again = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.startswith(f"cache hit: {entry.uri}"), again.stdout + again.stderr[-2000:]
