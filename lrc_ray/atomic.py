"""Writing files so that a crash never leaves a half-written one under the final name."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_write_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffixes, so writers that pick the format from the
    name still work); renamed onto `path` only if the block succeeds, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, payload: object) -> None:
    with atomic_write_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
