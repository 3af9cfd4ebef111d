"""PyTorch datasets over a super-pixel cache table: two-view pre-training and labelled fine-tuning.

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

from lrc_ray.augment.two_views import BACKGROUND_LABEL, TwoViewAugment, ViewGeometry, warp_slice
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


class TwoViewSliceDataset(_EpochSeeded):
    """Slices of a super-pixel cache table -> two augmented views each.

    Items: image1, image2 float32 (1, S, S); regions1, regions2 int64 (S, S), -1 = ignored;
    with `with_labels`, also label1, label2 int64 (S, S), and only labelled slices are used.
    Slices with fewer than `min_regions` super-pixel regions are left out: they give the
    region contrast nothing to contrast.
    """

    def __init__(
        self, table: pa.Table, augment: TwoViewAugment, *, seed: int, min_regions: int = 2, with_labels: bool = False
    ) -> None:
        if "n_regions" not in table.column_names:
            raise UserInputError("the slice table has no super-pixels; run the super-pixel stage first")
        if isinstance(min_regions, bool) or not isinstance(min_regions, int) or min_regions < 1:
            raise UserInputError(f"min_regions: expected a whole number >= 1, got {min_regions!r}")
        keep = table.column("n_regions").to_numpy(zero_copy_only=False) >= min_regions
        if with_labels:
            keep &= pc.is_valid(table.column("label")).to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(keep)
        if rows.size == 0:
            labelled = "labelled " if with_labels else ""
            raise UserInputError(
                f"no {labelled}slice has >= {min_regions} super-pixel regions; lower min_size/scale or check the cache"
            )
        super().__init__(table, rows, seed)
        self._augment = augment
        self._with_labels = with_labels

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: value[0] for name, value in self.augmented_batch([index]).items()}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """What a DataLoader fetches a batch with: the batch augmented at once, as items."""
        batch = self.augmented_batch(indices)
        return [{name: value[position] for name, value in batch.items()} for position in range(len(indices))]

    def augmented_batch(self, indices: Sequence[int], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Items `indices`, collated and augmented on `device` in one batched pass; the same views
        as item by item. Keys as the items', each with a leading batch dimension."""
        images, superpixels, labels, draws = [], [], [], []
        for index in indices:
            record, rng = self._record_and_rng(index)
            images.append(record.image)
            superpixels.append(record.superpixels)
            labels.append(record.label)
            draws.append(self._augment.draw(record.image.shape, rng, with_label=self._with_labels))
        return self._augment.augment(images, superpixels, draws, labels=labels if self._with_labels else None, device=device)


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
