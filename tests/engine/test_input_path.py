"""Pre-training's input path: both modes, the ranks' parts of a global batch, the mode choice."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from lrc_ray.augment.two_views import AugmentParams, TwoViewAugment
from lrc_ray.data.shard import compact_slices
from lrc_ray.engine import input_path
from lrc_ray.engine.input_path import (
    DeviceResidentSlices, StreamedSlices, TwoViewBatches, choose_input_mode, epoch_permutation,
)
from lrc_ray.errors import UserInputError
from lrc_ray.superpixels.selection import RowSelection

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def arrays(slice_table):
    return compact_slices(slice_table, RowSelection(min_regions=2))


def maker(augment: bool = True, seed: int = 0, with_labels: bool = False) -> TwoViewBatches:
    two_views = TwoViewAugment(AugmentParams(), output_size=32) if augment else None
    return TwoViewBatches(two_views, seed=seed, with_labels=with_labels)


def windows_of(arrays, rows: int):
    def windows(epoch):
        for start in range(0, len(arrays["row_key"]), rows):
            yield {name: values[start : start + rows] for name, values in arrays.items()}
    return windows


def assert_batches_equal(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second) > 0
    for one, other in zip(first, second):
        assert one.keys() == other.keys()
        for name in one:
            value, expected = one[name], other[name]
            assert torch.equal(value, expected) if isinstance(value, torch.Tensor) else value == expected, name


def assert_same(value: torch.Tensor, expected: torch.Tensor) -> None:
    """Ids exactly; images to a float rounding (a grouped blur convolution may sum in another order
    for another number of slices: 1 ulp seen)."""
    if value.is_floating_point():
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0)
    else:
        assert torch.equal(value, expected)


def test_both_modes_give_the_same_batches_for_the_same_seed(arrays):
    count = len(arrays["row_key"])
    device = DeviceResidentSlices(arrays, CPU, batch_size=4)
    stream = StreamedSlices(windows_of(arrays, count), CPU, batch_size=4, steps_per_epoch=count // 4)
    for epoch in (0, 1):
        assert_batches_equal(list(device.batches(maker(), epoch)), list(stream.batches(maker(), epoch)))


def test_batches_have_the_documented_shapes_and_change_with_the_epoch(arrays):
    slices = DeviceResidentSlices(arrays, CPU, batch_size=4, with_labels=True)
    first = list(slices.batches(maker(with_labels=True), 0))
    assert len(first) == slices.steps_per_epoch == len(arrays["row_key"]) // 4
    batch = first[0]
    assert batch["image1"].shape == batch["image2"].shape == (4, 1, 32, 32) and batch["image1"].dtype == torch.float32
    assert batch["regions1"].shape == batch["label1"].shape == (4, 32, 32)
    assert batch["sample_seeds"].shape == (4,) and batch["sample_seeds"].dtype == torch.int64
    assert batch["region_ids_below"] >= int(batch["regions1"].max()) + 1
    assert_batches_equal(first, list(slices.batches(maker(with_labels=True), 0)))
    assert not torch.equal(first[0]["image1"], next(slices.batches(maker(with_labels=True), 1))["image1"])


def test_w_ranks_with_batch_b_take_the_batches_of_one_worker_with_batch_w_times_b(arrays):
    whole = list(DeviceResidentSlices(arrays, CPU, batch_size=4).batches(maker(), 0))
    parts = [list(DeviceResidentSlices(arrays, CPU, batch_size=2, world_size=2, rank=rank).batches(maker(), 0))
             for rank in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for step, batch in enumerate(whole):
        for name in ("image1", "image2", "regions1", "regions2", "sample_seeds"):
            assert_same(torch.cat([parts[0][step][name], parts[1][step][name]]), batch[name])


def test_a_slice_gets_the_same_views_in_any_batch(arrays):
    seeds_first = {}
    for batch_size in (3, 5):
        for batch in DeviceResidentSlices(arrays, CPU, batch_size=batch_size).batches(maker(), 0):
            for position, seed in enumerate(batch["sample_seeds"].tolist()):
                view = batch["image2"][position]
                if seed in seeds_first:
                    assert_same(seeds_first[seed], view)
                seeds_first.setdefault(seed, view)


def test_streaming_in_small_windows_still_visits_whole_batches_in_every_window(arrays, monkeypatch):
    count = len(arrays["row_key"])
    stream = StreamedSlices(windows_of(arrays, 5), CPU, batch_size=4, steps_per_epoch=count // 4)
    batches = list(stream.batches(maker(augment=False), 0))
    assert len(batches) == count // 4
    seen = torch.cat([batch["sample_seeds"] for batch in batches]).tolist()
    assert len(set(seen)) == len(seen), "no slice twice in an epoch"


def test_a_split_that_runs_short_is_an_error_not_a_hang(arrays):
    stream = StreamedSlices(windows_of(arrays, 4), CPU, batch_size=4, steps_per_epoch=len(arrays["row_key"]) // 4 + 1)
    with pytest.raises(RuntimeError, match=r"rank 0's split of the slices gave \d+ batches in epoch 0, expected"):
        list(stream.batches(maker(augment=False), 0))


class RecordedWindows:
    """`windows_of`, noting each epoch the stream starts to read; `fail_at` raises in that epoch's read."""

    def __init__(self, arrays, rows: int, fail_at: int | None = None) -> None:
        self.arrays, self.rows, self.fail_at = arrays, rows, fail_at
        self.started = {epoch: threading.Event() for epoch in range(4)}

    def __call__(self, epoch):
        self.started[epoch].set()
        if epoch == self.fail_at:
            raise OSError("s3://bucket/cache/part-0.parquet: connection reset")
        yield from windows_of(self.arrays, self.rows)(epoch)


def test_the_stream_reads_the_next_epoch_while_this_one_is_trained_and_stops_after_the_last(arrays):
    count = len(arrays["row_key"])
    windows = RecordedWindows(arrays, 5)
    stream = StreamedSlices(windows, CPU, batch_size=4, steps_per_epoch=count // 4, epochs=2)
    first_epoch = stream.batches(maker(augment=False), 0)
    for _ in range(count // 4):  # up to the last step of epoch 0, which is still running
        next(first_epoch)
    assert windows.started[1].wait(timeout=30), "epoch 1 is read while epoch 0's last step runs"
    assert list(first_epoch) == []
    reader = stream._reader
    last_epoch = list(stream.batches(maker(augment=False), 1))
    assert stream._reader is reader, "epoch 1 came from the reader that read ahead"
    reader._thread.join(timeout=30)
    assert not reader._thread.is_alive() and not windows.started[2].is_set(), "nothing read beyond the last epoch"
    fresh = StreamedSlices(windows_of(arrays, 5), CPU, batch_size=4, steps_per_epoch=count // 4, epochs=2)
    assert_batches_equal(last_epoch, list(fresh.batches(maker(augment=False), 1)))
    stream.close()
    fresh.close()


def test_an_epoch_asked_again_or_out_of_order_is_read_again_with_the_same_batches(arrays):
    count = len(arrays["row_key"])
    stream = StreamedSlices(windows_of(arrays, count), CPU, batch_size=4, steps_per_epoch=count // 4, epochs=3)
    device = DeviceResidentSlices(arrays, CPU, batch_size=4)
    for epoch in (1, 1, 0, 2):
        assert_batches_equal(list(stream.batches(maker(), epoch)), list(device.batches(maker(), epoch)))
    stream.close()
    assert stream._reader is None


def test_a_failed_read_is_raised_in_the_training_thread(arrays):
    count = len(arrays["row_key"])
    windows = RecordedWindows(arrays, 5, fail_at=1)
    stream = StreamedSlices(windows, CPU, batch_size=4, steps_per_epoch=count // 4, epochs=2)
    assert len(list(stream.batches(maker(augment=False), 0))) == count // 4
    with pytest.raises(OSError, match="part-0.parquet: connection reset"):
        list(stream.batches(maker(augment=False), 1))
    stream.close()


def test_closing_the_stream_mid_epoch_stops_its_reader(arrays):
    count = len(arrays["row_key"])
    stream = StreamedSlices(windows_of(arrays, 4), CPU, batch_size=4, steps_per_epoch=count // 4, epochs=50)
    next(stream.batches(maker(augment=False), 0))
    reader = stream._reader
    stream.close()
    assert not reader._thread.is_alive()


def test_read_only_slices_are_taken_as_they_are_without_a_warning():
    """Arrow hands the cache's slices over read-only; torch warns (once a process, so apart)."""
    code = """
import warnings
import numpy as np, torch
from lrc_ray.engine.input_path import DeviceResidentSlices
warnings.simplefilter("error", UserWarning)
arrays = {"image": np.zeros((4, 8, 8), np.uint8), "regions": np.ones((4, 8, 8), np.int16),
          "row_key": np.arange(4), "n_regions": np.full(4, 2)}
for values in arrays.values():
    values.flags.writeable = False
slices = DeviceResidentSlices(arrays, torch.device("cpu"), batch_size=2)
assert slices.slices["regions"].data_ptr() == arrays["regions"].ctypes.data, "no copy on the CPU"
"""
    taken = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert taken.returncode == 0, taken.stderr[-2000:]


def test_without_augmentation_each_view_is_the_slice_itself(arrays):
    batch = next(DeviceResidentSlices(arrays, CPU, batch_size=4).batches(maker(augment=False), 0))
    rows = epoch_permutation(len(arrays["row_key"]), 0, 0)[:4]
    assert torch.equal(batch["image1"][:, 0], torch.from_numpy(arrays["image"][rows]).float() / 255.0)
    assert torch.equal(batch["regions2"], torch.from_numpy(arrays["regions"][rows]).int())


def test_the_mode_is_chosen_by_the_bytes_the_slices_need(caplog):
    needed = 100 * 64 * 64 * 4
    with caplog.at_level("INFO", logger=input_path.__name__):
        assert choose_input_mode("auto", num_slices=100, size=64, free_bytes=2 * needed) == "device"
    assert "input mode device (auto)" in caplog.text
    assert choose_input_mode("auto", num_slices=100, size=64, free_bytes=needed) == "stream"
    assert choose_input_mode("stream", num_slices=100, size=64, free_bytes=10 * needed) == "stream"
    with pytest.raises(UserInputError, match=rf"pretrain.input_mode: device needs {needed} bytes .* only {needed} bytes are free"):
        choose_input_mode("device", num_slices=100, size=64, free_bytes=needed)


def test_free_memory_of_the_host_is_read():
    assert input_path.free_memory_bytes(CPU) > 2**20


def test_epoch_permutations_differ_by_epoch_and_part():
    first = epoch_permutation(50, 3, 0)
    assert sorted(first.tolist()) == list(range(50))
    assert np.array_equal(first, epoch_permutation(50, 3, 0))
    assert not np.array_equal(first, epoch_permutation(50, 3, 1))
    assert not np.array_equal(first, epoch_permutation(50, 3, 0, part=1))
