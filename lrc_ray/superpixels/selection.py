"""Which cached slices pre-training uses: plain pyarrow, so Ray Data read tasks that apply it
import no torch."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class RowSelection:
    """Which cached slices pre-training uses."""

    exclude_cases: tuple[str, ...] = ()  # validation volumes
    labelled_only: bool = False  # the supervised methods
    min_regions: int = 1


def select_rows(table: pa.Table, selection: RowSelection) -> pa.Table:
    """The rows of a slice table (or of one streamed batch of it) that `selection` keeps."""
    keep = pc.greater_equal(table.column("n_regions"), selection.min_regions)
    if selection.exclude_cases:
        excluded = pc.is_in(table.column("case_id"), value_set=pa.array(selection.exclude_cases, pa.string()))
        keep = pc.and_(keep, pc.invert(excluded))
    if selection.labelled_only:
        keep = pc.and_(keep, pc.is_valid(table.column("label")))
    return table.filter(keep)
