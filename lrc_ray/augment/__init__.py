"""Augmentation: two independently augmented views per slice for region contrast."""

from lrc_ray.augment.two_views import AugmentParams, TwoViewAugment, TwoViews, ViewDraw, ViewGeometry, warp, warp_slice

__all__ = ["AugmentParams", "TwoViewAugment", "TwoViews", "ViewDraw", "ViewGeometry", "warp", "warp_slice"]
