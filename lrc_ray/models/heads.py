"""Projection and segmentation heads on top of the encoder-decoder (LRC_METHOD sections 4, 8).

- `GlobalProjectionHead`: the MoCo v2 MLP on the pooled bottleneck.
- `LocalProjectionHead`: the per-pixel embedding of the LRC loss, L2-normalised.
- `SegmentationHead`: the new 1x1 convolution added for fine-tuning.

Constructors check their sizes (ValueError for a size < 1); `forward` checks the input
shape and puts it in the error message.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GlobalProjectionHead", "LocalProjectionHead", "SegmentationHead"]


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_feature_map(head: str, x: Tensor, in_channels: int) -> None:
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{head} expects a (B, {in_channels}, H, W) feature map, got shape {tuple(x.shape)}")


class GlobalProjectionHead(nn.Module):
    """MoCo v2 projection: global average pool -> Linear -> ReLU -> Linear.

    Args:
        in_channels: channels C of the feature map (the bottleneck).
        hidden_dim: width of the hidden layer (MoCo v2: 2048; smaller for small backbones).
        out_dim: size of the projection (MoCo v2: 128).

    Shape: (B, C, h, w) -> (B, out_dim). Not normalised: the MoCo loss normalises.
    Raises ValueError for a size < 1, or in forward for an input that is not (B, C, h, w).
    """

    def __init__(self, in_channels: int, hidden_dim: int, out_dim: int):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            _check_size(name, value)
        self.in_channels = in_channels
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        _check_feature_map("GlobalProjectionHead", x, self.in_channels)
        return self.mlp(x.mean(dim=(2, 3)))


class LocalProjectionHead(nn.Module):
    """Per-pixel projection: 1x1 conv -> ReLU -> 1x1 conv, then L2-normalised over channels.

    Args:
        in_channels: channels C of the feature map (the last decoder map).
        out_dim: embedding size D (LRC default 128). The hidden width is also D: the
            decoder map is narrow (16-32 channels), so a wider hidden layer would only add
            memory at full resolution.

    Shape: (B, C, H, W) -> (B, D, H, W), unit L2 norm per pixel.
    Raises ValueError for a size < 1, or in forward for an input that is not (B, C, H, W).
    """

    def __init__(self, in_channels: int, out_dim: int):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_dim", out_dim)):
            _check_size(name, value)
        self.in_channels = in_channels
        self.mlp = nn.Sequential(
            nn.Conv2d(in_channels, out_dim, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_dim, out_dim, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        _check_feature_map("LocalProjectionHead", x, self.in_channels)
        return F.normalize(self.mlp(x), dim=1)

    def embed_points(self, points: Tensor) -> Tensor:
        """The same projection of feature vectors taken from the map (its 1x1 convolutions as linear
        maps): what `forward` gives at those pixels, without the rest of the map.

        Shape: (B, K, C) -> (B, K, D), unit L2 norm per vector.
        Raises ValueError for an input that is not (B, K, C).
        """
        if points.ndim != 3 or points.shape[-1] != self.in_channels:
            raise ValueError(f"LocalProjectionHead.embed_points expects (B, K, {self.in_channels}), got shape {tuple(points.shape)}")
        first, _, second = self.mlp
        hidden = F.relu(F.linear(points, first.weight.flatten(1), first.bias))
        return F.normalize(F.linear(hidden, second.weight.flatten(1), second.bias), dim=-1)


class SegmentationHead(nn.Module):
    """A new 1x1 convolution from the decoder map to class logits (fine-tuning).

    Shape: (B, C, H, W) -> (B, num_classes, H, W) logits.
    Raises ValueError for a size < 1, or in forward for an input that is not (B, C, H, W).
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            _check_size(name, value)
        self.in_channels = in_channels
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        _check_feature_map("SegmentationHead", x, self.in_channels)
        return self.conv(x)
