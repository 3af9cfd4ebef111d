"""The fine-tuning dataset over a super-pixel cache table: labelled slices."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from lrc_ray.data.phantom import generate_case
from lrc_ray.data.slices import SliceParams, prepare_slices
from lrc_ray.data.superpixel_dataset import LabelledSliceDataset
from lrc_ray.errors import UserInputError
from lrc_ray.superpixels.felzenszwalb import FelzenszwalbParams
from lrc_ray.superpixels.table import add_superpixels, slices_table

SIZE = 48
SLICES = 4  # the phantom's minimum
OUTPUT_SIZE = 32


def phantom_table(case_id: str, seed: int, *, labelled: bool, air_slices: int = 0) -> pa.Table:
    """A real cache table of a small phantom; the first `air_slices` slices are pure air (no region)."""
    case = generate_case(np.random.default_rng(seed), size=SIZE, slices=SLICES)
    hu = case.hu.astype(np.float32)
    hu[:air_slices] = -1000.0
    params = SliceParams()
    prepared = prepare_slices(hu, case.labels if labelled else None, params, native_spacing_mm=case.spacing_mm[1:])
    return add_superpixels(slices_table(case_id, prepared), FelzenszwalbParams(), params)


@pytest.fixture(scope="module")
def table() -> pa.Table:
    """Case 'a': labelled, slice 0 is air; case 'b': labelled; case 'c': unlabelled."""
    return pa.concat_tables(
        [
            phantom_table("a", 0, labelled=True, air_slices=1),
            phantom_table("b", 1, labelled=True),
            phantom_table("c", 2, labelled=False),
        ]
    )


def assert_items_equal(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_labelled_dataset_skips_unlabelled_rows_and_filters_cases(table):
    labels = table.column("label")
    everything = LabelledSliceDataset(table)
    assert len(everything) == 2 * SLICES  # cases a and b; c has no labels
    item = everything[SLICES + 1]
    assert item["image"].shape == (1, SIZE, SIZE) and item["image"].dtype == torch.float32
    assert item["label"].shape == (SIZE, SIZE) and item["label"].dtype == torch.int64
    expected = np.asarray(labels[SLICES + 1].as_py()).reshape(SIZE, SIZE)
    np.testing.assert_array_equal(item["label"].numpy(), expected)
    assert item["label"].max() > 0

    only_b = LabelledSliceDataset(table, case_ids=["b"])
    assert len(only_b) == SLICES
    np.testing.assert_array_equal(only_b[1]["label"].numpy(), expected)


@pytest.mark.parametrize("case_ids", [["c"], ["missing"], []])
def test_labelled_dataset_without_labelled_slices_raises(table, case_ids):
    with pytest.raises(UserInputError, match="no labelled slice"):
        LabelledSliceDataset(table, case_ids=case_ids)


def test_labelled_augmentation_moves_image_and_label_together(table):
    plain = LabelledSliceDataset(table, case_ids=["b"])
    augmented = LabelledSliceDataset(table, case_ids=["b"], augment=True, seed=3)
    original, first = plain[1], augmented[1]
    assert first["image"].shape == (1, SIZE, SIZE) and first["label"].dtype == torch.int64
    assert set(first["label"].unique().tolist()) <= set(original["label"].unique().tolist()) | {0}
    assert not torch.equal(first["label"], original["label"])
    assert_items_equal(first, augmented[1])
    augmented.set_epoch(1)
    assert not torch.equal(first["label"], augmented[1]["label"])
    # Organ pixels stay on organ intensities: the mean image value under each label barely moves.
    for organ in original["label"].unique().tolist():
        if organ == 0 or (first["label"] == organ).sum() < 20:
            continue
        before = original["image"][0][original["label"] == organ].mean()
        after = first["image"][0][first["label"] == organ].mean()
        assert abs(before - after) < 0.05, organ


def mirrored_axes(original: torch.Tensor, augmented: torch.Tensor) -> tuple[bool, bool]:
    """Which axes (rows = anterior-posterior, columns = left-right) a label map was mirrored along,
    read from its organs' centroids: each lies nearer its mirror image than its own place only when
    mirrored (the small rotation moves a centroid much less than a mirror does)."""
    mirrored = [0, 0]
    organs = [organ for organ in original.unique().tolist() if organ and (augmented == organ).sum() >= 10]
    for organ in organs:
        before = torch.nonzero(original == organ).double().mean(dim=0)
        after = torch.nonzero(augmented == organ).double().mean(dim=0)
        for axis in (0, 1):
            mirror = original.shape[axis] - 1 - before[axis]
            mirrored[axis] += int(abs(after[axis] - mirror) < abs(after[axis] - before[axis]))
    return mirrored[0] > len(organs) / 2, mirrored[1] > len(organs) / 2


@pytest.mark.parametrize("flip_anterior_posterior", [False, True])
@pytest.mark.parametrize("flip_left_right", [False, True])
def test_labelled_flips_only_along_the_axes_asked_for(table, flip_anterior_posterior, flip_left_right):
    """No flip by default: supine CT is never upside down, and left-right flips swap sided organs."""
    original = LabelledSliceDataset(table, case_ids=["b"])[2]["label"]
    dataset = LabelledSliceDataset(table, case_ids=["b"], augment=True, seed=5,
                                   flip_anterior_posterior=flip_anterior_posterior, flip_left_right=flip_left_right)
    seen = set()
    for epoch in range(16):
        dataset.set_epoch(epoch)
        seen.add(mirrored_axes(original, dataset[2]["label"]))
    rows = {False, True} if flip_anterior_posterior else {False}
    columns = {False, True} if flip_left_right else {False}
    assert {axis[0] for axis in seen} == rows and {axis[1] for axis in seen} == columns, seen


def test_labelled_flips_need_augmentation(table):
    with pytest.raises(UserInputError, match="flip_anterior_posterior / flip_left_right: need augment=True"):
        LabelledSliceDataset(table, case_ids=["b"], flip_left_right=True)
