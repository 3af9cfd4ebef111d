"""Medical Segmentation Decathlon (MSD) layout: `dataset.json` + image/label NIfTI files.

`dataset.json` holds `labels` ({"0": "background", "1": "spleen", ...}), `training`
(image/label pairs) and, as lrc_ray's own addition, `unlabeled` (images for pre-training
only). BTCV, AMOS and the MSD tasks come in this layout; MONAI's
`load_decathlon_datalist` reads the same file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrc_ray.data.nifti import Volume, read_header, read_volume
from lrc_ray.errors import DataValidationError

DATASET_JSON = "dataset.json"


@dataclass(frozen=True)
class CaseEntry:
    """One volume of a data set; `label_path` is None for unlabelled volumes."""

    case_id: str
    image_path: Path
    label_path: Path | None


@dataclass(frozen=True)
class MsdDataset:
    root: Path
    name: str
    labels: dict[int, str]
    cases: tuple[CaseEntry, ...]

    @property
    def labelled_cases(self) -> tuple[CaseEntry, ...]:
        return tuple(case for case in self.cases if case.label_path is not None)

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file the data set consists of, dataset.json first."""
        paths = [self.root / DATASET_JSON]
        for case in self.cases:
            paths.append(case.image_path)
            if case.label_path is not None:
                paths.append(case.label_path)
        return tuple(paths)


def load_msd_dataset(root: str | Path) -> MsdDataset:
    """Read and check `root/dataset.json`; every listed file must exist.

    Raises:
        DataValidationError: naming the file or field that is wrong.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(f"{root}: not a directory; expected a data set in MSD layout")
    json_path = root / DATASET_JSON
    if not json_path.is_file():
        raise DataValidationError(
            f"{root}: no {DATASET_JSON}; expected an MSD-layout data set "
            "(dataset.json, imagesTr/, labelsTr/), e.g. made by `lrc-ray data synth`"
        )
    try:
        spec = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataValidationError(f"{json_path}: not valid JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise DataValidationError(f"{json_path}: expected a JSON object at the top level")

    labels = _parse_labels(spec.get("labels"), json_path)
    cases: list[CaseEntry] = []
    for index, item in enumerate(_entry_list(spec, "training", json_path)):
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise DataValidationError(
                f"{json_path}: training[{index}] must be an object with 'image' and 'label'"
            )
        image = _existing_file(root, item["image"], f"training[{index}].image", json_path)
        label = _existing_file(root, item["label"], f"training[{index}].label", json_path)
        cases.append(CaseEntry(_case_id(image), image, label))
    for index, item in enumerate(_entry_list(spec, "unlabeled", json_path)):
        image_ref = item.get("image") if isinstance(item, dict) else item
        if not isinstance(image_ref, str):
            raise DataValidationError(f"{json_path}: unlabeled[{index}] must be a path or an object with 'image'")
        image = _existing_file(root, image_ref, f"unlabeled[{index}]", json_path)
        cases.append(CaseEntry(_case_id(image), image, None))

    if not cases:
        raise DataValidationError(f"{json_path}: lists no volumes; expected entries in 'training' or 'unlabeled'")
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case_id in seen:
            raise DataValidationError(
                f"{json_path}: two volumes share the case id '{case.case_id}' "
                f"({seen[case.case_id]} and {case.image_path}); file names must be unique"
            )
        seen[case.case_id] = case.image_path
    return MsdDataset(root=root.resolve(), name=str(spec.get("name", root.name)), labels=labels, cases=tuple(cases))


@dataclass(frozen=True)
class HeaderSummary:
    total_slices: int  # axial slices of the whole data set
    max_slice_pixels: int  # the largest in-plane size, in pixels


def check_headers(dataset: MsdDataset) -> HeaderSummary:
    """Cheap checks from the NIfTI headers alone: 3D images, label shape equal to image shape."""
    total_slices, max_slice_pixels = 0, 0
    for case in dataset.cases:
        shape, axial_slices = read_header(case.image_path)
        total_slices += axial_slices
        if axial_slices:
            max_slice_pixels = max(max_slice_pixels, int(np.prod(shape[:3])) // axial_slices)
        if not _is_3d(shape):
            raise DataValidationError(f"{case.image_path}: expected a 3D volume, got shape {shape}")
        if case.label_path is not None:
            label_shape, _ = read_header(case.label_path)
            if label_shape[:3] != shape[:3]:
                raise DataValidationError(
                    f"{case.label_path}: label shape {label_shape} differs from image shape {shape} "
                    f"of {case.image_path.name}"
                )
    return HeaderSummary(total_slices=total_slices, max_slice_pixels=max_slice_pixels)


def read_case(case: CaseEntry, labels: dict[int, str]) -> tuple[Volume, Volume | None]:
    """Read a case's image (float32 HU) and label (uint8), in display order, fully checked."""
    image = read_volume(case.image_path, dtype=np.float32)
    if case.label_path is None:
        return image, None
    label = read_volume(case.label_path, dtype=np.float32)
    if label.array.shape != image.array.shape:
        raise DataValidationError(
            f"{case.label_path}: label shape {label.array.shape} differs from image shape "
            f"{image.array.shape} of {case.image_path.name}"
        )
    values = np.unique(label.array)
    unknown = [float(v) for v in values if v != np.round(v) or int(v) not in labels]
    if unknown:
        shown = ", ".join(f"{v:g}" for v in unknown[:5])
        raise DataValidationError(
            f"{case.label_path}: label values {{{shown}}} are not in dataset.json 'labels' "
            f"(expected {sorted(labels)})"
        )
    return image, Volume(array=label.array.astype(np.uint8), spacing_mm=label.spacing_mm)


def _parse_labels(raw: object, json_path: Path) -> dict[int, str]:
    if not isinstance(raw, dict) or not raw:
        raise DataValidationError(f"{json_path}: 'labels' must be a non-empty object like {{\"0\": \"background\"}}")
    labels: dict[int, str] = {}
    for key, name in raw.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise DataValidationError(f"{json_path}: labels key '{key}' is not an integer") from None
        if not 0 <= value <= 255:
            raise DataValidationError(f"{json_path}: labels key {value} is outside 0..255")
        labels[value] = str(name)
    if 0 not in labels:
        raise DataValidationError(f"{json_path}: 'labels' must name the background value 0")
    return labels


def _entry_list(spec: dict, key: str, json_path: Path) -> list:
    entries = spec.get(key, [])
    if not isinstance(entries, list):
        raise DataValidationError(f"{json_path}: '{key}' must be a list")
    return entries


def _existing_file(root: Path, reference: object, field: str, json_path: Path) -> Path:
    if not isinstance(reference, str) or not reference:
        raise DataValidationError(f"{json_path}: {field} must be a file path string")
    path = (root / reference).resolve() if not Path(reference).is_absolute() else Path(reference)
    if not path.is_file():
        raise DataValidationError(f"{json_path}: {field} points to a missing file {reference}")
    return path


def _case_id(image_path: Path) -> str:
    name = image_path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return image_path.stem


def _is_3d(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)
