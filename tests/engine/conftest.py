import numpy as np
import pyarrow as pa
import pytest
import torch

from lrc_ray.augment.two_views import AugmentParams, TwoViewAugment
from lrc_ray.data.shard import compact_slices
from lrc_ray.engine.input_path import DeviceResidentSlices, TwoViewBatches

from lrc_ray.data.phantom import generate_case
from lrc_ray.data.slices import SliceParams, prepare_slices
from lrc_ray.superpixels.felzenszwalb import FelzenszwalbParams
from lrc_ray.superpixels.table import add_superpixels, slices_table


@pytest.fixture(scope="session")
def slice_table() -> pa.Table:
    """An in-memory super-pixel table: 3 labelled volumes of 4 slices of 32 x 32 (no Ray)."""
    rng = np.random.default_rng(0)
    slicing = SliceParams(size=32)
    tables = []
    for index in range(3):
        case = generate_case(rng, size=48, slices=4)
        prepared = prepare_slices(case.hu.astype(np.float32), case.labels, slicing, native_spacing_mm=case.spacing_mm[1:])
        tables.append(add_superpixels(slices_table(f"case_{index}", prepared), FelzenszwalbParams(scale=50, min_size=5), slicing))
    return pa.concat_tables(tables)


def _pretrain_batches(table: pa.Table, *, batch_size: int = 4, with_labels: bool = False, epoch: int = 0,
                      output_size: int = 32) -> list[dict]:
    from lrc_ray.superpixels.selection import RowSelection

    arrays = compact_slices(table, RowSelection(min_regions=2, labelled_only=with_labels))
    slices = DeviceResidentSlices(arrays, torch.device("cpu"), batch_size=batch_size, with_labels=with_labels)
    maker = TwoViewBatches(TwoViewAugment(AugmentParams(), output_size=output_size), seed=0, with_labels=with_labels)
    return list(slices.batches(maker, epoch))


@pytest.fixture(scope="session")
def pretrain_batches():
    """An epoch of pre-training batches of a table's slices (those with >= 2 regions), as the loop makes them."""
    return _pretrain_batches
