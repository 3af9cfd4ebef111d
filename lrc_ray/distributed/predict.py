"""Ray Data batch inference for `lrc-ray predict`: one actor per CPU (or GPU) holds the model and
segments whole scans (`engine.predict.segment_file`), each written by the actor that made it.

A scan is one item: reading, resampling and writing a .nii.gz are per volume, and the slices of
one scan are batched by the predictor itself. Ray Data shows its own progress bar.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
from ray.data import ActorPoolStrategy

from lrc_ray.distributed.runtime import cluster_cpus, ray_session
from lrc_ray.distributed.superpixels import running_pipeline


class ScanSegmenter:
    """Ray Data's callable class: loads the model once per actor, then segments batches of scans.

    Batch: {"image": (N,) paths, "out": (N,) paths} -> {"image": ..., "out": ...} once written.
    """

    def __init__(self, model_path: str) -> None:
        import torch

        from lrc_ray.engine.saved_model import load_model

        saved = load_model(model_path)
        self.model = saved.model.to("cuda" if torch.cuda.is_available() else "cpu")
        self.slicing = saved.slicing

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from lrc_ray.engine.predict import segment_file

        for image, out in zip(batch["image"], batch["out"]):
            segment_file(self.model, self.slicing, str(image), str(out))
        return batch


def segment_with_ray_data(model_path: str | Path, images: list[Path], outputs: list[Path], *,
                          address: str | None = None) -> None:
    """Segment `images` into `outputs` with a pool of `ScanSegmenter` actors on the Ray cluster at
    `address` (or the one connected, or a local one): one actor per GPU when the cluster has
    GPUs, else per CPU, at most one per scan.

    Raises the first `UserInputError` an actor met (e.g. an unreadable scan) as itself.
    """
    items = [{"image": str(image), "out": str(out)} for image, out in zip(images, outputs)]
    with ray_session(address=address):
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actors = max(1, min(len(items), gpus or cluster_cpus()))
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ScanSegmenter, fn_constructor_kwargs={"model_path": str(model_path)}, batch_size=1,
            compute=ActorPoolStrategy(size=actors), num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
        )
        with running_pipeline():
            dataset.materialize()
