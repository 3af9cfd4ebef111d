"""Data sets on disk: the Medical Segmentation Decathlon (MSD) layout, nnU-Net v2's, and MONAI datalists.

- MSD: `dataset.json` holds `labels` ({"0": "background", "1": "spleen", ...}), `training`
  (image/label pairs) and, as lrc_ray's own addition, `unlabeled` (images for pre-training
  only). BTCV, AMOS and the MSD tasks come in this layout; MONAI's `load_decathlon_datalist`
  reads the same file. The built-in synthetic data are written this way.
- nnU-Net v2: `dataset.json` holds `labels` the other way round ({"background": 0, ...}),
  `channel_names`, `file_ending` and `numTraining`; the volumes are
  imagesTr/<case>_0000<file_ending> with labelsTr/<case><file_ending> (or an explicit
  `dataset` map of case -> {"images", "label"}).
- MONAI datalist (`--datalist FILE --key training`), e.g. BTCV's dataset_0.json: the entries
  under one key, each {"image": ..., "label": ...} (or an image path alone, unlabelled), paths
  relative to the datalist's own directory (MONAI's `load_decathlon_datalist` default), plus
  `labels` as in either layout above.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrc_ray.data.nifti import Volume, is_3d_shape, read_header, read_volume
from lrc_ray.errors import DataValidationError

DATASET_JSON = "dataset.json"
NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class CaseEntry:
    """One volume of a data set; `label_path` is None for unlabelled volumes."""

    case_id: str
    image_path: Path
    label_path: Path | None


@dataclass(frozen=True)
class MsdDataset:
    """A data set's volumes, whichever layout listed them. `index_file` is the JSON file that
    lists them (root/dataset.json unless a datalist)."""

    root: Path
    name: str
    labels: dict[int, str]
    cases: tuple[CaseEntry, ...]
    index_file: Path | None = None
    datalist_key: str | None = None  # the datalist's list these volumes came from (None: dataset.json)

    @property
    def labelled_cases(self) -> tuple[CaseEntry, ...]:
        return tuple(case for case in self.cases if case.label_path is not None)

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file the data set consists of, the index file (dataset.json) first."""
        paths = [self.index_file or self.root / DATASET_JSON]
        for case in self.cases:
            paths.append(case.image_path)
            if case.label_path is not None:
                paths.append(case.label_path)
        return tuple(paths)


def load_dataset(data_dir: str | Path | None, *, datalist: str | Path | None = None, key: str = "training") -> MsdDataset:
    """The volumes of `data_dir` (MSD or nnU-Net v2 layout), or of the `key` entries of a MONAI datalist.

    Raises:
        DataValidationError: naming the file or field that is wrong.
    """
    if datalist is not None:
        return load_datalist(datalist, key=key)
    if data_dir is None:
        raise DataValidationError("no data set given: expected a data directory or a datalist")
    return load_msd_dataset(data_dir)


def load_msd_dataset(root: str | Path) -> MsdDataset:
    """Read and check `root/dataset.json`, in MSD or nnU-Net v2 layout; every listed file must exist.

    Raises:
        DataValidationError: naming the file or field that is wrong.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(f"{root}: not a directory; expected a data set in MSD or nnU-Net v2 layout")
    json_path = root / DATASET_JSON
    if not json_path.is_file():
        raise DataValidationError(
            f"{root}: no {DATASET_JSON}; expected an MSD-layout data set "
            "(dataset.json, imagesTr/, labelsTr/), e.g. made by `lrc-ray data synth`, or an nnU-Net v2 one"
        )
    spec = _read_json_object(json_path)
    labels = _parse_labels(spec.get("labels"), json_path)
    if "file_ending" in spec:
        cases = _nnunet_cases(root, spec, json_path)
    else:
        cases = _entry_cases(_entry_list(spec, "training", json_path), root, "training", json_path, label="required")
        cases += _entry_cases(_entry_list(spec, "unlabeled", json_path), root, "unlabeled", json_path, label="ignored")
    if not cases:
        raise DataValidationError(f"{json_path}: lists no volumes; expected entries in 'training' or 'unlabeled'")
    return _dataset(root, str(spec.get("name", root.name)), labels, cases, json_path)


def load_datalist(path: str | Path, *, key: str = "training") -> MsdDataset:
    """The `key` entries of a MONAI datalist; relative paths are relative to the datalist's directory.

    Entries with a label are labelled volumes, entries without one (an object with only
    "image", or a path string) are for pre-training only.
    Raises:
        DataValidationError: naming the file, key or entry that is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(f"{path}: datalist not found; expected a JSON file like BTCV's dataset_0.json")
    spec = _read_json_object(path)
    lists = [name for name, value in spec.items() if isinstance(value, list)]
    if key not in spec:
        close = difflib.get_close_matches(key, lists, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise DataValidationError(
            f"{path}: no key '{key}' (--key); expected one of its lists: {', '.join(lists) or 'none'}{hint}"
        )
    labels = _parse_labels(spec.get("labels"), path)
    cases = _entry_cases(_entry_list(spec, key, path), path.parent, key, path, label="optional")
    if not cases:
        raise DataValidationError(f"{path}: '{key}' lists no volumes")
    return _dataset(path.parent, str(spec.get("name", path.stem)), labels, cases, path, datalist_key=key)


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
        if not is_3d_shape(shape):
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
            f"{case.label_path}: label values {{{shown}}} are not in the data set's 'labels' "
            f"(expected {sorted(labels)})"
        )
    return image, Volume(array=label.array.astype(np.uint8), spacing_mm=label.spacing_mm)


def _read_json_object(json_path: Path) -> dict:
    try:
        spec = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataValidationError(f"{json_path}: not valid JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise DataValidationError(f"{json_path}: expected a JSON object at the top level")
    return spec


def _dataset(root: Path, name: str, labels: dict[int, str], cases: list[CaseEntry], json_path: Path,
             datalist_key: str | None = None) -> MsdDataset:
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case_id in seen:
            raise DataValidationError(
                f"{json_path}: two volumes share the case id '{case.case_id}' "
                f"({seen[case.case_id]} and {case.image_path}); file names must be unique"
            )
        seen[case.case_id] = case.image_path
    return MsdDataset(root=root.resolve(), name=name, labels=labels, cases=tuple(cases), index_file=json_path.resolve(),
                      datalist_key=datalist_key)


def _parse_labels(raw: object, json_path: Path) -> dict[int, str]:
    """Label value -> name from MSD's {"0": "background"} or nnU-Net v2's {"background": 0}."""
    if not isinstance(raw, dict) or not raw:
        raise DataValidationError(
            f"{json_path}: 'labels' must be a non-empty object like {{\"0\": \"background\", \"1\": \"liver\"}}"
        )
    name_to_value = all(not _is_integer_text(key) for key in raw)
    labels: dict[int, str] = {}
    for key, other in raw.items():
        name, value = (key, other) if name_to_value else (other, key)
        if isinstance(value, list):
            raise DataValidationError(
                f"{json_path}: label '{name}' is a region of several values {value}; lrc_ray expects one value per organ"
            )
        try:
            number = int(value) if not isinstance(value, bool) and float(value) == int(value) else None
        except (TypeError, ValueError):
            number = None
        if number is None:
            raise DataValidationError(f"{json_path}: labels entry {key!r}: {value!r} is not an integer label value")
        if not 0 <= number <= 255:
            raise DataValidationError(f"{json_path}: labels value {number} is outside 0..255")
        labels[number] = str(name)
    if 0 not in labels:
        raise DataValidationError(f"{json_path}: 'labels' must name the background value 0")
    return labels


def _is_integer_text(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()


def _nnunet_cases(root: Path, spec: dict, json_path: Path) -> list[CaseEntry]:
    """The training cases of an nnU-Net v2 data set: `dataset` when given, else labelsTr/ with imagesTr/."""
    ending = spec["file_ending"]
    if ending not in NIFTI_ENDINGS:
        raise DataValidationError(f"{json_path}: file_ending {ending!r}; lrc_ray reads NIfTI ({', '.join(NIFTI_ENDINGS)})")
    channels = spec.get("channel_names", {"0": "CT"})
    if not isinstance(channels, dict) or len(channels) != 1:
        raise DataValidationError(f"{json_path}: channel_names {channels!r}; expected one channel (CT)")
    if "dataset" in spec:
        explicit = spec["dataset"]
        if not isinstance(explicit, dict):
            raise DataValidationError(f"{json_path}: 'dataset' must map case ids to {{\"images\": [...], \"label\": ...}}")
        cases = []
        for case_id, item in explicit.items():
            images = item.get("images") if isinstance(item, dict) else None
            if not isinstance(images, list) or len(images) != 1 or "label" not in item:
                raise DataValidationError(f"{json_path}: dataset['{case_id}'] must hold one image in 'images' and a 'label'")
            image = _existing_file(root, images[0], f"dataset['{case_id}'].images[0]", json_path)
            label = _existing_file(root, item["label"], f"dataset['{case_id}'].label", json_path)
            cases.append(CaseEntry(case_id, image, label))
    else:
        label_paths = sorted((root / "labelsTr").glob(f"*{ending}"))
        cases = []
        for label in label_paths:
            case_id = label.name[: -len(ending)]
            image = root / "imagesTr" / f"{case_id}_0000{ending}"
            if not image.is_file():
                raise DataValidationError(f"{label}: no image {image.relative_to(root)}; expected imagesTr/<case>_0000{ending}")
            cases.append(CaseEntry(case_id, image.resolve(), label.resolve()))
    expected = spec.get("numTraining")
    if expected is not None and expected != len(cases):
        raise DataValidationError(f"{json_path}: numTraining is {expected}, but {len(cases)} labelled cases were found")
    return cases


def _entry_cases(entries: list, base: Path, field: str, json_path: Path, *, label: str) -> list[CaseEntry]:
    """Cases from datalist-style entries ({"image": ..., "label": ...} or a path string).

    `label`: "required" (an object with both), "ignored" (the image only) or "optional".
    """
    cases = []
    for index, item in enumerate(entries):
        where = f"{field}[{index}]"
        image_ref = item.get("image") if isinstance(item, dict) else item
        label_ref = item.get("label") if isinstance(item, dict) and label != "ignored" else None
        if label == "required" and (label_ref is None or not isinstance(item, dict)):
            raise DataValidationError(f"{json_path}: {where} must be an object with 'image' and 'label'")
        if isinstance(image_ref, list):
            raise DataValidationError(f"{json_path}: {where}.image lists {len(image_ref)} files; expected one CT image")
        if not isinstance(image_ref, str):
            raise DataValidationError(f"{json_path}: {where} must be a path or an object with 'image'")
        image = _existing_file(base, image_ref, f"{where}.image", json_path)
        label_path = None if label_ref is None else _existing_file(base, label_ref, f"{where}.label", json_path)
        cases.append(CaseEntry(case_id_from_path(image), image, label_path))
    return cases


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


def case_id_from_path(image_path: Path) -> str:
    """A volume's case id: its file name without .nii.gz or .nii."""
    name = image_path.name
    for suffix in NIFTI_ENDINGS:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return image_path.stem
