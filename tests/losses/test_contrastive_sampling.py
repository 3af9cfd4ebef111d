"""Contrastive sampling loss: naive loop, exact values, symmetry, distributed equivalence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lrc_ray.losses import ContrastiveSamplingLoss, contrastive_sampling_loss
from lrc_ray.losses import contrastive_sampling as contrastive_sampling_module


def naive_loss(embeddings: torch.Tensor, region_ids: torch.Tensor, temperature: float, negatives: str) -> torch.Tensor:
    """Section 6 written anchor by anchor, exp then log, in float64 (fine at these sizes)."""
    z = embeddings.double() / embeddings.double().norm(dim=-1, keepdim=True)
    batch, num_samples = region_ids.shape
    samples = [(b, k) for b in range(batch) for k in range(num_samples) if region_ids[b, k] >= 0]
    terms = []
    for b, i in samples:
        partners = [(c, a) for c, a in samples if (c, a) != (b, i) and (negatives == "batch" or c == b)]
        positives = [(c, p) for c, p in partners if c == b and region_ids[c, p] == region_ids[b, i]]
        if not positives:
            continue
        denominator = sum(torch.exp(z[b, i] @ z[c, a] / temperature) for c, a in partners)
        log_probs = [torch.log(torch.exp(z[b, i] @ z[c, p] / temperature) / denominator) for c, p in positives]
        terms.append(-sum(log_probs) / len(positives))
    return torch.stack(terms).mean()


def value_and_grad(loss_fn, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = embeddings.detach().requires_grad_()
    value = loss_fn(leaf)
    value.backward()
    return value.detach(), leaf.grad


def random_inputs(seed: int, batch: int = 3, num_samples: int = 12, dim: int = 5, num_regions: int = 3):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, num_samples, dim, generator=generator, dtype=torch.float64)
    region_ids = torch.randint(-1, num_regions, (batch, num_samples), generator=generator)
    return embeddings, region_ids


# 0.02 is below _MIN_UNSHIFTED_TEMPERATURE: the general (row-max shifted) path.
@pytest.mark.parametrize("temperature", [0.5, 0.05, 0.02])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_loop(temperature, seed):
    embeddings, region_ids = random_inputs(seed)
    assert (region_ids < 0).any()
    expected, expected_grad = value_and_grad(lambda z: naive_loss(z, region_ids, temperature, "image"), embeddings)
    actual, actual_grad = value_and_grad(lambda z: contrastive_sampling_loss(z, region_ids, temperature), embeddings)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual_grad, expected_grad)
    module = ContrastiveSamplingLoss(temperature, negatives="image")
    torch.testing.assert_close(module(embeddings, region_ids), expected)


@pytest.mark.parametrize("temperature", [0.5, 0.05])
@pytest.mark.parametrize("seed", [0, 1])
def test_batch_negatives_match_naive_loop(temperature, seed):
    embeddings, region_ids = random_inputs(seed)
    module = ContrastiveSamplingLoss(temperature, negatives="batch")
    expected, expected_grad = value_and_grad(lambda z: naive_loss(z, region_ids, temperature, "batch"), embeddings)
    actual, actual_grad = value_and_grad(lambda z: module(z, region_ids), embeddings)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual_grad, expected_grad)


@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_gradcheck(negatives):
    embeddings, region_ids = random_inputs(9, batch=2, num_samples=6, dim=3)
    loss = ContrastiveSamplingLoss(0.3, negatives=negatives)
    assert torch.autograd.gradcheck(lambda z: loss(z, region_ids), embeddings.requires_grad_())


@pytest.mark.parametrize("chunk_elements", [None, 1])
def test_hand_written_image_path_matches_autograd_path(monkeypatch, chunk_elements):
    # The hand-written forward and backward (t >= _MIN_UNSHIFTED_TEMPERATURE) against the
    # autograd path used below that temperature: a zero and a tiny (clamped by
    # F.normalize) embedding, two ignored ids, an image with one valid sample, an upstream
    # gradient other than 1, and (chunk_elements=1) one image per chunk.
    embeddings, region_ids = random_inputs(11, batch=4, num_samples=10)
    embeddings[0, 0] = 0.0
    embeddings[0, 1] = 1e-14
    region_ids[1, 2] = -2
    region_ids[3, 1:] = -1
    if chunk_elements is not None:
        monkeypatch.setattr(contrastive_sampling_module, "_CHUNK_ELEMENTS", chunk_elements)

    def loss_fn(z):
        return 3 * contrastive_sampling_loss(z, region_ids, 0.1)

    fast, fast_grad = value_and_grad(loss_fn, embeddings)
    monkeypatch.setattr(contrastive_sampling_module, "_MIN_UNSHIFTED_TEMPERATURE", math.inf)
    general, general_grad = value_and_grad(loss_fn, embeddings)
    torch.testing.assert_close(fast, general)
    torch.testing.assert_close(fast_grad, general_grad)
    assert torch.equal(fast_grad[3, 1:], torch.zeros_like(fast_grad[3, 1:]))


def test_batch_negatives_of_one_image_equal_image_negatives():
    embeddings, region_ids = random_inputs(3, batch=1)
    torch.testing.assert_close(
        ContrastiveSamplingLoss(0.2, negatives="batch")(embeddings, region_ids),
        contrastive_sampling_loss(embeddings, region_ids, 0.2),
    )


@pytest.mark.parametrize("temperature", [0.5, 0.05])
def test_exact_value_two_orthogonal_regions(temperature):
    # Region 0 along e1, region 1 along e2 (unnormalised, to check normalisation), one
    # ignored sample. Each anchor: positive logit 1/t, negatives two logits 0, so
    # l = log(e^{1/t} + 2) - 1/t = log(1 + 2 e^{-1/t}).
    embeddings = torch.tensor([[[3.0, 0.0], [0.5, 0.0], [0.0, 2.0], [0.0, 7.0], [1.0, 1.0]]], dtype=torch.float64)
    region_ids = torch.tensor([[0, 0, 1, 1, -1]])
    expected = math.log(1 + 2 * math.exp(-1 / temperature))
    assert contrastive_sampling_loss(embeddings, region_ids, temperature).item() == pytest.approx(expected, rel=1e-12)


def test_exact_value_is_mean_over_anchors_not_over_images():
    t = 0.5
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    # Image 0: regions [0, 0, 0, 1]. The three region-0 anchors each have 2 positives
    # (logit 1/t) and one negative (0): l = log(2 e^{1/t} + 1) - 1/t = log(2 + e^{-1/t});
    # the region-1 sample has no positive and is no anchor.
    # Image 1: regions [0, 0, 1, 1]: four anchors with l = log(1 + 2 e^{-1/t}).
    embeddings = torch.tensor([[e1, e1, e1, e2], [e1, e1, e2, e2]], dtype=torch.float64)
    region_ids = torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1]])
    first, second = math.log(2 + math.exp(-1 / t)), math.log(1 + 2 * math.exp(-1 / t))
    expected = (3 * first + 4 * second) / 7
    assert contrastive_sampling_loss(embeddings, region_ids, t).item() == pytest.approx(expected, rel=1e-12)
    assert expected != pytest.approx((first + second) / 2)


@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_swapping_views_keeps_loss(negatives):
    # Sampled layout [view1 samples, view2 samples]; swapping the halves (and any
    # permutation of samples within an image) must not change the loss.
    embeddings, region_ids = random_inputs(4, num_samples=16)
    half = region_ids.shape[1] // 2
    swap = torch.cat([torch.arange(half, 2 * half), torch.arange(half)])
    loss = ContrastiveSamplingLoss(0.1, negatives=negatives)
    torch.testing.assert_close(loss(embeddings[:, swap], region_ids[:, swap]), loss(embeddings, region_ids))
    shuffle = torch.randperm(2 * half, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss(embeddings[:, shuffle], region_ids[:, shuffle]), loss(embeddings, region_ids))


@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_low_temperature_near_identical_embeddings_is_finite(negatives):
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(1, 1, 16, generator=generator)
    embeddings = (base + 1e-4 * torch.randn(2, 64, 16, generator=generator)).requires_grad_()
    region_ids = torch.randint(0, 4, (2, 64), generator=generator)
    region_ids[0, 1:] = -1  # image 0: one lone sample, no valid partner at all
    loss = ContrastiveSamplingLoss(0.05, negatives=negatives)(embeddings, region_ids)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(embeddings.grad).all()
    if negatives == "image":  # the lone sample is neither anchor nor candidate anywhere
        assert torch.equal(embeddings.grad[0], torch.zeros_like(embeddings.grad[0]))


def test_float32_low_temperature_matches_float64():
    embeddings, region_ids = random_inputs(6, num_samples=32)
    torch.testing.assert_close(
        contrastive_sampling_loss(embeddings.float(), region_ids, 0.05),
        contrastive_sampling_loss(embeddings, region_ids, 0.05).float(),
    )


@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_bfloat16_is_close_and_gradients_keep_their_dtype(negatives):
    embeddings, region_ids = random_inputs(8, num_samples=32)
    low = embeddings.bfloat16().requires_grad_()
    loss = ContrastiveSamplingLoss(0.1, negatives=negatives)
    actual = loss(low, region_ids)
    actual.backward()
    assert low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(actual.double(), loss(embeddings, region_ids), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_no_positives_gives_zero_with_grad(negatives):
    embeddings = torch.randn(2, 4, 3, requires_grad=True)
    region_ids = torch.tensor([[0, 1, 2, -1], [3, -1, -1, -1]])
    loss = ContrastiveSamplingLoss(0.1, negatives=negatives)(embeddings, region_ids)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


def test_bad_shapes_raise_with_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 4, 3\).*\(2, 5\)"):
        contrastive_sampling_loss(torch.randn(2, 4, 3), torch.zeros(2, 5, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 4\)"):
        ContrastiveSamplingLoss()(torch.randn(2, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        ContrastiveSamplingLoss()(torch.randn(2, 4, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="float"):
        ContrastiveSamplingLoss()(torch.zeros(2, 4, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("temperature", [0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_temperature_raises(temperature):
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveSamplingLoss(temperature)
    with pytest.raises(ValueError, match="temperature"):
        contrastive_sampling_loss(torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), temperature)


def test_unknown_negatives_suggests_the_closest():
    with pytest.raises(ValueError, match="Did you mean 'batch'"):
        ContrastiveSamplingLoss(negatives="batches")
    with pytest.raises(ValueError, match="'image', 'batch'"):
        ContrastiveSamplingLoss(negatives="xyz")


# Distributed equivalence -------------------------------------------------------------

TEMPERATURE = 0.1
WORLD_SIZE = 2


def distributed_inputs():
    """Global batch of 4 images; rank 0's images have far fewer valid samples (unequal anchor counts)."""
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(4, 24, 6, generator=generator, dtype=torch.float64)
    region_ids = torch.randint(0, 4, (4, 24), generator=generator)
    region_ids[:2, 8:] = -1
    # A linear projection shared by all ranks stands in for the network DDP replicates.
    projection = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    return features, region_ids, projection


def loss_and_gradients(negatives, features, region_ids, projection):
    weight = projection.clone().requires_grad_()
    embeddings = features @ weight
    embeddings.retain_grad()
    loss = ContrastiveSamplingLoss(TEMPERATURE, negatives=negatives)(embeddings, region_ids)
    loss.backward()
    return loss.detach(), embeddings.grad, weight.grad


def _distributed_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        features, region_ids, projection = distributed_inputs()
        local = slice(rank * 2, rank * 2 + 2)
        results = {}
        for negatives in ("image", "batch"):
            loss, embedding_grad, weight_grad = loss_and_gradients(
                negatives, features[local], region_ids[local], projection
            )
            dist.all_reduce(weight_grad)  # DDP averages parameter gradients over ranks
            results[negatives] = (loss, embedding_grad, weight_grad / WORLD_SIZE)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    mp.spawn(_distributed_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    features, region_ids, projection = distributed_inputs()
    for negatives in ("image", "batch"):
        loss, embedding_grad, weight_grad = loss_and_gradients(negatives, features, region_ids, projection)
        rank_losses = torch.stack([ranks[r][negatives][0] for r in range(WORLD_SIZE)])
        # The rank losses differ (unequal anchor counts) but average to the global loss.
        assert not torch.allclose(rank_losses[0], rank_losses[1])
        torch.testing.assert_close(rank_losses.mean(), loss)
        for rank in range(WORLD_SIZE):
            torch.testing.assert_close(ranks[rank][negatives][2], weight_grad)
        # dL/d(local embeddings) on a rank, averaged as DDP does, is the global gradient.
        rank_embedding_grads = torch.cat([ranks[r][negatives][1] for r in range(WORLD_SIZE)]) / WORLD_SIZE
        torch.testing.assert_close(rank_embedding_grads, embedding_grad)
    assert not torch.allclose(
        ranks[0]["image"][0], ranks[0]["batch"][0]
    ), "batch negatives must differ from image negatives"
