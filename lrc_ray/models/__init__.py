"""Networks of LRC: the BasicUNet encoder-decoder, projection heads, pre-training and fine-tuning networks."""

from lrc_ray.models.heads import GlobalProjectionHead, LocalProjectionHead, SegmentationHead, pooled_spread_ratio
from lrc_ray.models.networks import (
    NORMS,
    EncoderDecoder,
    Features,
    LrcNetwork,
    LrcOutputs,
    NetworkParams,
    SegmentationNetwork,
    build_lrc_network,
    build_segmentation_network,
)

__all__ = [
    "NORMS",
    "EncoderDecoder",
    "Features",
    "GlobalProjectionHead",
    "LocalProjectionHead",
    "LrcNetwork",
    "LrcOutputs",
    "NetworkParams",
    "SegmentationHead",
    "SegmentationNetwork",
    "build_lrc_network",
    "build_segmentation_network",
    "pooled_spread_ratio",
]
