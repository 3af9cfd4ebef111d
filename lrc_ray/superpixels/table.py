"""The Parquet format of the super-pixel cache: one row per axial slice.

Columns (arrays are stored flattened, row-major, with `height` and `width`):

    case_id       string
    slice_index   int32     axial index in display order (0 = most inferior)
    height, width int32
    image         list<uint8>   windowed slice, value / 255 in [0, 1]
    body_mask     list<bool>
    superpixels   list<int32>   region ids 0..R-1, -1 = ignored (outside the body)
    label         list<uint8>   organ ids of dataset.json 'labels'; null when unlabelled
    n_regions     int32
    scale, sigma  float64, min_size int32, window_low, window_high float64, size int32 (null = native),
    spacing_mm    float64   in-plane spacing of the slice (null = each volume's own)

Plain Arrow lists keep the files readable by pyarrow/pandas/Spark without lrc_ray or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from lrc_ray.data.slices import PreparedSlices, SliceParams, dequantise
from lrc_ray.superpixels.felzenszwalb import FelzenszwalbParams, count_regions, superpixels_for_slice

SLICE_SCHEMA = pa.schema(
    [
        ("case_id", pa.string()),
        ("slice_index", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.list_(pa.uint8())),
        ("body_mask", pa.list_(pa.bool_())),
        ("superpixels", pa.list_(pa.int32())),
        ("label", pa.list_(pa.uint8())),
        ("n_regions", pa.int32()),
        ("scale", pa.float64()),
        ("sigma", pa.float64()),
        ("min_size", pa.int32()),
        ("window_low", pa.float64()),
        ("window_high", pa.float64()),
        ("size", pa.int32()),
        ("spacing_mm", pa.float64()),
    ]
)
# Columns filled by the read stage, before super-pixels are computed.
_SLICE_COLUMNS = ("case_id", "slice_index", "height", "width", "image", "body_mask", "label")


@dataclass(frozen=True)
class SliceRecord:
    """One decoded row. Shapes: (H, W)."""

    case_id: str
    slice_index: int
    image: np.ndarray  # float32 in [0, 1]
    body_mask: np.ndarray  # bool
    superpixels: np.ndarray | None  # int32, None before extraction
    label: np.ndarray | None  # uint8, None for unlabelled slices


def slices_table(case_id: str, prepared: PreparedSlices) -> pa.Table:
    """The read stage's output for one volume: one row per slice, no super-pixels yet."""
    depth, height, width = prepared.image_u8.shape
    pixels = height * width
    label_column = (
        _flat_lists(prepared.labels.reshape(depth, pixels), pa.uint8())
        if prepared.labels is not None
        else pa.nulls(depth, pa.list_(pa.uint8()))
    )
    columns = {
        "case_id": pa.array([case_id] * depth, pa.string()),
        "slice_index": pa.array(np.arange(depth, dtype=np.int32)),
        "height": pa.array(np.full(depth, height, dtype=np.int32)),
        "width": pa.array(np.full(depth, width, dtype=np.int32)),
        "image": _flat_lists(prepared.image_u8.reshape(depth, pixels), pa.uint8()),
        "body_mask": _flat_lists(prepared.body_mask.reshape(depth, pixels), pa.bool_()),
        "label": label_column,
    }
    return pa.table(columns, schema=pa.schema([SLICE_SCHEMA.field(name) for name in _SLICE_COLUMNS]))


def add_superpixels(
    table: pa.Table, felzenszwalb_params: FelzenszwalbParams, slice_params: SliceParams
) -> pa.Table:
    """Compute super-pixels for every row of a `slices_table` and add them with the parameters."""
    regions, counts = [], []
    for row in range(table.num_rows):
        record = decode_row(table, row)
        superpixels = superpixels_for_slice(record.image, record.body_mask, felzenszwalb_params)
        regions.append(superpixels.ravel())
        counts.append(count_regions(superpixels))
    rows = table.num_rows
    columns = {name: table.column(name) for name in _SLICE_COLUMNS}
    columns.update(
        superpixels=_flat_lists(regions, pa.int32()),
        n_regions=pa.array(np.asarray(counts, dtype=np.int32)),
        scale=pa.array(np.full(rows, felzenszwalb_params.scale, dtype=np.float64)),
        sigma=pa.array(np.full(rows, felzenszwalb_params.sigma, dtype=np.float64)),
        min_size=pa.array(np.full(rows, felzenszwalb_params.min_size, dtype=np.int32)),
        window_low=pa.array(np.full(rows, slice_params.window_hu[0], dtype=np.float64)),
        window_high=pa.array(np.full(rows, slice_params.window_hu[1], dtype=np.float64)),
        size=pa.array([slice_params.size] * rows, pa.int32()),
        spacing_mm=pa.array([slice_params.working_spacing_mm] * rows, pa.float64()),
    )
    return pa.table([columns[field.name] for field in SLICE_SCHEMA], schema=SLICE_SCHEMA)


def decode_row(table: pa.Table, row: int) -> SliceRecord:
    """Rebuild the arrays of one row of a slice table (either stage)."""
    height = table.column("height")[row].as_py()
    width = table.column("width")[row].as_py()

    def array(name: str, dtype: type) -> np.ndarray | None:
        if name not in table.column_names:
            return None
        value = table.column(name)[row]
        if not value.is_valid:
            return None
        return value.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(height, width)

    return SliceRecord(
        case_id=table.column("case_id")[row].as_py(),
        slice_index=table.column("slice_index")[row].as_py(),
        image=dequantise(array("image", np.uint8)),
        body_mask=array("body_mask", bool),
        superpixels=array("superpixels", np.int32),
        label=array("label", np.uint8),
    )


def _flat_lists(rows, value_type: pa.DataType) -> pa.ListArray:
    """Rows of equal length -> an Arrow list array without a Python loop per pixel."""
    rows = np.asarray(rows) if not isinstance(rows, np.ndarray) else rows
    count, length = rows.shape
    offsets = pa.array(np.arange(0, (count + 1) * length, length, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1), type=value_type))
