"""Segmenting whole scans on their own grid, for `lrc-ray predict` and for evaluation (plain).

A scan's axial slices are made exactly as for training (`data.slices.prepare_slices`: the
super-pixel stage's code path), the network labels every slice on the working grid, and the
result is put back on the scan's grid (`data.geometry.put_back_probabilities`, the inverse of
the crop or pad and of the resampling that `SliceGeometry` records).

Put back are the softmax probabilities, resampled linearly, and the label is their argmax on
the native grid (as nnU-Net exports: it resamples probabilities, not labels). Nearest labels
would give every organ boundary the working grid's steps, e.g. 2 x 2 native pixels per working
pixel at 0.78 mm native and 1.56 mm working spacing; interpolated probabilities put the
boundary between working pixels where the classes cross. Pixels that the crop cut off get
probability 0 everywhere, so background.

Evaluation scores these native-grid labels against the native label file (`evaluate_cases`),
so the Dice that fine-tuning reports for a volume is the Dice of what `predict` writes for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lrc_ray.atomic import write_json_atomic
from lrc_ray.data.geometry import put_back_probabilities
from lrc_ray.data.msd import NIFTI_ENDINGS, CaseEntry, case_id_from_path, read_case
from lrc_ray.data.nifti import is_3d_shape, read_header, read_volume, write_like
from lrc_ray.data.slices import SliceParams, dequantise, prepare_slices
from lrc_ray.engine.metrics import summarise_dice, volume_dice
from lrc_ray.errors import UserInputError
from lrc_ray.models.networks import SegmentationNetwork

SLICES_PER_BATCH = 8  # network batch; also bounds the native-grid probabilities held at once
LABELS_FILE = "labels.json"


@torch.no_grad()
def segment_volume(
    model: SegmentationNetwork, hu: np.ndarray, *, native_spacing_mm: tuple[float, float], slicing: SliceParams,
    batch_size: int = SLICES_PER_BATCH,
) -> np.ndarray:
    """Organ labels of a (Z, H, W) HU volume on its own grid (display order, uint8).

    `native_spacing_mm` is the (row, col) spacing; `slicing` the model's slice preparation.
    Shape: (Z, H, W) in, (Z, H, W) out. Runs on the model's device, in eval mode.
    """
    model.eval()
    device = next(model.parameters()).device
    prepared = prepare_slices(hu, None, slicing, native_spacing_mm=native_spacing_mm)
    images = torch.from_numpy(dequantise(prepared.image_u8))[:, None]  # (Z, 1, S, S)
    labels = np.empty(hu.shape, dtype=np.uint8)
    for start in range(0, len(images), batch_size):
        probabilities = torch.softmax(model(images[start:start + batch_size].to(device)), dim=1)
        native = put_back_probabilities(probabilities, prepared.geometry)  # (b, C, H, W)
        labels[start:start + batch_size] = native.argmax(dim=1).to(torch.uint8).cpu().numpy()
    return labels


def segment_file(model: SegmentationNetwork, slicing: SliceParams, image_path: str | Path, out_path: str | Path) -> Path:
    """Segment the scan at `image_path` and write its labels to `out_path` (uint8 NIfTI with the
    scan's shape and affine), atomically.

    Raises:
        DataValidationError: the image is not a readable 3D NIfTI file with a known orientation.
    """
    volume = read_volume(image_path)
    labels = segment_volume(model, volume.array, native_spacing_mm=volume.spacing_mm[1:], slicing=slicing)
    write_like(out_path, labels, image_path)
    return Path(out_path)


def evaluate_cases(
    model: SegmentationNetwork, cases: Sequence[CaseEntry], *, labels: dict[int, str], slicing: SliceParams
) -> dict:
    """Per-organ and mean 3D Dice of `model` on labelled volumes, on each volume's native grid:
    `segment_volume` of the image against the label file (organs absent from a label: None).

    Raises:
        DataValidationError: an unreadable image or label file, or label values not in `labels`.
    """
    num_classes = max(labels) + 1
    per_volume = []
    for case in cases:
        image, label = read_case(case, labels)
        if label is None:
            raise UserInputError(f"{case.image_path}: volume {case.case_id} has no label file to score against")
        prediction = segment_volume(model, image.array, native_spacing_mm=image.spacing_mm[1:], slicing=slicing)
        per_volume.append(volume_dice(prediction, label.array, num_classes))
    organ_names = [labels.get(index, str(index)) for index in range(1, num_classes)]
    return summarise_dice(per_volume, organ_names, [case.case_id for case in cases])


def output_paths(scans: Sequence[tuple[str, Path]], out_dir: str | Path) -> list[Path]:
    """OUT/<case>.nii.gz for each (case id, image file), after checking every scan's header, so
    that a bad scan stops the run before anything is written.

    Raises:
        UserInputError: a file that is not a readable 3D NIfTI image with a known orientation, or
            two scans with one case id.
    """
    outputs: dict[str, Path] = {}
    for case_id, image in scans:
        if not Path(image).name.endswith(NIFTI_ENDINGS):
            raise UserInputError(f"{image}: expected a 3D NIfTI image (.nii.gz or .nii)")
        shape, _ = read_header(image)
        if not is_3d_shape(shape):
            raise UserInputError(f"{image}: expected a 3D volume, got shape {shape}")
        if case_id in outputs:
            raise UserInputError(f"{image}: its case name {case_id!r} is also {outputs[case_id]}'s; each output is OUT/<case>.nii.gz")
        outputs[case_id] = Path(image)
    return [Path(out_dir) / f"{case_id}.nii.gz" for case_id in outputs]


def scans_of_files(images: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(case id, file) of NIfTI files: the case id is the file name without .nii.gz or .nii."""
    return [(case_id_from_path(Path(image)), Path(image)) for image in images]


def write_label_names(out_dir: str | Path, labels: dict[int, str]) -> Path:
    """OUT/labels.json: {"0": "background", "1": "spleen", ...} (label value -> organ name)."""
    path = Path(out_dir) / LABELS_FILE
    write_json_atomic(path, {str(value): name for value, name in sorted(labels.items())})
    return path
