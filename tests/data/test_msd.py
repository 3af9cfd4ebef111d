import json

import numpy as np
import pytest

from lrc_ray.data.msd import check_headers, load_msd_dataset, read_case
from lrc_ray.data.nifti import read_volume, write_volume
from lrc_ray.errors import DataValidationError


def _edit_json(root, edit):
    path = root / "dataset.json"
    spec = json.loads(path.read_text())
    edit(spec)
    path.write_text(json.dumps(spec))


def test_reads_labelled_and_unlabelled_cases(tiny_dataset):
    dataset = load_msd_dataset(tiny_dataset)
    assert len(dataset.cases) == 3
    assert len(dataset.labelled_cases) == 2
    assert dataset.labels[0] == "background"
    assert all(path.is_file() for path in dataset.files)
    summary = check_headers(dataset)
    assert (summary.total_slices, summary.max_slice_pixels) == (3 * 6, 48 * 48)


def test_monai_reads_the_same_file(tiny_dataset):
    from monai.data import load_decathlon_datalist

    items = load_decathlon_datalist(str(tiny_dataset / "dataset.json"), data_list_key="training")
    dataset = load_msd_dataset(tiny_dataset)
    assert sorted(item["image"] for item in items) == sorted(str(c.image_path) for c in dataset.labelled_cases)


def test_read_case_gives_display_order_volumes(tiny_dataset):
    dataset = load_msd_dataset(tiny_dataset)
    image, label = read_case(dataset.labelled_cases[0], dataset.labels)
    assert image.array.shape == label.array.shape == (6, 48, 48)
    assert label.array.dtype == np.uint8
    unlabelled = [case for case in dataset.cases if case.label_path is None][0]
    assert read_case(unlabelled, dataset.labels)[1] is None


def test_directory_without_dataset_json(tmp_path):
    with pytest.raises(DataValidationError, match=r"no dataset.json; expected an MSD-layout"):
        load_msd_dataset(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(DataValidationError, match=r"nowhere: not a directory"):
        load_msd_dataset(tmp_path / "nowhere")


def test_invalid_json(dataset_copy):
    (dataset_copy / "dataset.json").write_text("{not json")
    with pytest.raises(DataValidationError, match=r"dataset.json: not valid JSON"):
        load_msd_dataset(dataset_copy)


def test_no_volumes(dataset_copy):
    _edit_json(dataset_copy, lambda spec: spec.update(training=[], unlabeled=[]))
    with pytest.raises(DataValidationError, match=r"dataset.json: lists no volumes"):
        load_msd_dataset(dataset_copy)


def test_entry_pointing_to_missing_file(dataset_copy):
    (dataset_copy / "labelsTr" / "case_001.nii.gz").unlink()
    with pytest.raises(DataValidationError, match=r"training\[1\].label points to a missing file .*case_001"):
        load_msd_dataset(dataset_copy)


def test_labels_map_must_name_background(dataset_copy):
    _edit_json(dataset_copy, lambda spec: spec.update(labels={"1": "liver"}))
    with pytest.raises(DataValidationError, match=r"'labels' must name the background value 0"):
        load_msd_dataset(dataset_copy)


def test_label_values_outside_the_labels_map(dataset_copy):
    label_path = dataset_copy / "labelsTr" / "case_000.nii.gz"
    label = read_volume(label_path, dtype=np.uint8)
    damaged = label.array.copy()
    damaged[0, 0, 0] = 77
    write_volume(label_path, damaged, label.spacing_mm)
    dataset = load_msd_dataset(dataset_copy)
    with pytest.raises(DataValidationError, match=r"case_000.nii.gz: label values \{77\} are not in the data set's 'labels'"):
        read_case(dataset.labelled_cases[0], dataset.labels)


def test_image_and_label_shapes_differ(dataset_copy):
    label_path = dataset_copy / "labelsTr" / "case_001.nii.gz"
    label = read_volume(label_path, dtype=np.uint8)
    write_volume(label_path, label.array[:, :40, :], label.spacing_mm)
    dataset = load_msd_dataset(dataset_copy)
    with pytest.raises(DataValidationError, match=r"case_001.nii.gz: label shape .* differs from image shape"):
        check_headers(dataset)


def test_non_3d_image(dataset_copy):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((48, 48), np.int16), np.eye(4)), dataset_copy / "imagesTr" / "case_000.nii.gz")
    with pytest.raises(DataValidationError, match=r"case_000.nii.gz: expected a 3D volume"):
        check_headers(load_msd_dataset(dataset_copy))
