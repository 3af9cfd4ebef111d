"""Compact pre-training arrays from cache rows (`data.shard`)."""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pytest

from lrc_ray.data.phantom import generate_case
from lrc_ray.data.shard import (
    compact_arrays, compact_bytes, compact_record_batch, compact_slices, concat_compact, row_keys,
)
from lrc_ray.data.slices import SliceParams, prepare_slices
from lrc_ray.errors import UserInputError
from lrc_ray.superpixels.felzenszwalb import FelzenszwalbParams
from lrc_ray.superpixels.selection import RowSelection
from lrc_ray.superpixels.table import add_superpixels, decode_row, slices_table


def phantom_table(case_id: str, seed: int, *, labelled: bool, size: int = 32) -> pa.Table:
    case = generate_case(np.random.default_rng(seed), size=40, slices=4)
    params = SliceParams(size=size)
    prepared = prepare_slices(case.hu.astype(np.float32), case.labels if labelled else None, params,
                              native_spacing_mm=case.spacing_mm[1:])
    return add_superpixels(slices_table(case_id, prepared), FelzenszwalbParams(scale=50, min_size=5), params)


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return pa.concat_tables([phantom_table("a", 0, labelled=True), phantom_table("b", 1, labelled=False)])


def test_rows_decode_to_the_same_arrays_as_one_by_one(table):
    arrays = compact_slices(table)
    assert arrays["image"].shape == (8, 32, 32) and arrays["image"].dtype == np.uint8
    assert arrays["regions"].dtype == np.int16 and arrays["label"].dtype == np.uint8
    assert arrays["labelled"].tolist() == [True] * 4 + [False] * 4
    for row in range(8):
        record = decode_row(table, row)
        assert np.array_equal(arrays["image"][row] / np.float32(255.0), record.image)
        assert np.array_equal(arrays["regions"][row], record.superpixels)
        expected_label = record.label if record.label is not None else np.zeros((32, 32), np.uint8)
        assert np.array_equal(arrays["label"][row], expected_label)
    assert arrays["n_regions"].tolist() == table.column("n_regions").to_pylist()


def test_row_keys_name_case_and_slice():
    keys = row_keys(["case_1", "case_1", "x"], np.array([0, 7, 7]))
    crc = zlib.crc32(b"case_1")
    assert keys.dtype == np.int64 and len(set(keys.tolist())) == 3
    assert int(keys[1]) & 0xFFFFFFFF == 7 and (int(keys[1]) >> 32) & 0xFFFFFFFF == crc


def test_the_selection_is_applied(table):
    regions = table.column("n_regions").to_numpy()
    threshold = int(np.median(regions)) + 1
    kept = compact_slices(table, RowSelection(min_regions=threshold))
    assert len(kept["row_key"]) == (regions >= threshold).sum()
    labelled = compact_slices(table, RowSelection(labelled_only=True, exclude_cases=("b",)))
    assert labelled["labelled"].all() and len(labelled["row_key"]) == 4


def test_batches_join_in_row_key_order_whatever_order_they_come_in(table):
    whole = compact_slices(table)
    parts = [compact_slices(table.slice(5, 3)), compact_slices(table.slice(0, 5))]
    joined = concat_compact(parts)
    order = np.argsort(whole["row_key"], kind="stable")
    for name in whole:
        assert np.array_equal(joined[name], whole[name][order]), name
    with pytest.raises(UserInputError, match="no slice to pre-train on"):
        concat_compact([])


def test_slices_of_different_sizes_are_refused():
    mixed = pa.concat_tables([phantom_table("a", 0, labelled=True, size=32), phantom_table("b", 1, labelled=True, size=48)])
    with pytest.raises(UserInputError, match=r"slices of one square size, got sides \[32, 48\]; set data.size"):
        compact_slices(mixed)
    with pytest.raises(UserInputError, match=r"slices of 48 x 48, got sides \[32\]"):
        compact_slices(phantom_table("a", 0, labelled=True, size=32), side=48)


def test_compact_bytes_counts_four_bytes_a_pixel():
    assert compact_bytes(10, 256) == 10 * 256 * 256 * 4


def test_the_arrow_form_holds_the_same_arrays_in_plain_arrow_types(table):
    record_batch = compact_record_batch(table, RowSelection(min_regions=2), 32)
    assert not any(isinstance(field.type, pa.ExtensionType) for field in record_batch.schema)
    expected = compact_slices(table, RowSelection(min_regions=2))
    back = compact_arrays(pa.concat_tables([record_batch.slice(0, 3), record_batch.slice(3)]))
    for name in expected:
        assert np.array_equal(back[name], expected[name]) and back[name].dtype == expected[name].dtype, name


def test_a_batch_that_keeps_no_row_still_has_the_slices_shape(table):
    empty = compact_record_batch(table, RowSelection(exclude_cases=("a", "b")), 32)
    assert empty.num_rows == 0 and empty.schema == compact_record_batch(table, None, 32).schema
    assert compact_arrays(empty)["image"].shape == (0, 32, 32)


def test_more_regions_than_int16_ids_hold_are_refused(table):
    crowded = table.set_column(table.schema.get_field_index("n_regions"), "n_regions",
                               pa.array([40000] * table.num_rows, pa.int32()))
    with pytest.raises(UserInputError, match="40000 super-pixel regions.*raise data.scale or data.min_size"):
        compact_slices(crowded)
