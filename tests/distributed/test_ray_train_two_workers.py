"""Ray Train with 2 gloo workers on a local Ray of 3 logical CPUs (2 workers + 1 for Ray Data reads):
every pre-training setting reaches the workers, both input modes end (no hang) whatever
`min_regions` drops, and the device mode's losses are the in-process loop's at twice the batch."""

from __future__ import annotations

import pytest

from lrc_ray import api
from lrc_ray.config import RunConfig
from lrc_ray.distributed.runtime import ray_session
from lrc_ray.engine.checkpoint import load_checkpoint
from lrc_ray.superpixels.cache import read_entry_table

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def three_cpu_ray():
    import ray

    assert not ray.is_initialized(), "a previous test left Ray running"
    with ray_session(num_cpus=3):
        yield ray


@pytest.fixture(scope="module")
def config(three_cpu_ray, tiny_dataset, tiny_network, tmp_path_factory) -> RunConfig:
    config = RunConfig().replace(
        data={"data_dir": str(tiny_dataset), "cache_root": str(tmp_path_factory.mktemp("cache")), "size": 48,
              "validation_cases": 1},
        network=tiny_network,
        pretrain={"method": "global+lrc", "epochs": 2, "batch_size": 2, "queue_size": 16},
    )
    api.superpixels_for(config.data)
    return config


def _losses(checkpoint) -> list[float]:
    return [entry["loss"] for entry in load_checkpoint(checkpoint)["history"]]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("mode", ["device", "stream"])
def test_two_workers_end_whatever_min_regions_drops(config, tmp_path, mode):
    regions = read_entry_table(api.find_superpixels(config.data), columns=["n_regions"]).column("n_regions").to_numpy()
    # A threshold that drops slices, and an odd number of them kept: the ranks' shares must still be equal.
    threshold = next(t for t in sorted(set(regions.tolist())) if t > 1 and (regions >= t).sum() % 2 == 1)
    chosen = config.replace(pretrain={"min_regions": threshold, "input_mode": mode})
    data = api.pretraining_data(chosen)
    assert 0 < data.num_slices < len(regions)
    checkpoint = api.pretrain(config=chosen, out_dir=tmp_path, workers=2)
    history = load_checkpoint(checkpoint)["history"]
    assert [entry["epoch"] for entry in history] == [1, 2]
    assert {entry["input_mode"] for entry in history} == {mode}
    # device: kept // (2 ranks x batch 2) global batches; stream: each rank's equal half, by batches of 2.
    assert history[0]["steps"] == data.num_slices // 2 // 2


@pytest.mark.timeout(400)
def test_two_workers_lose_what_one_process_with_twice_the_batch_loses(config, tmp_path):
    chosen = config.replace(pretrain={"min_regions": 3, "input_mode": "device"})
    in_process = _losses(api.pretrain(config=chosen.replace(pretrain={"batch_size": 4}), out_dir=tmp_path / "one",
                                      progress=False))
    two_workers = _losses(api.pretrain(config=chosen, out_dir=tmp_path / "two", workers=2))
    assert two_workers == pytest.approx(in_process, rel=1e-3)
