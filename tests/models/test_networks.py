"""Shape tables, argument checks, backbone loading and gradient flow of lrc_ray.models."""

from __future__ import annotations

import re

import pytest
import torch

from lrc_ray.errors import UserInputError
from lrc_ray.models import (
    EncoderDecoder,
    GlobalProjectionHead,
    LocalProjectionHead,
    LrcNetwork,
    NetworkParams,
    SegmentationHead,
    SegmentationNetwork,
    build_lrc_network,
    build_segmentation_network,
)

TINY = (4, 4, 8, 8, 16, 4)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny convolutions run ~100x slower when intra-op threads fight over one CPU core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

TINY_PARAMS = dict(features=TINY, global_dim=8, global_hidden=12, local_dim=6)


def tiny_params(**changes) -> NetworkParams:
    return NetworkParams(**{**TINY_PARAMS, **changes})


# (params kwargs, in_channels, input shape, expected bottleneck shape, expected decoder shape)
ENCODER_DECODER_CASES = [
    (dict(features=TINY), 1, (2, 1, 32, 32), (2, 16, 2, 2), (2, 4, 32, 32)),
    (dict(features=TINY), 1, (2, 1, 48, 64), (2, 16, 3, 4), (2, 4, 48, 64)),
    (dict(features=(3, 5, 6, 7, 9, 2), norm="batch"), 1, (2, 1, 32, 32), (2, 9, 2, 2), (2, 2, 32, 32)),
    (dict(features=[4, 4, 8, 8, 16, 4], dropout=0.2), 2, (2, 2, 48, 64), (2, 16, 3, 4), (2, 4, 48, 64)),
]


@pytest.mark.parametrize("kwargs, in_channels, input_shape, bottleneck_shape, decoder_shape", ENCODER_DECODER_CASES)
def test_encoder_decoder_shapes(kwargs, in_channels, input_shape, bottleneck_shape, decoder_shape):
    network = EncoderDecoder(NetworkParams(**kwargs), in_channels=in_channels)
    features = network(torch.rand(input_shape))
    assert features.bottleneck.shape == bottleneck_shape
    assert features.decoder.shape == decoder_shape
    assert (network.bottleneck_channels, network.decoder_channels) == (bottleneck_shape[1], decoder_shape[1])


def test_encoder_decoder_reuses_basicunet_stages_without_final_conv():
    names = {name.split(".")[0] for name in EncoderDecoder(tiny_params()).state_dict()}
    assert names == {"conv_0", "down_1", "down_2", "down_3", "down_4", "upcat_4", "upcat_3", "upcat_2", "upcat_1"}


# (head class, kwargs, input shape, expected shape)
HEAD_CASES = [
    (GlobalProjectionHead, dict(in_channels=16, hidden_dim=12, out_dim=8), (2, 16, 2, 2), (2, 8)),
    (GlobalProjectionHead, dict(in_channels=3, hidden_dim=1, out_dim=5), (2, 3, 3, 4), (2, 5)),
    (LocalProjectionHead, dict(in_channels=4, out_dim=6), (2, 4, 32, 32), (2, 6, 32, 32)),
    (LocalProjectionHead, dict(in_channels=4, out_dim=1), (2, 4, 48, 64), (2, 1, 48, 64)),
    (SegmentationHead, dict(in_channels=4, num_classes=3), (2, 4, 32, 32), (2, 3, 32, 32)),
    (SegmentationHead, dict(in_channels=2, num_classes=1), (2, 2, 48, 64), (2, 1, 48, 64)),
]


@pytest.mark.parametrize("head_class, kwargs, input_shape, expected_shape", HEAD_CASES)
def test_head_shapes(head_class, kwargs, input_shape, expected_shape):
    assert head_class(**kwargs)(torch.rand(input_shape)).shape == expected_shape


@pytest.mark.parametrize(
    "head_class, kwargs",
    [
        (GlobalProjectionHead, dict(in_channels=0, hidden_dim=4, out_dim=4)),
        (GlobalProjectionHead, dict(in_channels=4, hidden_dim=-1, out_dim=4)),
        (LocalProjectionHead, dict(in_channels=4, out_dim=2.5)),
        (SegmentationHead, dict(in_channels=4, num_classes=0)),
    ],
)
def test_head_bad_arguments_raise(head_class, kwargs):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        head_class(**kwargs)


@pytest.mark.parametrize(
    "head",
    [GlobalProjectionHead(4, 4, 4), LocalProjectionHead(4, 4), SegmentationHead(4, 2)],
    ids=lambda head: type(head).__name__,
)
def test_head_wrong_input_shape_raises_with_shape(head):
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 8, 8\)"):
        head(torch.rand(2, 3, 8, 8))


# (params kwargs, input shape, expected global shape, expected local shape)
LRC_CASES = [
    (TINY_PARAMS, (2, 1, 32, 32), (2, 8), (2, 6, 32, 32)),
    ({**TINY_PARAMS, "norm": "batch", "local_dim": 3}, (2, 1, 48, 64), (2, 8), (2, 3, 48, 64)),
]


@pytest.mark.parametrize("kwargs, input_shape, global_shape, local_shape", LRC_CASES)
def test_lrc_network_shapes_and_unit_local_norm(kwargs, input_shape, global_shape, local_shape):
    outputs = build_lrc_network(NetworkParams(**kwargs))(torch.rand(input_shape))
    assert outputs.global_embedding.shape == global_shape
    assert outputs.local_embedding.shape == local_shape
    assert outputs.features.decoder.shape[2:] == input_shape[2:]
    norms = outputs.local_embedding.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


# (params kwargs, num_classes, input shape, expected logits shape)
SEGMENTATION_CASES = [
    (TINY_PARAMS, 3, (2, 1, 32, 32), (2, 3, 32, 32)),
    ({**TINY_PARAMS, "features": (4, 4, 8, 8, 16, 5)}, 14, (2, 1, 48, 64), (2, 14, 48, 64)),
]


@pytest.mark.parametrize("kwargs, num_classes, input_shape, expected_shape", SEGMENTATION_CASES)
def test_segmentation_network_shapes(kwargs, num_classes, input_shape, expected_shape):
    network = build_segmentation_network(NetworkParams(**kwargs), num_classes)
    assert network(torch.rand(input_shape)).shape == expected_shape


def test_network_params_defaults_are_valid_and_lists_become_tuples():
    assert NetworkParams().features == (16, 16, 32, 64, 128, 16)
    params = NetworkParams(features=[4, 4, 8, 8, 16, 4])
    assert params.features == TINY
    assert hash(params) == hash(tiny_params(global_dim=128, global_hidden=512, local_dim=128))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(features=(4, 4, 8, 8, 16)), r"network\.features must be 6 integers"),
        (dict(features=(4, 4, 8, 8, 16, 4, 4)), r"network\.features must be 6 integers"),
        (dict(features=(4, 0, 8, 8, 16, 4)), r"network\.features must be 6 integers"),
        (dict(features=(4, 4, 8.0, 8, 16, 4)), r"network\.features must be 6 integers"),
        (dict(features="448816"), r"network\.features must be 6 integers"),
        (dict(features=(4, 4, 8, 1, 16, 4)), r"network\.features\[2:5\] must be >= 2"),
        (dict(global_dim=-1), r"network\.global_dim must be an integer >= 1"),
        (dict(global_hidden=0), r"network\.global_hidden must be an integer >= 1"),
        (dict(local_dim=-128), r"network\.local_dim must be an integer >= 1"),
        (dict(local_dim=True), r"network\.local_dim must be an integer >= 1"),
        (dict(norm="instanse"), r"network\.norm must be one of .* \(did you mean 'instance'\?\)"),
        (dict(norm="group"), r"network\.norm must be one of \['batch', 'instance'\], got 'group'$"),
        (dict(dropout=1.0), r"network\.dropout must be a number in \[0, 1\)"),
        (dict(dropout=-0.1), r"network\.dropout must be a number in \[0, 1\)"),
        (dict(dropout=float("nan")), r"network\.dropout must be a number in \[0, 1\)"),
    ],
)
def test_network_params_bad_values_raise(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        NetworkParams(**kwargs)


@pytest.mark.parametrize(
    "input_shape",
    [(2, 1, 40, 32), (2, 1, 32, 24), (2, 1, 0, 32), (2, 2, 32, 32), (1, 32, 32)],
)
def test_bad_input_shape_raises_naming_the_shape(input_shape):
    network = LrcNetwork(tiny_params())
    with pytest.raises(ValueError, match=re.escape(f"multiples of 16, got shape {tuple(input_shape)}")):
        network(torch.rand(input_shape))


@pytest.mark.parametrize("in_channels", [0, -1, 1.5])
def test_bad_in_channels_raise(in_channels):
    with pytest.raises(ValueError, match="in_channels must be an integer >= 1"):
        EncoderDecoder(tiny_params(), in_channels=in_channels)


def test_bad_num_classes_raise():
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        SegmentationNetwork(tiny_params(), num_classes=0)


def test_load_backbone_state_round_trip_matches_exactly():
    torch.manual_seed(0)
    pretrained = LrcNetwork(tiny_params()).eval()
    torch.manual_seed(1)
    segmentation = SegmentationNetwork(tiny_params(), num_classes=3).eval()
    head_before = {key: value.clone() for key, value in segmentation.segmentation_head.state_dict().items()}
    image = torch.rand(2, 1, 32, 32)
    assert not torch.equal(segmentation.backbone(image).decoder, pretrained.backbone(image).decoder)

    segmentation.load_backbone_state(pretrained.state_dict())

    with torch.no_grad():
        loaded, original = segmentation.backbone(image), pretrained.backbone(image)
    assert torch.equal(loaded.decoder, original.decoder)
    assert torch.equal(loaded.bottleneck, original.bottleneck)
    for key, value in segmentation.segmentation_head.state_dict().items():
        assert torch.equal(value, head_before[key])


@pytest.mark.parametrize(
    "pretrained_changes, message",
    [
        (
            dict(features=(4, 4, 8, 8, 32, 4)),
            r"^checkpoint: backbone does not match network\.features=\(4, 4, 8, 8, 16, 4\), network\.norm='instance': "
            r"shape mismatch for backbone\.down_4\.convs\.conv_0\.conv\.weight \(checkpoint \(32, 8, 3, 3\) vs model "
            r"\(16, 8, 3, 3\)\), .* \(\+\d+ more\)$",
        ),
        (
            dict(norm="batch"),
            r"^checkpoint: backbone does not match .*: unexpected backbone\.conv_0\.conv_0\.adn\.N\.running_mean",
        ),
    ],
)
def test_load_backbone_state_mismatch_raises_one_line_and_loads_nothing(pretrained_changes, message):
    pretrained = LrcNetwork(tiny_params(**pretrained_changes))
    segmentation = SegmentationNetwork(tiny_params(), num_classes=2)
    before = {key: value.clone() for key, value in segmentation.state_dict().items()}
    with pytest.raises(UserInputError, match=message) as raised:
        segmentation.load_backbone_state(pretrained.state_dict())
    assert "\n" not in str(raised.value)
    for key, value in segmentation.state_dict().items():
        assert torch.equal(value, before[key])


def test_load_backbone_state_missing_keys_and_no_backbone_raise():
    pretrained_state = LrcNetwork(tiny_params()).state_dict()
    segmentation = SegmentationNetwork(tiny_params(), num_classes=2)
    partial = {key: value for key, value in pretrained_state.items() if not key.startswith("backbone.upcat_1.")}
    with pytest.raises(UserInputError, match=r"missing backbone\.upcat_1\.upsample\.deconv\.weight"):
        segmentation.load_backbone_state(partial)
    wrapped = {f"module.{key}": value for key, value in pretrained_state.items()}
    with pytest.raises(UserInputError, match=r"no 'backbone\.\*' weights to load \(first key 'module\.backbone\."):
        segmentation.load_backbone_state(wrapped)


def _parameters_with_gradient(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_gradients_reach_the_backbone_from_both_heads():
    torch.manual_seed(0)
    network = LrcNetwork(tiny_params())
    image = torch.rand(2, 1, 32, 32)
    encoder = {name for name, _ in network.backbone.named_parameters() if not name.startswith("upcat_")}

    outputs = network(image)
    (outputs.global_embedding * torch.randn_like(outputs.global_embedding)).sum().backward()
    assert encoder <= _parameters_with_gradient(network.backbone)
    assert _parameters_with_gradient(network.global_head) == dict(network.global_head.named_parameters()).keys()

    network.zero_grad(set_to_none=True)
    outputs = network(image)
    (outputs.local_embedding * torch.randn_like(outputs.local_embedding)).sum().backward()
    assert _parameters_with_gradient(network.backbone) == dict(network.backbone.named_parameters()).keys()
    assert _parameters_with_gradient(network.local_head) == dict(network.local_head.named_parameters()).keys()


def test_the_local_head_on_sampled_pixels_equals_its_map_at_those_pixels():
    from lrc_ray.losses import gather_embeddings

    torch.manual_seed(0)
    head = LocalProjectionHead(6, 10)
    features = torch.randn(3, 6, 8, 12)
    index = torch.randint(0, 8 * 12, (3, 20))
    expected = gather_embeddings(head(features), index)
    torch.testing.assert_close(head.embed_points(gather_embeddings(features, index)), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, K, 6\).*\(3, 20, 5\)"):
        head.embed_points(torch.zeros(3, 20, 5))
