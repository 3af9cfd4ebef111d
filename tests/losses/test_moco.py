"""MoCo v2 loss, queue and momentum update."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lrc_ray.losses import MoCoV2Loss, in_batch_top1, moco_infonce_loss, moco_logits, momentum_update


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=1, keepdim=True)


def test_logits_put_the_positive_first():
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    queue = unit_rows(torch.randn(5, 4, generator=generator))
    logits = moco_logits(query, key, queue, 0.2)
    assert logits.shape == (3, 6)
    q, k = unit_rows(query), unit_rows(key)
    for b in range(3):
        expected = [q[b] @ k[b]] + [q[b] @ queue[j] for j in range(5)]
        torch.testing.assert_close(logits[b], torch.stack(expected) / 0.2)


@pytest.mark.parametrize("temperature", [0.2, 0.05])
def test_loss_matches_naive_softmax(temperature):
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(4, 8, generator=generator, dtype=torch.float64)
    key = torch.randn(4, 8, generator=generator, dtype=torch.float64)
    queue = unit_rows(torch.randn(16, 8, generator=generator, dtype=torch.float64))
    logits = moco_logits(query, key, queue, temperature)
    expected = -torch.stack([torch.log(torch.exp(row[0]) / torch.exp(row).sum()) for row in logits]).mean()
    torch.testing.assert_close(moco_infonce_loss(query, key, queue, temperature), expected)


def test_exact_value_orthogonal_queue():
    # q = k = e1 and a queue of Q vectors orthogonal to e1: loss = log(e^{1/t} + Q) - 1/t.
    t, queue_size = 0.2, 3
    query = torch.tensor([[2.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    queue = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    expected = math.log(math.exp(1 / t) + queue_size) - 1 / t
    assert moco_infonce_loss(query, query.clone(), queue, t).item() == pytest.approx(expected, rel=1e-12)


def test_in_batch_top1_counts_the_queries_whose_own_key_is_strictly_nearest():
    keys = torch.eye(4) * 3.0  # normalised inside
    assert in_batch_top1(keys + 0.1, keys).item() == 1.0
    swapped = keys[[0, 1, 3, 2]]  # queries 2 and 3 are nearest the other's key
    assert in_batch_top1(swapped, keys).item() == 0.5
    # A collapsed branch: every slice the same embedding. A tie is no hit, so it scores 0, not 1/B.
    same = torch.ones(4, 8)
    assert in_batch_top1(same, same).item() == 0.0


def test_key_gets_no_gradient_and_low_temperature_is_finite():
    loss_module = MoCoV2Loss(dim=8, queue_size=32, temperature=0.05)
    query = torch.randn(4, 8, requires_grad=True)
    key = (query.detach() + 1e-4 * torch.randn(4, 8)).requires_grad_()
    loss = loss_module(query, key)
    loss_module.dequeue_and_enqueue(key)  # before backward: the forward used a copy of the queue
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(query.grad).all()
    assert key.grad is None


def test_queue_is_a_ring_buffer():
    dim, queue_size = 2, 5
    initial = unit_rows(torch.randn(queue_size, dim))
    loss_module = MoCoV2Loss(dim=dim, queue_size=queue_size, initial_queue=initial)
    expected = [row for row in initial]
    pointer = 0
    for batch in (3, 3, 2, 7, 1):
        keys = torch.randn(batch, dim)
        loss_module.dequeue_and_enqueue(keys)
        for row in unit_rows(keys):  # a plain Python ring buffer, one key at a time
            expected[pointer] = row
            pointer = (pointer + 1) % queue_size
        torch.testing.assert_close(loss_module.queue, torch.stack(expected))
        assert loss_module.queue_pointer.item() == pointer


def test_initial_queue_is_seeded_and_normalised():
    first, again, other = MoCoV2Loss(4, 10, seed=3), MoCoV2Loss(4, 10, seed=3), MoCoV2Loss(4, 10, seed=4)
    assert torch.equal(first.queue, again.queue) and not torch.equal(first.queue, other.queue)
    torch.testing.assert_close(first.queue.norm(dim=1), torch.ones(10))
    assert {name for name, _ in first.named_buffers()} == {"queue", "queue_pointer"}
    given = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(MoCoV2Loss(2, 1, initial_queue=given).queue, torch.tensor([[0.6, 0.8]]))


def test_momentum_update_formula():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    momentum_model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    online.train()(torch.randn(8, 3))  # moves the running statistics and num_batches_tracked
    before = {name: tensor.clone() for name, tensor in momentum_model.state_dict().items()}
    momentum_update(online, momentum_model, 0.9)
    for name, tensor in momentum_model.state_dict().items():
        if tensor.dtype.is_floating_point:
            torch.testing.assert_close(tensor, 0.9 * before[name] + 0.1 * online.state_dict()[name])
        else:
            assert torch.equal(tensor, online.state_dict()[name])
    assert momentum_model.state_dict()["1.num_batches_tracked"].item() == 1
    momentum_update(online, momentum_model, 0.0)
    for name, tensor in momentum_model.state_dict().items():
        assert torch.equal(tensor, online.state_dict()[name])


def test_bad_arguments_raise():
    for kwargs, match in (
        (dict(dim=0), "dim"),
        (dict(dim=4, queue_size=0), "queue_size"),
        (dict(dim=4, temperature=0.0), "temperature"),
        (dict(dim=4, queue_size=3, initial_queue=torch.zeros(3, 5)), r"\(3, 4\).*\(3, 5\)"),
    ):
        with pytest.raises(ValueError, match=match):
            MoCoV2Loss(**kwargs)
    loss_module = MoCoV2Loss(dim=4, queue_size=8)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(3, 4\)"):
        loss_module(torch.randn(2, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(8, 4\)"):
        loss_module(torch.randn(2, 5), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\(B, 4\).*\(2, 5\)"):
        loss_module.dequeue_and_enqueue(torch.randn(2, 5))
    for momentum in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="momentum"):
            momentum_update(nn.Linear(2, 2), nn.Linear(2, 2), momentum)
    with pytest.raises(ValueError, match="parameters"):
        momentum_update(nn.Linear(2, 2), nn.Linear(2, 3), 0.9)


# Distributed: the queue stays identical on every rank ---------------------------------

WORLD_SIZE = 2


def distributed_keys():
    return torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(11))  # 3 steps, global batch 6, D 4


def _queue_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        loss_module = MoCoV2Loss(dim=4, queue_size=8, seed=0)
        for step_keys in distributed_keys():
            loss_module.dequeue_and_enqueue(step_keys[rank * 3 : rank * 3 + 3])
        torch.save({"queue": loss_module.queue, "pointer": loss_module.queue_pointer}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_queue_matches_single_process(tmp_path):
    mp.spawn(_queue_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    single = MoCoV2Loss(dim=4, queue_size=8, seed=0)
    for step_keys in distributed_keys():
        single.dequeue_and_enqueue(step_keys)
    for result in ranks:
        assert torch.equal(result["queue"], single.queue)
        assert result["pointer"].item() == single.queue_pointer.item() == (3 * 6) % 8
