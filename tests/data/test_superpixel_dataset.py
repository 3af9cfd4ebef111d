"""Datasets over a super-pixel cache table: two-view pre-training items and labelled slices."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from lrc_ray.augment import AugmentParams, TwoViewAugment
from lrc_ray.data.phantom import generate_case
from lrc_ray.data.slices import SliceParams, prepare_slices
from lrc_ray.data.superpixel_dataset import LabelledSliceDataset, TwoViewSliceDataset
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
    prepared = prepare_slices(hu, case.labels if labelled else None, params)
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


@pytest.fixture
def two_view_dataset(table) -> TwoViewSliceDataset:
    return TwoViewSliceDataset(table, TwoViewAugment(AugmentParams(), output_size=OUTPUT_SIZE), seed=7)


def assert_items_equal(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_slices_with_too_few_regions_are_left_out(table, two_view_dataset):
    n_regions = table.column("n_regions").to_numpy()
    assert n_regions[0] == 0 and (n_regions[1:] >= 2).all()
    assert len(two_view_dataset) == table.num_rows - 1
    augment = TwoViewAugment(AugmentParams(), output_size=OUTPUT_SIZE)
    threshold = int(np.sort(n_regions)[-3])
    assert len(TwoViewSliceDataset(table, augment, seed=0, min_regions=threshold)) == (n_regions >= threshold).sum()
    with pytest.raises(UserInputError, match=rf"no slice has >= {n_regions.max() + 1} super-pixel regions"):
        TwoViewSliceDataset(table, augment, seed=0, min_regions=int(n_regions.max()) + 1)


def test_two_view_items_have_the_documented_shapes(two_view_dataset):
    item = two_view_dataset[0]
    assert set(item) == {"image1", "image2", "regions1", "regions2"}
    for name in ("image1", "image2"):
        assert item[name].shape == (1, OUTPUT_SIZE, OUTPUT_SIZE) and item[name].dtype == torch.float32
    for name in ("regions1", "regions2"):
        assert item[name].shape == (OUTPUT_SIZE, OUTPUT_SIZE) and item[name].dtype == torch.int64
        assert (item[name] >= 0).any()
    batch = torch.utils.data.default_collate([two_view_dataset[0], two_view_dataset[1]])
    assert batch["regions1"].shape == (2, OUTPUT_SIZE, OUTPUT_SIZE)
    with pytest.raises(IndexError):
        two_view_dataset[len(two_view_dataset)]


def test_items_depend_only_on_seed_epoch_and_index(table, two_view_dataset):
    augment = TwoViewAugment(AugmentParams(), output_size=OUTPUT_SIZE)
    fresh = TwoViewSliceDataset(table, augment, seed=7)
    first = two_view_dataset[2]
    two_view_dataset[1]  # other items drawn in between change nothing
    assert_items_equal(first, two_view_dataset[2])
    assert_items_equal(first, fresh[2])

    two_view_dataset.set_epoch(1)
    next_epoch = two_view_dataset[2]
    assert not torch.equal(first["regions1"], next_epoch["regions1"])
    assert not torch.equal(first["image1"], next_epoch["image1"])
    two_view_dataset.set_epoch(0)
    assert_items_equal(first, two_view_dataset[2])

    other_seed = TwoViewSliceDataset(table, augment, seed=8)[2]
    assert not torch.equal(first["image1"], other_seed["image1"])


def test_two_view_dataset_needs_super_pixels(table):
    without = table.drop_columns(["superpixels", "n_regions"])
    with pytest.raises(UserInputError, match="no super-pixels"):
        TwoViewSliceDataset(without, TwoViewAugment(AugmentParams(), output_size=OUTPUT_SIZE), seed=0)


@pytest.mark.parametrize("bad", [dict(seed=-1), dict(min_regions=0)])
def test_two_view_dataset_rejects_bad_settings(table, bad):
    settings = dict(seed=0) | bad
    with pytest.raises(UserInputError):
        TwoViewSliceDataset(table, TwoViewAugment(AugmentParams(), output_size=OUTPUT_SIZE), **settings)


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


@pytest.mark.parametrize("with_labels", [False, True])
def test_a_batch_is_augmented_as_its_items_are(table, with_labels):
    """The batched pass (a Train worker's, a DataLoader's `__getitems__`) draws the same views as
    item by item, so a slice's views do not depend on the batch it falls in."""
    dataset = TwoViewSliceDataset(table, TwoViewAugment(AugmentParams(), output_size=OUTPUT_SIZE), seed=3,
                                  with_labels=with_labels)
    dataset.set_epoch(2)
    indices = [4, 0, 2]
    batch = dataset.augmented_batch(indices, device="cpu")
    assert set(batch) == set(dataset[0]) and batch["image1"].shape == (3, 1, OUTPUT_SIZE, OUTPUT_SIZE)
    for position, index in enumerate(indices):
        assert_items_equal({name: value[position] for name, value in batch.items()}, dataset[index])
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, sampler=indices)
    assert_items_equal(next(iter(loader)), batch)
