"""The one pre-training loop (`engine.pretrain_loop`): data-parallel equivalence, the speed options."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from lrc_ray.config import RunConfig
from lrc_ray.data.shard import compact_slices
from lrc_ray.engine.pretrain_loop import (
    DDP_OPTIONS, Surroundings, run_pretraining, slices_from_arrays, warn_if_global_branch_collapsed,
)
from lrc_ray.superpixels.selection import RowSelection

TINY = {"features": [4, 4, 8, 8, 16, 4], "global_dim": 8, "global_hidden": 16, "local_dim": 8}


def config_for(batch_size: int, **pretrain) -> RunConfig:
    return RunConfig().replace(
        data={"size": 32}, network=TINY,
        pretrain={"method": "global+lrc", "epochs": 2, "batch_size": batch_size, "queue_size": 16,
                  "regions_per_image": 4, "pixels_per_region": 4, "input_mode": "device", **pretrain},
    )


class InMemory(Surroundings):
    """Rank `rank` of `world_size` gloo processes (or one process), over arrays in memory."""

    def __init__(self, arrays, *, rank: int = 0, world_size: int = 1) -> None:
        self.arrays, self.rank, self.world_size = arrays, rank, world_size
        self.history: list[dict] = []

    def slices(self, config, *, with_labels):
        return slices_from_arrays(self.arrays, config, self, with_labels=with_labels)

    def prepare(self, pretrainer):
        if self.world_size == 1:
            return pretrainer
        return DistributedDataParallel(pretrainer, **DDP_OPTIONS)  # as a Ray Train worker wraps it

    def report(self, metrics, state):
        self.history.append(metrics)


def _rank_losses(rank: int, world_size: int, init_file: str, arrays, batch_size: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        where = InMemory(arrays, rank=rank, world_size=world_size)
        run_pretraining(config_for(batch_size), where)
        results[rank] = [entry["loss"] for entry in where.history]
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def arrays(slice_table):
    return compact_slices(slice_table, RowSelection(min_regions=2))


@pytest.mark.slow
def test_two_gloo_workers_follow_one_worker_with_twice_the_batch(arrays):
    one = InMemory(arrays)
    torch.set_num_threads(1)
    run_pretraining(config_for(4), one)
    with tempfile.TemporaryDirectory() as directory, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_losses, args=(2, os.path.join(directory, "init"), arrays, 2, results), nprocs=2, join=True)
        two = dict(results)
    expected = [entry["loss"] for entry in one.history]
    assert len(expected) == 2 and all(math.isfinite(loss) for loss in expected)
    # Both ranks report the mean over ranks; each equals the one-worker loss of the same global batches.
    for rank in (0, 1):
        assert two[rank] == pytest.approx(expected, rel=1e-4)


def test_the_speed_options_give_the_same_loss(arrays):
    """channels_last changes the memory layout only; bfloat16 autocast (on the CPU here) rounds
    the network's arithmetic, so its loss is close, not equal."""
    def first_epoch_loss(**options) -> float:
        where = InMemory(arrays)
        run_pretraining(config_for(4, epochs=1, **options), where)
        return where.history[0]["loss"]

    reference = first_epoch_loss()
    assert first_epoch_loss(channels_last=True) == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize(("metrics", "batch_size", "warned"), [
    ({"epoch": 3, "global_top1": 0.10}, 16, True),  # chance 1/16 = 0.06: at most twice that
    ({"epoch": 3, "global_top1": 0.40}, 16, False),
    ({"epoch": 3, "loss": 1.0}, 16, False),  # a method without the global branch
    ({"epoch": 3, "global_top1": 0.50}, 2, False),  # chance 0.5: too near 1 to tell
])
def test_a_collapsed_global_branch_is_warned_about(caplog, metrics, batch_size, warned):
    with caplog.at_level("WARNING", logger="lrc_ray.engine.pretrain_loop"):
        warn_if_global_branch_collapsed(metrics, batch_size=batch_size)
    messages = [record.getMessage() for record in caplog.records]
    assert bool(messages) == warned
    if warned:
        assert "epoch 2: the global (MoCo) branch has collapsed" in messages[0]
        assert "0.10 of the time, chance 0.06 (global_top1)" in messages[0]
