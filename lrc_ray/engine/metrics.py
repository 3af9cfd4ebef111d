"""Per-organ 3D Dice on whole volumes (slices predicted, then stacked)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot


def volume_dice(prediction: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of each foreground class of one volume; NaN where the organ is absent from the label.

    Shapes: prediction, label (Z, H, W) integer class maps. Returns (num_classes - 1,).
    """
    if prediction.shape != label.shape:
        raise ValueError(f"prediction {prediction.shape} and label {label.shape} differ in shape")

    def as_one_hot(volume: np.ndarray) -> torch.Tensor:
        return one_hot(torch.as_tensor(volume, dtype=torch.long)[None, None], num_classes)

    dice = compute_dice(as_one_hot(prediction), as_one_hot(label), include_background=False, ignore_empty=True)
    return dice[0].numpy()


def summarise_dice(per_volume: list[np.ndarray], organ_names: list[str], case_ids: list[str] | None = None) -> dict:
    """Mean over volumes per organ, then over organs.

    An organ absent from a volume's label counts as absent there (None), not as 0: it is left
    out of that organ's mean, and an organ absent from every volume is None in `dice_per_organ`.
    With `case_ids` (one per volume), `dice_per_volume` gives each volume's Dice the same way.
    """
    stacked = np.stack(per_volume)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an organ absent from every volume
        per_organ = np.nanmean(stacked, axis=0)
        mean = float(np.nanmean(per_organ))
    summary = {"dice_mean": mean, "dice_per_organ": _by_organ(per_organ, organ_names)}
    if case_ids is not None:
        summary["dice_per_volume"] = {case: _by_organ(dice, organ_names) for case, dice in zip(case_ids, stacked)}
    return summary


def _by_organ(dice: np.ndarray, organ_names: list[str]) -> dict[str, float | None]:
    return {name: (None if np.isnan(value) else float(value)) for name, value in zip(organ_names, dice)}
