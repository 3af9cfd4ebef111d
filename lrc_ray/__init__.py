"""lrc_ray: Localized Region Contrast pre-training and hyper-parameter search on Ray."""

__version__ = "0.1.0"
