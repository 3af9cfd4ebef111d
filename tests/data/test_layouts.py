"""nnU-Net v2 data sets, MONAI datalists, other image dtypes and unreadable orientations.

Each layout is made here from the tiny synthetic MSD data set, so the volumes must read back equal.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lrc_ray.data.msd import check_headers, load_dataset, load_datalist, load_msd_dataset, read_case
from lrc_ray.data.phantom import ORGAN_LABELS
from lrc_ray.errors import DataValidationError


def _same_volumes(dataset, reference) -> None:
    by_id = {case.case_id: case for case in reference.cases}
    for case in dataset.labelled_cases:
        image, label = read_case(case, dataset.labels)
        expected_image, expected_label = read_case(by_id[case.case_id], reference.labels)
        np.testing.assert_array_equal(image.array, expected_image.array)
        np.testing.assert_array_equal(label.array, expected_label.array)
        assert image.spacing_mm == pytest.approx(expected_image.spacing_mm)


def test_nnunet_v2_layout_with_int32_images_and_float_labels(tiny_dataset, tmp_path, as_nnunet):
    root = as_nnunet(tiny_dataset, tmp_path / "Dataset001_Tiny")
    dataset = load_dataset(root)
    assert dataset.labels == ORGAN_LABELS
    assert [case.case_id for case in dataset.cases] == ["case_000", "case_001"]
    assert all(case.label_path is not None for case in dataset.cases)
    assert check_headers(dataset).total_slices == 2 * 6
    _same_volumes(dataset, load_msd_dataset(tiny_dataset))


def test_nnunet_v2_explicit_dataset_map(tiny_dataset, tmp_path, as_nnunet):
    root = as_nnunet(tiny_dataset, tmp_path / "nn")
    spec = json.loads((root / "dataset.json").read_text())
    spec["dataset"] = {"only": {"images": ["imagesTr/case_001_0000.nii.gz"], "label": "labelsTr/case_001.nii.gz"}}
    spec["numTraining"] = 1
    (root / "dataset.json").write_text(json.dumps(spec))
    dataset = load_dataset(root)
    assert [(case.case_id, case.label_path.name) for case in dataset.cases] == [("only", "case_001.nii.gz")]


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda spec: spec.update(numTraining=5), r"dataset.json: numTraining is 5, but 2 labelled cases were found"),
        (lambda spec: spec.update(file_ending=".png"), r"dataset.json: file_ending '.png'; lrc_ray reads NIfTI"),
        (lambda spec: spec.update(channel_names={"0": "CT", "1": "PET"}), r"channel_names .*; expected one channel"),
        (lambda spec: spec["labels"].update(tumour=[1, 2]), r"label 'tumour' is a region of several values \[1, 2\]"),
        (lambda spec: spec["labels"].pop("background"), r"'labels' must name the background value 0"),
    ],
)
def test_nnunet_v2_bad_dataset_json(tiny_dataset, tmp_path, as_nnunet, edit, pattern):
    root = as_nnunet(tiny_dataset, tmp_path / "nn")
    spec = json.loads((root / "dataset.json").read_text())
    edit(spec)
    (root / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DataValidationError, match=pattern):
        load_dataset(root)


def test_nnunet_v2_label_without_its_image(tiny_dataset, tmp_path, as_nnunet):
    root = as_nnunet(tiny_dataset, tmp_path / "nn")
    (root / "imagesTr" / "case_001_0000.nii.gz").unlink()
    with pytest.raises(DataValidationError, match=r"labelsTr/case_001.nii.gz: no image imagesTr/case_001_0000.nii.gz"):
        load_dataset(root)


def test_monai_datalist_by_key_with_paths_relative_to_its_directory(tiny_dataset, tmp_path, as_datalist):
    from monai.data import load_decathlon_datalist

    path = as_datalist(tiny_dataset, tmp_path / "btcv")
    training = load_dataset(None, datalist=path, key="training")
    assert [(case.case_id, case.label_path is not None) for case in training.cases] == [
        ("case_000", True), ("unlabeled_000", False)]
    validation = load_datalist(path, key="validation")
    assert [case.case_id for case in validation.cases] == ["case_001"]
    assert validation.files[0] == path.resolve(), "the datalist is part of the data set's fingerprint"
    # MONAI resolves the same files.
    monai_items = load_decathlon_datalist(str(path), data_list_key="validation")
    assert [Path(item["image"]) for item in monai_items] == [case.image_path for case in validation.cases]
    _same_volumes(validation, load_msd_dataset(tiny_dataset))


def test_datalist_key_that_is_missing(tiny_dataset, tmp_path, as_datalist):
    path = as_datalist(tiny_dataset, tmp_path / "btcv")
    with pytest.raises(DataValidationError, match=r"dataset_0.json: no key 'validaton' \(--key\); expected one of its "
                                                  r"lists: training, validation; did you mean 'validation'\?"):
        load_datalist(path, key="validaton")


def test_datalist_without_labels_or_with_a_missing_file(tiny_dataset, tmp_path, as_datalist):
    path = as_datalist(tiny_dataset, tmp_path / "btcv")
    spec = json.loads(path.read_text())
    path.write_text(json.dumps({key: value for key, value in spec.items() if key != "labels"}))
    with pytest.raises(DataValidationError, match=r"dataset_0.json: 'labels' must be a non-empty object"):
        load_datalist(path)
    spec["validation"][0]["label"] = "labelsTr/nothing.nii.gz"
    path.write_text(json.dumps(spec))
    with pytest.raises(DataValidationError, match=r"validation\[0\].label points to a missing file labelsTr/nothing"):
        load_datalist(path, key="validation")
    with pytest.raises(DataValidationError, match=r"elsewhere.json: datalist not found"):
        load_datalist(tmp_path / "elsewhere.json")


def _save_with_header(path: Path, edit) -> None:
    image = nib.load(str(path))
    image = nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header)
    edit(image)
    nib.save(image, str(path))


def test_scan_whose_orientation_cannot_be_determined(dataset_copy):
    image_path = dataset_copy / "imagesTr" / "case_000.nii.gz"
    _save_with_header(image_path, lambda image: (image.set_qform(None, code=0), image.set_sform(None, code=0)))
    with pytest.raises(DataValidationError, match=r"case_000.nii.gz: orientation cannot be determined \(qform_code and sform_code"):
        check_headers(load_dataset(dataset_copy))


def test_scan_with_a_degenerate_affine(dataset_copy):
    image_path = dataset_copy / "imagesTr" / "case_001.nii.gz"
    degenerate = np.eye(4)
    degenerate[:3, :3] = [[1, 1, 0], [1, 1, 0], [0, 0, 3]]
    _save_with_header(image_path, lambda image: (image.set_qform(None, code=0), image.set_sform(degenerate, code=1)))
    dataset = load_dataset(dataset_copy)
    with pytest.raises(DataValidationError, match=r"case_001.nii.gz: orientation cannot be determined \(the affine's axes are degenerate"):
        read_case(dataset.labelled_cases[1], dataset.labels)


def test_image_that_is_not_3d(dataset_copy):
    image_path = dataset_copy / "imagesTr" / "case_000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((48, 48, 6, 2), np.int16), np.eye(4)), str(image_path))
    with pytest.raises(DataValidationError, match=r"case_000.nii.gz: expected a 3D volume, got shape \(48, 48, 6, 2\)"):
        check_headers(load_dataset(dataset_copy))
