"""The 2D encoder-decoder of LRC and the two networks built on it (LRC_METHOD sections 4, 8).

The backbone is MONAI's `BasicUNet` without its final 1x1 convolution. BasicUNet rather
than MONAI's `UNet`: BasicUNet keeps its stages as named attributes (conv_0, down_1..down_4,
upcat_4..upcat_1) called one after another in `forward`, so the bottleneck (input of the
global branch) and the last decoder map (input of the local branch and of the segmentation
head) can be taken without hooks. `UNet` nests each level inside the previous one's skip
connection, which hides both maps.

- `EncoderDecoder`: (B, C_in, H, W) -> `Features(bottleneck, decoder)`.
- `LrcNetwork`: backbone + global (MoCo) head + local (LRC) head, for pre-training.
- `SegmentationNetwork`: backbone + a new 1x1 segmentation head, for fine-tuning; it loads
  the backbone weights of a pre-trained `LrcNetwork`. Both networks call their backbone
  `backbone`, so the weights share the key names `backbone.*`.

H and W must be multiples of 16 (four 2x max-poolings). With instance norm (or batch norm
at batch size 1) the bottleneck must hold more than one pixel while training, so 16x16
inputs fail there: use 32 or more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from monai.networks.nets import BasicUNet
from torch import Tensor, nn

from lrc_ray.config import NORMS, NetworkParams
from lrc_ray.errors import UserInputError
from lrc_ray.models.heads import GlobalProjectionHead, LocalProjectionHead, SegmentationHead

__all__ = [
    "NORMS",
    "EncoderDecoder",
    "Features",
    "LrcNetwork",
    "LrcOutputs",
    "NetworkParams",
    "SegmentationNetwork",
    "build_lrc_network",
    "build_segmentation_network",
]

DOWNSAMPLING_FACTOR = 16  # four 2x max-poolings


@dataclass(frozen=True)
class Features:
    """Backbone outputs. Shape: bottleneck (B, C5, H/16, W/16), decoder (B, C_last, H, W)."""

    bottleneck: Tensor
    decoder: Tensor


@dataclass(frozen=True)
class LrcOutputs:
    """Pre-training outputs.

    Shape: global_embedding (B, global_dim), not normalised (the MoCo loss normalises);
    local_embedding (B, local_dim, H, W), unit L2 norm per pixel; features from the backbone.
    """

    global_embedding: Tensor
    local_embedding: Tensor
    features: Features


class EncoderDecoder(nn.Module):
    """MONAI BasicUNet (2D) without its final convolution.

    The stages are BasicUNet's own modules under BasicUNet's names, so their weights keep
    BasicUNet's key names (minus `final_conv`).

    Shape: forward(x (B, in_channels, H, W)) -> Features(bottleneck (B, C5, H/16, W/16),
    decoder (B, C_last, H, W)), with C5 = features[4] and C_last = features[5].
    Raises ValueError for in_channels < 1, and in forward for an input that is not
    (B, in_channels, H, W) with H and W positive multiples of 16 (the shape is in the message).
    """

    def __init__(self, params: NetworkParams, in_channels: int = 1):
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be an integer >= 1, got {in_channels!r}")
        unet = BasicUNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=1,  # feeds final_conv only, which is dropped
            features=params.features,
            norm=params.monai_norm,
            dropout=params.dropout,
        )
        self.in_channels = in_channels
        self.conv_0 = unet.conv_0
        self.down_1, self.down_2, self.down_3, self.down_4 = unet.down_1, unet.down_2, unet.down_3, unet.down_4
        self.upcat_4, self.upcat_3, self.upcat_2, self.upcat_1 = unet.upcat_4, unet.upcat_3, unet.upcat_2, unet.upcat_1
        self._bottleneck_channels = params.features[4]
        self._decoder_channels = params.features[5]

    @property
    def bottleneck_channels(self) -> int:
        return self._bottleneck_channels

    @property
    def decoder_channels(self) -> int:
        return self._decoder_channels

    def forward(self, x: Tensor) -> Features:
        if (
            x.ndim != 4
            or x.shape[1] != self.in_channels
            or any(size == 0 or size % DOWNSAMPLING_FACTOR for size in x.shape[2:])
        ):
            raise ValueError(
                f"EncoderDecoder expects (B, {self.in_channels}, H, W) with H and W positive multiples of "
                f"{DOWNSAMPLING_FACTOR}, got shape {tuple(x.shape)}"
            )
        x0 = self.conv_0(x)
        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        x3 = self.down_3(x2)
        x4 = self.down_4(x3)
        u4 = self.upcat_4(x4, x3)
        u3 = self.upcat_3(u4, x2)
        u2 = self.upcat_2(u3, x1)
        u1 = self.upcat_1(u2, x0)
        return Features(bottleneck=x4, decoder=u1)


class LrcNetwork(nn.Module):
    """Pre-training network: `backbone` + `global_head` (MoCo) + `local_head` (LRC).

    A MoCo momentum encoder is a deep copy of this network; it needs only
    `backbone` and `global_head`, which can be called directly.

    Shape: forward(x (B, in_channels, H, W)) -> LrcOutputs. Raises as `EncoderDecoder`.
    """

    def __init__(self, params: NetworkParams, in_channels: int = 1):
        super().__init__()
        self.backbone = EncoderDecoder(params, in_channels)
        self.global_head = GlobalProjectionHead(
            self.backbone.bottleneck_channels, params.global_hidden, params.global_dim
        )
        self.local_head = LocalProjectionHead(self.backbone.decoder_channels, params.local_dim)

    def forward(self, x: Tensor) -> LrcOutputs:
        features = self.backbone(x)
        return LrcOutputs(
            global_embedding=self.global_head(features.bottleneck),
            local_embedding=self.local_head(features.decoder),
            features=features,
        )


class SegmentationNetwork(nn.Module):
    """Fine-tuning network: `backbone` (optionally pre-trained) + a new `segmentation_head`.

    Shape: forward(x (B, in_channels, H, W)) -> (B, num_classes, H, W) logits.
    Raises ValueError for num_classes < 1, and in forward as `EncoderDecoder`.
    """

    def __init__(self, params: NetworkParams, num_classes: int, in_channels: int = 1):
        super().__init__()
        self.params = params
        self.backbone = EncoderDecoder(params, in_channels)
        self.segmentation_head = SegmentationHead(self.backbone.decoder_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.segmentation_head(self.backbone(x).decoder)

    def load_backbone_state(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load the `backbone.*` weights of a network's state dict (e.g. an `LrcNetwork`'s).

        Other keys (the projection heads) are ignored. Nothing is loaded unless every
        backbone key is present with the model's shape.
        Raises UserInputError, one line, listing missing, unexpected and mismatched keys.
        """
        prefix = "backbone."
        loaded = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        if not loaded:
            example = next(iter(state_dict), None)
            found = f"first key {example!r}" if example is not None else "it is empty"
            raise UserInputError(f"checkpoint: no '{prefix}*' weights to load ({found})")
        expected = self.backbone.state_dict()
        missing = [key for key in expected if key not in loaded]
        unexpected = [key for key in loaded if key not in expected]
        mismatched = [
            f"{prefix}{key} (checkpoint {tuple(loaded[key].shape)} vs model {tuple(value.shape)})"
            for key, value in expected.items()
            if key in loaded and tuple(loaded[key].shape) != tuple(value.shape)
        ]
        problems = [
            f"{label} {_first_few(keys)}"
            for label, keys in (
                ("missing", [prefix + key for key in missing]),
                ("unexpected", [prefix + key for key in unexpected]),
                ("shape mismatch for", mismatched),
            )
            if keys
        ]
        if problems:
            raise UserInputError(
                f"checkpoint: backbone does not match network.features={self.params.features}, "
                f"network.norm={self.params.norm!r}: " + "; ".join(problems)
            )
        self.backbone.load_state_dict(loaded, strict=True)


def _first_few(items: list[str], shown: int = 3) -> str:
    text = ", ".join(items[:shown])
    return text if len(items) <= shown else f"{text} (+{len(items) - shown} more)"


def build_lrc_network(params: NetworkParams, in_channels: int = 1) -> LrcNetwork:
    """The pre-training network for `params` (LRC_METHOD section 4)."""
    return LrcNetwork(params, in_channels)


def build_segmentation_network(params: NetworkParams, num_classes: int, in_channels: int = 1) -> SegmentationNetwork:
    """The fine-tuning network for `params`, randomly initialised (LRC_METHOD section 8)."""
    return SegmentationNetwork(params, num_classes, in_channels)
