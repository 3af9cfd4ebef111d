"""Losses of LRC pre-training: region/pixel sampling, the contrastive sampling loss, MoCo v2."""

from lrc_ray.losses.contrastive_sampling import NEGATIVES, ContrastiveSamplingLoss, contrastive_sampling_loss
from lrc_ray.losses.moco import MoCoV2Loss, in_batch_top1, moco_infonce_loss, moco_logits, momentum_update
from lrc_ray.losses.sampling import RegionSamples, gather_embeddings, sample_region_pixels

__all__ = [
    "NEGATIVES",
    "ContrastiveSamplingLoss",
    "MoCoV2Loss",
    "RegionSamples",
    "contrastive_sampling_loss",
    "gather_embeddings",
    "in_batch_top1",
    "moco_infonce_loss",
    "moco_logits",
    "momentum_update",
    "sample_region_pixels",
]
