"""Pre-training slices in compact arrays: what both input modes of pre-training hold or stream.

The super-pixel cache stores a row per slice with flat Arrow lists (`superpixels.table`).
Pre-training needs only the image, the region ids, the label (supervised methods) and a few
numbers per slice, in the smallest types that hold them:

    image      uint8  (N, S, S)   windowed slice, value / 255 in [0, 1]
    regions    int16  (N, S, S)   region ids, -1 = ignored
    label      uint8  (N, S, S)   organ ids, 0 where the slice is unlabelled
    labelled   bool   (N,)
    n_regions  int32  (N,)
    row_key    int64  (N,)        (crc32(case_id) << 32) | slice_index: names the slice in any order

4-5 bytes a pixel, against 4 for the region ids alone as int32 and 4 more for a float image:
a 256 x 256 slice is 256 KB, so 10 000 slices fit in under 3 GB of device memory.

`compact_slices` makes these arrays from a batch of cache rows. A Ray Data map task runs it
(pre-training's decode happens on the node's spare CPUs, not on a training worker's thread);
the plain in-process loop calls it on the whole table.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lrc_ray.errors import UserInputError
from lrc_ray.superpixels.selection import RowSelection, select_rows

COMPACT_COLUMNS = ("image", "regions", "label", "labelled", "n_regions", "row_key")
_INT16_MAX_REGIONS = np.iinfo(np.int16).max


def compact_slices(table: pa.Table, selection: RowSelection | None = None, *, side: int | None = None
                   ) -> dict[str, np.ndarray]:
    """The rows of a cache table that `selection` keeps, as the compact arrays above; `side` is the
    slices' size when known (a batch may keep no row, and its arrays are then (0, side, side)).

    Raises:
        UserInputError: when the slices are not all square of one size (`side`, if given).
    """
    if selection is not None:
        table = select_rows(table, selection)
    count = table.num_rows
    sizes = set(table.column("height").to_numpy().tolist()) | set(table.column("width").to_numpy().tolist())
    if len(sizes) > 1 or (side is not None and sizes - {side}):
        expected = f"{side} x {side}" if side is not None else "one square size"
        raise UserInputError(
            f"pre-training needs slices of {expected}, got sides {sorted(sizes)}; set data.size"
        )
    side = sizes.pop() if sizes else (side or 0)
    shape = (count, side, side)
    n_regions = table.column("n_regions").to_numpy().astype(np.int32)
    if count and n_regions.max() > _INT16_MAX_REGIONS:
        raise UserInputError(
            f"a slice has {n_regions.max()} super-pixel regions, more than pre-training's int16 ids hold "
            f"({_INT16_MAX_REGIONS}); raise data.scale or data.min_size"
        )
    regions = _list_column(table, "superpixels", np.int16, shape)
    labelled = pc.is_valid(table.column("label")).to_numpy(zero_copy_only=False)
    label = np.zeros(shape, dtype=np.uint8)
    if labelled.any():
        label[labelled] = _list_column(table.filter(labelled), "label", np.uint8, (int(labelled.sum()), *shape[1:]))
    return {
        "image": _list_column(table, "image", np.uint8, shape),
        "regions": regions,
        "label": label,
        "labelled": labelled,
        "n_regions": n_regions,
        "row_key": row_keys(table.column("case_id").to_pylist(), table.column("slice_index").to_numpy()),
    }


def compact_record_batch(table: pa.Table, selection: RowSelection | None, side: int) -> pa.Table:
    """`compact_slices` as a plain Arrow table, what a Ray Data map task returns: each (N, S, S) array
    becomes a fixed-size list column of S*S values (Arrow's own type, not Ray's tensor extension,
    which some pyarrow versions fail to convert to, falling back to pickled Python objects: seen
    on a GPU machine's image). `compact_arrays` turns it back without copying the pixels again."""
    arrays = compact_slices(table, selection, side=side)
    columns = {name: _fixed_size_lists(values) if values.ndim == 3 else pa.array(values)
               for name, values in arrays.items()}
    return pa.table(columns)


def compact_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """The arrays of a `compact_record_batch` table (or of several, concatenated)."""
    count = table.num_rows
    side = int(np.sqrt(table.schema.field("image").type.list_size))
    arrays = {}
    for name in COMPACT_COLUMNS:
        column = table.column(name)
        if pa.types.is_fixed_size_list(column.type):
            values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
            arrays[name] = values.reshape(count, side, side)
        else:
            arrays[name] = column.to_numpy(zero_copy_only=False)
    return arrays


def _fixed_size_lists(values: np.ndarray) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(values).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), values.shape[1] * values.shape[2])


def row_keys(case_ids: list[str], slice_indices: np.ndarray) -> np.ndarray:
    """A slice's key: (crc32(case_id) << 32) | slice_index, int64. Shape: (N,)."""
    crcs = np.array([zlib.crc32(case_id.encode()) for case_id in case_ids], dtype=np.int64)
    return (crcs << 32) | np.asarray(slice_indices, dtype=np.int64)


def concat_compact(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Compact arrays of several batches as one, sorted by row key (so rows are in the same order
    whichever order the batches came in)."""
    if not parts:
        raise UserInputError("no slice to pre-train on (the selection kept none)")
    return sorted_by_row_key({name: np.concatenate([part[name] for part in parts]) for name in COMPACT_COLUMNS})


def sorted_by_row_key(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Compact arrays in row-key order: the order epochs permute, whatever order the files were read in
    (pyarrow and Ray Data list a cache's files differently)."""
    order = np.argsort(arrays["row_key"], kind="stable")
    return {name: values[order] for name, values in arrays.items()}


def compact_bytes(num_slices: int, size: int) -> int:
    """Bytes of `num_slices` compact slices of size x size (int16 region ids)."""
    return num_slices * size * size * (1 + 2 + 1)


def _list_column(table: pa.Table, name: str, dtype: type, shape: tuple[int, int, int]) -> np.ndarray:
    """A list column whose rows all hold H*W values -> one (N, H, W) array (one copy, no Python loop)."""
    values = pc.list_flatten(table.column(name)).to_numpy(zero_copy_only=False)
    return values.astype(dtype, copy=False).reshape(shape)
