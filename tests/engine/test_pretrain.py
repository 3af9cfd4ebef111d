import math

import pytest
import torch

from lrc_ray.config import PretrainConfig
from lrc_ray.engine.pretrain import BatchLosses, LrcPretrainer, build_optimizer, pretrain_one_epoch
from lrc_ray.errors import TrainingError
from lrc_ray.models.networks import NetworkParams

NETWORK = NetworkParams(features=(4, 4, 8, 8, 16, 4), global_dim=8, global_hidden=16, local_dim=8)


@pytest.fixture
def batches(slice_table, pretrain_batches):
    return pretrain_batches(slice_table)


@pytest.fixture
def labelled_batches(slice_table, pretrain_batches):
    return pretrain_batches(slice_table, with_labels=True)


def _config(method: str, **kwargs) -> PretrainConfig:
    return PretrainConfig(method=method, batch_size=4, queue_size=16, regions_per_image=4, pixels_per_region=4, **kwargs)


@pytest.mark.parametrize(
    ("method", "terms"), [("global", {"global"}), ("lrc", {"local"}), ("global+lrc", {"global", "local"})]
)
def test_each_method_computes_its_loss_terms(batches, method, terms):
    torch.manual_seed(0)
    pretrainer = LrcPretrainer(_config(method), NETWORK)
    losses = pretrainer.batch_losses(batches[0])
    assert set(losses.terms) == terms
    assert torch.isfinite(losses.total) and losses.total.requires_grad
    expected = sum(losses.terms.values())  # default weights are 1
    assert losses.total.item() == pytest.approx(expected.item())


def test_weights_scale_the_terms(batches):
    torch.manual_seed(0)
    batch = batches[0]
    pretrainer = LrcPretrainer(_config("global+lrc", w_global=0.25, w_local=2.0), NETWORK)
    losses = pretrainer.batch_losses(batch)
    assert losses.total.item() == pytest.approx(0.25 * losses.terms["global"].item() + 2.0 * losses.terms["local"].item())


def test_the_global_branch_watches_how_often_a_view_finds_its_partner(batches):
    torch.manual_seed(0)
    pretrainer = LrcPretrainer(_config("global+lrc"), NETWORK)
    batch = batches[0]
    # Both views the same image: the momentum encoder starts as a copy of the online one, so each
    # query equals its partner's key and is nearest it.
    same_views = batch | {"image2": batch["image1"], "regions2": batch["regions1"]}
    assert pretrainer.batch_losses(same_views).watched["global_top1"].item() == 1.0
    metrics = pretrain_one_epoch(pretrainer, batches, build_optimizer(pretrainer, _config("global+lrc")), epoch=0,
                                 progress=False)
    assert 0.0 <= metrics["global_top1"] <= 1.0
    assert "global_top1" not in LrcPretrainer(_config("lrc"), NETWORK).batch_losses(batch).watched


def test_scratch_has_nothing_to_train():
    assert not LrcPretrainer(_config("scratch"), NETWORK).trains


def test_an_epoch_updates_weights_momentum_encoder_and_queue(batches):
    torch.manual_seed(0)
    pretrainer = LrcPretrainer(_config("global+lrc"), NETWORK)
    online_before = [p.detach().clone() for p in pretrainer.online.parameters()]
    momentum_before = [p.detach().clone() for p in pretrainer.momentum_network.parameters()]
    metrics = pretrain_one_epoch(
        pretrainer, batches, build_optimizer(pretrainer, _config("global+lrc")), epoch=0, progress=False,
    )
    assert metrics["steps"] == 3 and set(metrics) >= {"loss", "loss_global", "loss_local"}
    assert int(pretrainer.moco.queue_pointer) == (3 * 2 * 4) % 16, "both views' keys enqueued every step"
    online_moved = [not torch.equal(a, p) for a, p in zip(online_before, pretrainer.online.parameters())]
    momentum_moved = [not torch.equal(a, p) for a, p in zip(momentum_before, pretrainer.momentum_network.parameters())]
    assert any(online_moved) and any(momentum_moved)
    # The momentum encoder trails the online one: it moved less.
    online_step = sum((a - p).abs().sum() for a, p in zip(online_before, pretrainer.online.parameters()))
    momentum_step = sum((a - p).abs().sum() for a, p in zip(momentum_before, pretrainer.momentum_network.parameters()))
    assert momentum_step < online_step


def test_non_finite_loss_stops_the_run(batches):
    pretrainer = LrcPretrainer(_config("lrc"), NETWORK)
    nan = torch.tensor(float("nan"), requires_grad=True)
    pretrainer.batch_losses = lambda batch: BatchLosses(total=nan, terms={})
    with pytest.raises(TrainingError, match=r"epoch 0 steps 0-2: loss is nan; lower pretrain.lr"):
        pretrain_one_epoch(pretrainer, batches, build_optimizer(pretrainer, _config("lrc")),
                           epoch=0, progress=False)


@pytest.mark.parametrize(("method", "terms"), [("supervised", {"supervised"}), ("supervised+lrc", {"supervised", "local"})])
def test_supervised_methods_add_a_segmentation_loss(labelled_batches, method, terms):
    torch.manual_seed(0)
    config = _config(method, source_data_dir="source", w_supervised=0.5)
    pretrainer = LrcPretrainer(config, NETWORK, num_classes=10)
    batch = labelled_batches[0]
    assert batch["label1"].shape == (4, 32, 32) and not batch["label1"].is_floating_point()
    losses = pretrainer.batch_losses(batch)
    assert set(losses.terms) == terms
    expected = 0.5 * losses.terms["supervised"] + losses.terms.get("local", 0.0)
    assert losses.total.item() == pytest.approx(expected.item())
    optimizer = build_optimizer(pretrainer, config)
    head_weights = {id(p) for p in pretrainer.segmentation_head.parameters()}
    assert head_weights <= {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_supervised_methods_need_the_number_of_classes():
    with pytest.raises(ValueError, match="needs num_classes >= 2"):
        LrcPretrainer(_config("supervised", source_data_dir="source"), NETWORK)


def test_mixed_precision_epoch_keeps_the_losses_in_float32(batches):
    """The GPU path's bfloat16 autocast, run on CPU: the network in bfloat16, the losses in float32."""
    torch.manual_seed(0)
    pretrainer = LrcPretrainer(_config("global+lrc"), NETWORK)
    seen = []
    original = pretrainer.local_loss.forward
    pretrainer.local_loss.forward = lambda embeddings, ids: seen.append(embeddings.dtype) or original(embeddings, ids)
    metrics = pretrain_one_epoch(
        pretrainer, batches, build_optimizer(pretrainer, _config("global+lrc")), epoch=0,
        progress=False, autocast_dtype=torch.bfloat16,
    )
    assert seen and set(seen) == {torch.float32}
    assert math.isfinite(metrics["loss"]) and metrics["steps"] == 3
