"""Felzenszwalb super-pixels per slice, and their Parquet cache."""
