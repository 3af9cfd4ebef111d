import numpy as np
import pyarrow as pa
import pytest

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
        prepared = prepare_slices(case.hu.astype(np.float32), case.labels, slicing)
        tables.append(add_superpixels(slices_table(f"case_{index}", prepared), FelzenszwalbParams(scale=50, min_size=5), slicing))
    return pa.concat_tables(tables)
