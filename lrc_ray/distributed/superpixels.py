"""Ray Data pipeline: volumes -> slices -> Felzenszwalb super-pixels -> Parquet files.

Two stages, each a pool of tasks over the plain functions: reading a volume (one task per
volume: decompressing a .nii.gz is sequential anyway) and computing super-pixels over
batches of its slices, spread over all workers. Ray Data streams between them, so
memory holds a few volumes at a time, not the data set.
"""

from __future__ import annotations

import contextlib
import logging
import math
from functools import partial
from typing import Iterator

import pyarrow as pa
import ray
from ray.data import DataContext, TaskPoolStrategy

from lrc_ray.data.msd import CaseEntry, HeaderSummary, MsdDataset, read_case
from lrc_ray.data.slices import prepare_slices
from lrc_ray.distributed.runtime import cluster_cpus, ray_session
from lrc_ray.errors import UserInputError
from lrc_ray.storage import Location, location
from lrc_ray.superpixels.cache import ExtractionParams
from lrc_ray.superpixels.table import add_superpixels, slices_table

_RAY_DATA_ERROR_LOGGERS = ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state")
# About 3 s of Felzenszwalb on one core: 64 slices of 256 x 256, 16 of 512 x 512.
PIXELS_PER_TASK = 1 << 22


def extract_to_parquet(
    cases: tuple[CaseEntry, ...],
    labels: dict[int, str],
    params: ExtractionParams,
    out_dir: str | Location,
    *,
    workers: int,
    total_slices: int,
    slice_pixels: int,
) -> None:
    """Write the super-pixel table of `cases` as Parquet files into `out_dir` (a path or URI).

    Raises the first `UserInputError` a task met (e.g. a corrupt volume) as itself, not
    wrapped in Ray's task errors.
    """
    slices_per_batch = batch_size_for(total_slices, slice_pixels, workers)
    items = [{"case_index": index} for index in range(len(cases))]
    # Reading is cheap next to Felzenszwalb: half as many readers. Unequal pool sizes also
    # keep Ray Data from fusing the stages into one task per volume.
    readers = max(1, workers // 2)
    volumes = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        partial(_read_cases, cases=cases, labels=labels, params=params, slices_per_batch=slices_per_batch),
        batch_size=1,
        batch_format="pyarrow",
        compute=TaskPoolStrategy(size=readers),
    )
    dataset = map_superpixels(volumes, params, workers=workers, slices_per_batch=slices_per_batch)
    out = location(out_dir)
    with running_pipeline():
        dataset.write_parquet(out.path, filesystem=out.filesystem, compression="zstd", concurrency=workers)


def ray_data_extract(*, workers: int | None = None, address: str | None = None):
    """The super-pixel stage's `Extract` (`stages.Extract`): this pipeline on the Ray cluster at
    `address` (or the one this process is connected to, or a local one of `workers` CPUs), with
    `workers` parallel tasks (default: every CPU of the cluster)."""
    return partial(_extract_in_session, workers=workers, address=address)


def _extract_in_session(dataset: MsdDataset, params: ExtractionParams, out_dir: Location, headers: HeaderSummary, *,
                        workers: int | None, address: str | None) -> None:
    size = params.slicing.size
    with ray_session(address=address, num_cpus=workers):
        extract_to_parquet(
            dataset.cases, dataset.labels, params, out_dir, workers=workers or cluster_cpus(),
            total_slices=headers.total_slices, slice_pixels=size * size if size else headers.max_slice_pixels,
        )


def batch_size_for(total_slices: int, slice_pixels: int, workers: int) -> int:
    """Slices per task: a few seconds of Felzenszwalb each (Ray Data's scheduling latency is
    about 0.1 s a task), and at least two tasks per worker on small data sets."""
    by_work = max(1, PIXELS_PER_TASK // max(slice_pixels, 1))
    by_balance = math.ceil(total_slices / (2 * workers))
    return max(1, min(by_work, by_balance))


@contextlib.contextmanager
def pipeline_data_context() -> Iterator[None]:
    """Ray Data settings for this pipeline, restored afterwards.

    - Our own errors (a corrupt volume) reach the caller as themselves, not as Ray Data's
      generic UserCodeException, which drops the cause.
    - No per-operator resource reservation: it holds CPUs back for the read stage, which is
      idle most of the time, and on small clusters cost a quarter of the throughput
      (bench/superpixels.py).
    """
    context = DataContext.get_current()
    saved = (context.raise_original_map_exception, context.op_resource_reservation_enabled)
    context.raise_original_map_exception, context.op_resource_reservation_enabled = True, False
    try:
        yield
    finally:
        context.raise_original_map_exception, context.op_resource_reservation_enabled = saved


@contextlib.contextmanager
def running_pipeline() -> Iterator[None]:
    """Run a Ray Data pipeline in the block with `pipeline_data_context`; a `UserInputError` that
    one of its tasks raised reaches the caller as itself (one line), not wrapped by Ray."""
    try:
        with pipeline_data_context(), _ray_data_error_logs_silenced():
            yield
    except Exception as exc:
        user_error = _find_user_error(exc)
        if user_error is None:
            raise
        raise user_error from None


def map_superpixels(
    slices: ray.data.Dataset, params: ExtractionParams, *, workers: int, slices_per_batch: int
) -> ray.data.Dataset:
    """The super-pixel stage: rows of `slices_table` in, the same rows with super-pixels out."""
    return slices.map_batches(
        partial(_compute_superpixels, params=params),
        batch_size=slices_per_batch,
        batch_format="pyarrow",
        compute=TaskPoolStrategy(size=workers),
    )


def _read_cases(batch: pa.Table, *, cases, labels, params: ExtractionParams, slices_per_batch: int) -> Iterator[pa.Table]:
    """Read volumes and yield their slices in blocks of `slices_per_batch` rows, so that the
    super-pixel stage spreads one volume over many tasks."""
    for case_index in batch.column("case_index").to_pylist():
        case = cases[case_index]
        image, label = read_case(case, labels)
        prepared = prepare_slices(image.array, None if label is None else label.array, params.slicing,
                                  native_spacing_mm=image.spacing_mm[1:])
        table = slices_table(case.case_id, prepared)
        for start in range(0, table.num_rows, slices_per_batch):
            yield table.slice(start, slices_per_batch)


def _compute_superpixels(batch: pa.Table, *, params: ExtractionParams) -> pa.Table:
    return add_superpixels(batch, params.felzenszwalb, params.slicing)


@contextlib.contextmanager
def _ray_data_error_logs_silenced() -> Iterator[None]:
    """Ray Data logs a task's traceback before raising it; we raise it ourselves (a user error as
    one line, anything else with its full traceback), so its own copy is noise."""
    loggers = [logging.getLogger(name) for name in _RAY_DATA_ERROR_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _find_user_error(exc: BaseException) -> UserInputError | None:
    """Ray wraps task exceptions (RayTaskError, UserCodeException); find ours in the chain."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        # RayTaskError(X) is also an X, but its message carries the remote traceback.
        if isinstance(current, UserInputError) and not isinstance(current, ray.exceptions.RayError):
            # Ray Data appends retry advice to the message; ours is its first line.
            return type(current)(str(current).splitlines()[0])
        pending.extend([getattr(current, "cause", None), current.__cause__, current.__context__])
    return None
