"""The PyTorch dataset of fine-tuning over a super-pixel cache table: labelled slices.

(Pre-training reads compact arrays instead: `data.shard`, `engine.input_path`.)

Rows are decoded lazily, one per item, so a dataset holds only the Arrow table (cheap to pickle to
DataLoader workers). Each item's randomness comes from `(seed, epoch, index)` alone, so an item is
the same whichever worker or process draws it, and changes from epoch to epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from lrc_ray.augment.two_views import BACKGROUND_LABEL, ViewGeometry, warp_slice
from lrc_ray.errors import UserInputError
from lrc_ray.superpixels.table import decode_row

# Fine-tuning augmentation is deliberately light: labels are scarce, and the network should
# still learn where organs lie.
LABEL_ROTATE_DEGREES = 10.0
LABEL_FLIP_PROB = 0.5


class _EpochSeeded(Dataset):
    """Rows of a table, each item seeded by (seed, epoch, index)."""

    def __init__(self, table: pa.Table, rows: np.ndarray, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise UserInputError(f"seed: expected a whole number >= 0, got {seed!r}")
        self._table = table
        self._rows = rows
        self._seed = seed
        self._epoch = 0

    def __len__(self) -> int:
        return len(self._rows)

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (in every process) so the augmentation changes between epochs."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch: expected a whole number >= 0, got {epoch!r}")
        self._epoch = epoch

    def _record_and_rng(self, index: int):
        if not 0 <= index < len(self._rows):
            raise IndexError(f"index {index} out of range for a dataset of {len(self._rows)} slices")
        record = decode_row(self._table, int(self._rows[index]))
        return record, np.random.default_rng([self._seed, self._epoch, index])


class LabelledSliceDataset(_EpochSeeded):
    """Labelled slices for fine-tuning: image float32 (1, H, W), label int64 (H, W).

    With `augment`, each item gets a small rotation and, at random, an anterior-posterior flip,
    the same on image and label (nearest for the label, background where the rotation leaves the
    slice). Left-right flips are left out: they would put left-side organs where the right-side
    ones belong (e.g. the two kidneys) while their labels keep the side.
    """

    def __init__(
        self, table: pa.Table, *, case_ids: Sequence[str] | None = None, augment: bool = False, seed: int = 0
    ) -> None:
        keep = pc.invert(pc.is_null(table.column("label")))
        if case_ids is not None:
            if isinstance(case_ids, str):
                raise UserInputError(f"case_ids: expected a list of case ids, got the string {case_ids!r}")
            keep = pc.and_(keep, pc.is_in(table.column("case_id"), value_set=pa.array(list(case_ids), pa.string())))
        rows = np.flatnonzero(keep.to_numpy(zero_copy_only=False))
        if rows.size == 0:
            chosen = "" if case_ids is None else f" among case ids {sorted(case_ids)}"
            raise UserInputError(f"no labelled slice{chosen} in the slice table")
        super().__init__(table, rows, seed)
        self._augment = augment

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record, rng = self._record_and_rng(index)
        image = torch.from_numpy(record.image)
        label = torch.from_numpy(record.label.astype(np.int64))
        if not self._augment:
            return {"image": image[None], "label": label}
        shape = tuple(image.shape)
        geometry = ViewGeometry(
            center_offset=(0.0, 0.0),
            crop_size=shape,
            angle=math.radians(rng.uniform(-LABEL_ROTATE_DEGREES, LABEL_ROTATE_DEGREES)),
            flip=(bool(rng.random() < LABEL_FLIP_PROB), False),
        )
        image, label = warp_slice(image, label, geometry, shape, index_fill=BACKGROUND_LABEL)
        return {"image": image, "label": label}
