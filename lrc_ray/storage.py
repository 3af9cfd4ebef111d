"""Where lrc_ray keeps what it shares: a local path or any URI `pyarrow.fs.FileSystem.from_uri`
reads (`s3://bucket/prefix?endpoint_override=host:port&scheme=http`, `gs://...`, `file://...`).

A `Location` is a file system and a path in it, plus the URI that names it (what a user typed,
and what another process re-opens). Everything that is stored or shared (the super-pixel cache,
a sweep's storage, its stage outputs, results) goes through it, so a path and a URI are one code.

Object stores have no rename and no `flock`:
- a single object is published whole by its PUT, so `write_bytes` writes it in place; a local
  file is written under a temporary name and renamed (`lrc_ray.atomic`);
- a directory (a cache entry) is written under a temporary prefix, copied to its key, and its
  manifest written last (`publish_dir`): readers trust only entries with a manifest;
- `key_lock` uses `flock` on local paths and, for object stores, the lock factory the Ray layer
  installs (a named Ray actor: `distributed.locks`); outside Ray, a lock within this process.

The endpoint of an S3 URI comes from its query or from the standard AWS variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...), as in pyarrow.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import pyarrow.fs as pafs

from lrc_ray.atomic import atomic_write_path
from lrc_ray.errors import UserInputError

# Bounded waits: an unreachable endpoint is reported in seconds, not after the SDK's minutes.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
S3_ATTEMPTS = 3
# pyarrow >= 20 sends request checksums by default; SeaweedFS 4.48 then stored the chunk framing
# inside the object (a 5-byte write read back as 54 bytes). Checksums only where an API needs them.
_LOST_SLASH = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/[^/]")
_CHECKSUM_ENV = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}


@dataclass(frozen=True)
class Location:
    """A file or directory: `path` in `filesystem`, named by `uri` (plain paths are absolute)."""

    uri: str
    filesystem: pafs.FileSystem
    path: str

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:  # only local locations are paths on this machine
        return str(self.local_path)

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self.uri}: not a local path")
        return Path(self.path)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Location":
        head = self.path.rstrip("/").rsplit("/", 1)[0]
        base, query = _split_query(self.uri)
        return Location(base.rstrip("/").rsplit("/", 1)[0] + query, self.filesystem, head)

    def join(self, *parts: str) -> "Location":
        tail = "/".join(str(part).strip("/") for part in parts)
        base, query = _split_query(self.uri)
        return Location(f"{base.rstrip('/')}/{tail}{query}", self.filesystem, f"{self.path.rstrip('/')}/{tail}")

    __truediv__ = join

    def _info(self) -> pafs.FileInfo:
        return _call(self, lambda: self.filesystem.get_file_info(self.path))

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A directory, or (object stores) a prefix that holds objects."""
        return self._info().type == pafs.FileType.Directory

    def listdir(self) -> list["Location"]:
        """The direct children (none when the directory does not exist)."""
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        infos = _call(self, lambda: self.filesystem.get_file_info(selector))
        return sorted((self.join(info.base_name) for info in infos), key=lambda child: child.path)

    def read_bytes(self) -> bytes:
        with _call(self, lambda: self.filesystem.open_input_stream(self.path)) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self) -> dict | None:
        """The JSON object stored here, or None when there is none (or it is damaged)."""
        try:
            return json.loads(self.read_bytes())
        except (FileNotFoundError, ValueError):
            return None

    def write_bytes(self, data: bytes) -> None:
        """Publish `data` whole: readers see the old content or the new, never part of it."""
        if self.is_local:
            with atomic_write_path(self.local_path) as tmp:
                tmp.write_bytes(data)
            return
        with _call(self, lambda: self.filesystem.open_output_stream(self.path)) as stream:
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_json(self, payload: object) -> None:
        self.write_text(json.dumps(payload, indent=2) + "\n")

    def makedirs(self) -> None:
        """Create the directory (object stores: nothing to do, prefixes exist with their objects)."""
        if self.is_local:
            self.local_path.mkdir(parents=True, exist_ok=True)

    def delete(self) -> None:
        """Remove the file or directory, if there is one."""
        kind = self._info().type
        if kind == pafs.FileType.Directory:
            _call(self, lambda: self.filesystem.delete_dir(self.path))
        elif kind == pafs.FileType.File:
            _call(self, lambda: self.filesystem.delete_file(self.path))


def location(uri_or_path: str | os.PathLike | Location) -> Location:
    """The location a user's path or URI names (no network access).

    Raises:
        UserInputError: an unknown URI scheme or a malformed URI, naming it.
    """
    if isinstance(uri_or_path, Location):
        return uri_or_path
    text = os.fspath(uri_or_path)
    if _LOST_SLASH.match(text):  # pathlib.Path("s3://b/k") is "s3:/b/k": never a local folder named "s3:"
        raise UserInputError(f"{text}: looks like a URI whose '//' was lost; pass it as text, e.g. "
                             f"{text.replace(':/', '://', 1)}")
    if "://" not in text:
        path = Path(text).expanduser().resolve()
        return Location(str(path), pafs.LocalFileSystem(), str(path))
    scheme = text.split("://", 1)[0].lower()
    if scheme in ("s3", "gs", "gcs"):
        os.environ.update({name: value for name, value in _CHECKSUM_ENV.items() if name not in os.environ})
    try:
        filesystem, path = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        cause = str(exc).splitlines()[0]
        if "Unrecognized filesystem type" in cause or "not supported" in cause.lower():
            cause = f"unknown URI scheme '{scheme}://' (expected a local path, file://, s3://, gs:// or hdfs://)"
        raise UserInputError(f"{text}: {cause}") from None
    if isinstance(filesystem, pafs.S3FileSystem):
        filesystem = _bounded_s3(filesystem)
    if isinstance(filesystem, pafs.LocalFileSystem):
        return Location(path, filesystem, path)
    return Location(text, filesystem, path.rstrip("/"))


def checked_location(uri_or_path: str | os.PathLike | Location) -> Location:
    """`location`, and for an object store one request to its bucket, so that an unreachable
    endpoint, refused credentials or a missing bucket stop the command at once, in one line.

    Raises:
        UserInputError: naming the URI and the cause.
    """
    place = location(uri_or_path)
    if place.is_local:
        return place
    bucket = place.path.split("/", 1)[0]
    info = _call(place, lambda: place.filesystem.get_file_info(bucket))
    if info.type == pafs.FileType.NotFound:
        raise UserInputError(f"{place.uri}: the bucket '{bucket}' does not exist; create it first")
    return place


def storage_error(place: Location, exc: OSError) -> UserInputError:
    """One line naming the location and the cause of a failed storage request."""
    text = str(exc)
    if "ACCESS_DENIED" in text or "AccessDenied" in text or "403" in text or "INVALID_ACCESS_KEY" in text:
        has_keys = bool(os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")
                        or Path("~/.aws/credentials").expanduser().is_file())
        cause = ("access denied: the credentials were refused" if has_keys else
                 "access denied: no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
    elif "NETWORK_CONNECTION" in text or "Could not connect" in text or "Timeout" in text or "timed out" in text:
        cause = f"the endpoint is unreachable ({_endpoint(place)})"
    elif "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text or "does not exist" in text:
        cause = f"the bucket '{place.path.split('/', 1)[0]}' does not exist; create it first"
    else:
        cause = text.splitlines()[0][:300] if text else type(exc).__name__
    return UserInputError(f"{place.uri}: {cause}")


# --- directories of files: staging and publication ---------------------------------------------


def check_writable(directory: Location, option: str) -> None:
    """Write, read back and remove one small file, so a read-only place stops a command before it
    starts (UserInputError naming `option`); a store that changes what it keeps is refused too."""
    probe = directory.join(f".write-test-{os.getpid()}")
    try:
        directory.makedirs()
        probe.write_bytes(b"lrc_ray")
        if probe.read_bytes() != b"lrc_ray":  # e.g. a store that keeps checksum framing in the object
            raise UserInputError(f"{option} {directory}: a written file read back changed; the store alters what it keeps")
        probe.delete()
    except OSError as exc:
        raise UserInputError(f"{option} {directory}: not writable ({exc.strerror or exc})") from None


def staging_location(root: Location, prefix: str) -> Location:
    """A fresh temporary directory under `root` whose name starts with `prefix`."""
    place = root.join(f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    place.makedirs()
    return place


def publish_dir(staged: Location, final: Location, *, last: str) -> None:
    """Make the finished directory `staged` visible as `final`, its file `last` (the manifest) last.

    Local: one rename. Object stores have no rename: every other file is copied to `final`, then
    `last`, then `staged` is removed; readers that trust only a directory with `last` never see
    a part of it. `final` must not exist (retire an old one with `retire_dir` first).
    """
    if staged.is_local:
        os.rename(staged.local_path, final.local_path)
        return
    names = [child.name for child in staged.listdir()]
    if last not in names:
        raise ValueError(f"{staged.uri}: has no {last} to publish last")
    for name in [*(name for name in names if name != last), last]:
        _call(final, lambda name=name: staged.filesystem.copy_file(staged.join(name).path, final.join(name).path))
    staged.delete()


def retire_dir(final: Location, *, last: str) -> None:
    """Remove a published directory: its file `last` first, so readers stop trusting it at once."""
    if final.is_local:
        retired = final.parent.join(f".tmp-retired-{uuid.uuid4().hex[:8]}-{final.name}")
        os.rename(final.local_path, retired.local_path)
        final = retired
    else:
        final.join(last).delete()
    final.delete()


@contextlib.contextmanager
def local_output(place: Location) -> Iterator[Path]:
    """A local path to write a file to; published at `place` whole if the block succeeds
    (local: renamed into place; object stores: uploaded), nothing published otherwise."""
    if place.is_local:
        with atomic_write_path(place.local_path) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="lrc_ray_out_") as directory:
        tmp = Path(directory) / place.name
        yield tmp
        upload_file(tmp, place)


def upload_file(source: Path, place: Location) -> None:
    """Copy the local file `source` to `place` (published whole)."""
    _call(place, lambda: pafs.copy_files(str(source), place.path, source_filesystem=pafs.LocalFileSystem(),
                                         destination_filesystem=place.filesystem))


def upload_dir(source: Path, place: Location) -> None:
    """Copy the files of the local directory `source` (recursively) under `place`."""
    for path in sorted(Path(source).rglob("*")):
        if path.is_file():
            upload_file(path, place.join(*path.relative_to(source).parts))


@contextlib.contextmanager
def local_input(place: Location) -> Iterator[Path]:
    """A local path holding the file at `place` (downloaded for object stores) for the block."""
    if place.is_local:
        yield place.local_path
        return
    with tempfile.TemporaryDirectory(prefix="lrc_ray_in_") as directory:
        path = Path(directory) / place.name
        path.write_bytes(place.read_bytes())
        yield path


# --- locks ---------------------------------------------------------------------------------------

# A context manager holding an exclusive lock named by a string; the Ray layer installs one backed
# by a named actor (`distributed.locks.install`), shared by every process of the cluster.
LockFactory = Callable[[str], ContextManager[None]]
_remote_lock_factory: LockFactory | None = None
_process_locks: dict[str, threading.Lock] = {}
_process_locks_guard = threading.Lock()


def set_remote_lock_factory(factory: LockFactory | None) -> None:
    global _remote_lock_factory
    _remote_lock_factory = factory


@contextlib.contextmanager
def key_lock(root: Location, key: str) -> Iterator[None]:
    """Hold an exclusive lock on `key` under `root`, so concurrent builders of one output build it
    once: `flock` on a local file; for object stores (which have no locks) the installed factory,
    else a lock within this process."""
    if root.is_local:
        root.makedirs()
        with open(root.local_path / f".{key}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    name = f"{_split_query(root.uri)[0].rstrip('/')}/{key}"
    with (_remote_lock_factory or process_lock)(name):
        yield


@contextlib.contextmanager
def process_lock(name: str) -> Iterator[None]:
    """An exclusive lock on `name` among the threads of this process."""
    with _process_locks_guard:
        lock = _process_locks.setdefault(name, threading.Lock())
    with lock:
        yield


# --- helpers -------------------------------------------------------------------------------------


def _call(place: Location, request):
    """Run one storage request; an object store's failure becomes a one-line UserInputError.
    Local errors (missing files) pass through as themselves."""
    try:
        return request()
    except FileNotFoundError:
        raise
    except OSError as exc:
        if place.is_local:
            raise
        raise storage_error(place, exc) from None


def _bounded_s3(filesystem: pafs.S3FileSystem) -> pafs.S3FileSystem:
    """The same S3 file system with bounded connect and request times and few retries (`from_uri`
    takes no timeouts; its options come back through the file system's pickling arguments)."""
    rebuild, (options,) = filesystem.__reduce__()
    if options.get("connect_timeout", -1) < 0:
        options["connect_timeout"] = CONNECT_TIMEOUT_S
    if options.get("request_timeout", -1) < 0:
        options["request_timeout"] = REQUEST_TIMEOUT_S
    options["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS)
    return rebuild(options)


def _split_query(uri: str) -> tuple[str, str]:
    base, sep, query = uri.partition("?")
    return base, sep + query


def _endpoint(place: Location) -> str:
    if "endpoint_override=" in place.uri:
        return place.uri.split("endpoint_override=", 1)[1].split("&", 1)[0]
    return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or "the default endpoint"
