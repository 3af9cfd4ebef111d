"""A cheap probe of pre-trained features: a linear segmentation head on frozen decoder features.

Sweeps stop poor settings early (ASHA) on a number reported every pre-training epoch. The
loss is no such number: its scale changes with the method, temperature and weights. The
probe is: fit a 1x1 convolution on the frozen last decoder map of the slices of one fixed
labelled training volume, then take the 3D Dice on the validation volumes. It uses the same
slices and steps for every setting, so values are comparable across settings, and it takes
about a second. The probe volume is the first of the seeded label-fraction order, which every
label-fraction subset contains (the subsets are nested), so it uses no label beyond any
fraction's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from monai.losses import DiceCELoss
from torch import Tensor

from lrc_ray.engine.metrics import summarise_dice, volume_dice
from lrc_ray.models.networks import EncoderDecoder
from lrc_ray.superpixels.table import decode_row


@dataclass(frozen=True)
class ProbeSlices:
    """Shapes: train_images (N, 1, H, W) float, train_labels (N, H, W) int64; validation likewise,
    one (images, labels) pair per validation volume, slices in order."""

    train_images: Tensor
    train_labels: Tensor
    validation: tuple[tuple[Tensor, Tensor], ...]
    num_classes: int


def probe_slices(table: pa.Table, *, train_case: str, validation_cases: tuple[str, ...], num_classes: int) -> ProbeSlices:
    """The probe's data from a super-pixel cache table (labelled slices only)."""
    train_images, train_labels = _volume(table, train_case)
    validation = tuple(_volume(table, case_id) for case_id in validation_cases)
    return ProbeSlices(train_images, train_labels, validation, num_classes)


def _volume(table: pa.Table, case_id: str) -> tuple[Tensor, Tensor]:
    rows = pc.indices_nonzero(pc.equal(table.column("case_id"), case_id)).to_pylist()
    records = sorted((decode_row(table, row) for row in rows), key=lambda record: record.slice_index)
    if not records or any(record.label is None for record in records):
        raise ValueError(f"probe: volume {case_id} has no labelled slices in the table")
    images = torch.from_numpy(np.stack([record.image for record in records]))[:, None]
    labels = torch.from_numpy(np.stack([record.label for record in records]).astype(np.int64))
    return images, labels


@torch.no_grad()
def _features(backbone: EncoderDecoder, images: Tensor, device: torch.device, batch_size: int = 32) -> Tensor:
    return torch.cat([backbone(chunk.to(device)).decoder.float() for chunk in images.split(batch_size)])


def linear_probe_dice(
    backbone: EncoderDecoder, probe: ProbeSlices, *, steps: int = 100, lr: float = 0.05, seed: int = 0
) -> float:
    """Mean organ 3D Dice on the validation volumes of a linear head fit on frozen features."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    features = _features(backbone, probe.train_images, device)
    labels = probe.train_labels.to(device)[:, None]
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Conv2d(features.shape[1], probe.num_classes, kernel_size=1).to(device)
    with torch.no_grad():
        bound = 1 / features.shape[1] ** 0.5
        head.weight.copy_(torch.empty_like(head.weight, device="cpu").uniform_(-bound, bound, generator=generator))
        head.bias.zero_()
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = loss_function(head(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    per_volume = []
    with torch.no_grad():
        for images, volume_labels in probe.validation:
            prediction = head(_features(backbone, images, device)).argmax(dim=1).cpu().numpy()
            per_volume.append(volume_dice(prediction, volume_labels.numpy(), probe.num_classes))
    backbone.train(was_training)
    organs = [str(index) for index in range(1, probe.num_classes)]
    return float(summarise_dice(per_volume, organs)["dice_mean"])
