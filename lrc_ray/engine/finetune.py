"""Fine-tuning at a label fraction and per-organ 3D Dice evaluation (LRC_METHOD.md section 8)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from monai.losses import DiceCELoss
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

from lrc_ray.config import FinetuneConfig
from lrc_ray.data.superpixel_dataset import LabelledSliceDataset
from lrc_ray.engine.metrics import summarise_dice, volume_dice
from lrc_ray.errors import TrainingError
from lrc_ray.models.networks import NetworkParams, SegmentationNetwork
from lrc_ray.superpixels.table import decode_row


def build_segmentation_model(
    network: NetworkParams, num_classes: int, pretrained_state: dict | None
) -> SegmentationNetwork:
    """A new segmentation head on the (pre-trained, when given) encoder-decoder."""
    model = SegmentationNetwork(network, num_classes)
    if pretrained_state is not None:
        model.load_backbone_state(pretrained_state)
    return model


def finetune(
    model: SegmentationNetwork,
    table: pa.Table,
    *,
    train_cases: tuple[str, ...],
    config: FinetuneConfig,
    seed: int,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> list[dict]:
    """Train with Dice + cross-entropy on the slices of `train_cases`; returns per-epoch losses."""
    torch.manual_seed(seed)
    model.to(device)
    dataset = LabelledSliceDataset(table, case_ids=train_cases, augment=config.augment, seed=seed,
                                   flip_anterior_posterior=config.flip_anterior_posterior,
                                   flip_left_right=config.flip_left_right)
    generator = torch.Generator().manual_seed(seed)
    if config.steps_per_epoch is None:
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator, drop_last=False)
    else:
        sampler = RandomSampler(dataset, replacement=True, num_samples=config.steps_per_epoch * config.batch_size,
                                generator=generator)
        loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    history = []
    if config.head_epochs:
        # Linear probing first (LP-FT): fit the new head on the frozen backbone, so that full
        # fine-tuning starts from a head that uses the pre-trained features instead of
        # pushing random-head gradients into them.
        model.backbone.requires_grad_(False)
        head_optimizer = torch.optim.AdamW(model.segmentation_head.parameters(), lr=config.head_lr,
                                           weight_decay=config.weight_decay)
        history += _epochs(model, loader, dataset, head_optimizer, loss_function, range(config.head_epochs),
                           phase="head", progress=progress, device=device)
        model.backbone.requires_grad_(True)
    parameter_groups = [
        {"params": model.backbone.parameters(), "lr": config.lr * config.backbone_lr_scale},
        {"params": model.segmentation_head.parameters(), "lr": config.lr},
    ]
    optimizer = torch.optim.AdamW(parameter_groups, lr=config.lr, weight_decay=config.weight_decay)
    schedule = None
    if config.lr_schedule == "poly":
        schedule = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=config.epochs, power=0.9)
    epochs = range(config.head_epochs, config.head_epochs + config.epochs)
    return history + _epochs(model, loader, dataset, optimizer, loss_function, epochs, phase="all",
                             progress=progress, device=device, schedule=schedule)


def _epochs(model, loader, dataset, optimizer, loss_function, epochs, *, phase: str, progress: bool, device,
            schedule=None) -> list[dict]:
    history = []
    for epoch in epochs:
        dataset.set_epoch(epoch)
        model.train()
        total, steps = 0.0, 0
        for batch in tqdm(loader, desc=f"finetune epoch {epoch}", disable=not progress, leave=False):
            image, label = batch["image"].to(device), batch["label"].to(device)
            loss = loss_function(model(image), label[:, None])
            if not torch.isfinite(loss):
                raise TrainingError(f"fine-tuning epoch {epoch}: loss is {loss.item()}; lower finetune.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + float(loss.detach()), steps + 1
        history.append({"epoch": epoch, "phase": phase, "loss": total / max(steps, 1),
                        "lr": optimizer.param_groups[-1]["lr"]})
        if schedule is not None:
            schedule.step()
    return history


@torch.no_grad()
def evaluate(
    model: SegmentationNetwork, table: pa.Table, *, cases: tuple[str, ...], labels: dict[int, str], batch_size: int = 32
) -> dict:
    """Predict every slice of each volume, stack them, and compute per-organ 3D Dice on the working
    grid of the table's slices (for benchmarks that compare slice preparations; runs score on each
    volume's native grid with `engine.predict.evaluate_cases`)."""
    model.eval()
    num_classes = max(labels) + 1
    organ_names = [labels.get(index, str(index)) for index in range(1, num_classes)]
    per_volume = []
    for case_id in cases:
        rows = pc.indices_nonzero(pc.equal(table.column("case_id"), case_id)).to_pylist()
        records = sorted((decode_row(table, row) for row in rows), key=lambda record: record.slice_index)
        if not records or records[0].label is None:
            raise TrainingError(f"validation volume {case_id}: no labelled slices in the super-pixel cache")
        images = torch.from_numpy(np.stack([record.image for record in records]))[:, None]
        device = next(model.parameters()).device
        prediction = torch.cat([model(chunk.to(device)).argmax(dim=1).cpu() for chunk in images.split(batch_size)]).numpy()
        label = np.stack([record.label for record in records])
        per_volume.append(volume_dice(prediction, label, num_classes))
    return summarise_dice(per_volume, organ_names, list(cases)) | {"validation_cases": list(cases)}
