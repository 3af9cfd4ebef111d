"""The `lrc-ray` command line: bad input gives one line and exit code 2, before any work."""

import json

import nibabel as nib
import numpy as np
import pytest

from lrc_ray.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["-q", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int, err: str, pattern: str) -> None:
    import re

    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrc-ray: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def test_synth_writes_a_data_set(capsys, tmp_path):
    code, out, _ = _run(capsys, "data", "synth", "--out", str(tmp_path / "d"), "--cases", "1", "--unlabeled", "0",
                        "--size", "32", "--slices", "4")
    assert code == 0 and "wrote 1 labelled" in out
    assert json.loads((tmp_path / "d" / "dataset.json").read_text())["numTraining"] == 1


def test_synth_rejects_bad_counts(capsys, tmp_path):
    code, _, err = _run(capsys, "data", "synth", "--out", str(tmp_path / "d"), "--cases", "0")
    _assert_one_line_error(code, err, r"--cases: expected an integer >= 1, got 0")
    assert not (tmp_path / "d" / "dataset.json").exists()


@pytest.mark.parametrize(
    ("option", "value", "pattern"),
    [("--scale", "0", r"scale: expected a positive number"), ("--sigma", "-1", r"sigma: expected a positive number"),
     ("--min-size", "0", r"min_size: expected a positive number")],
)
def test_superpixel_parameters_must_be_positive(capsys, tiny_dataset, tmp_path, option, value, pattern):
    code, _, err = _run(capsys, "superpixels", "--data", str(tiny_dataset), "--out", str(tmp_path / "c"), option, value)
    _assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "c").exists()


def test_out_path_that_is_not_a_cache(capsys, tiny_dataset, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, "superpixels", "--data", str(tiny_dataset), "--out", str(tmp_path / "c"))
    _assert_one_line_error(code, err, r"c: exists and is not an lrc_ray super-pixel cache")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["notes.txt"]


def test_data_directory_without_dataset_json(capsys, tmp_path):
    code, _, err = _run(capsys, "superpixels", "--data", str(tmp_path), "--out", str(tmp_path / "c"))
    _assert_one_line_error(code, err, r"no dataset.json")


def test_entry_pointing_to_a_missing_file(capsys, dataset_copy, tmp_path):
    (dataset_copy / "imagesTr" / "case_000.nii.gz").unlink()
    code, _, err = _run(capsys, "superpixels", "--data", str(dataset_copy), "--out", str(tmp_path / "c"))
    _assert_one_line_error(code, err, r"dataset.json: training\[0\].image points to a missing file ./imagesTr/case_000.nii.gz")


def test_data_set_with_no_volumes(capsys, dataset_copy, tmp_path):
    spec = json.loads((dataset_copy / "dataset.json").read_text())
    spec.update(training=[], unlabeled=[])
    (dataset_copy / "dataset.json").write_text(json.dumps(spec))
    code, _, err = _run(capsys, "superpixels", "--data", str(dataset_copy), "--out", str(tmp_path / "c"))
    _assert_one_line_error(code, err, r"dataset.json: lists no volumes")


def test_image_and_label_shapes_differ(capsys, dataset_copy, tmp_path):
    label_path = dataset_copy / "labelsTr" / "case_001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 6), np.uint8), np.eye(4)), label_path)
    code, _, err = _run(capsys, "superpixels", "--data", str(dataset_copy), "--out", str(tmp_path / "c"))
    _assert_one_line_error(code, err, r"case_001.nii.gz: label shape \(10, 10, 6\) differs from image shape")


def test_non_3d_image(capsys, dataset_copy, tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((48, 48), np.int16), np.eye(4)), dataset_copy / "imagesTr" / "case_001.nii.gz")
    code, _, err = _run(capsys, "superpixels", "--data", str(dataset_copy), "--out", str(tmp_path / "c"))
    _assert_one_line_error(code, err, r"case_001.nii.gz: expected a 3D volume, got shape \(48, 48\)")


def test_workers_must_be_positive(capsys, tiny_dataset, tmp_path):
    code, _, err = _run(capsys, "superpixels", "--data", str(tiny_dataset), "--out", str(tmp_path / "c"), "--workers", "0")
    _assert_one_line_error(code, err, r"--workers: expected at least 1, got 0")


def test_datalist_key_that_is_missing(capsys, tiny_dataset, tmp_path, as_datalist):
    datalist = as_datalist(tiny_dataset, tmp_path / "btcv")
    code, _, err = _run(capsys, "superpixels", "--datalist", str(datalist), "--key", "test", "--out", str(tmp_path / "c"))
    _assert_one_line_error(code, err, r"dataset_0.json: no key 'test' \(--key\); expected one of its lists: training, validation")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("both", [True, False])
def test_data_or_datalist_exactly_one(capsys, tiny_dataset, tmp_path, as_datalist, both):
    sources = ["--data", str(tiny_dataset), "--datalist", str(as_datalist(tiny_dataset, tmp_path / "btcv"))] if both else []
    code, _, err = _run(capsys, "superpixels", *sources, "--out", str(tmp_path / "c"))
    _assert_one_line_error(code, err, r"--data or --datalist: expected exactly one data set")


def test_scan_whose_orientation_cannot_be_determined(capsys, dataset_copy, tmp_path):
    path = dataset_copy / "imagesTr" / "case_001.nii.gz"
    image = nib.load(str(path))
    unoriented = nib.Nifti1Image(np.asarray(image.dataobj), None)  # no qform, no sform
    nib.save(unoriented, str(path))
    code, _, err = _run(capsys, "superpixels", "--data", str(dataset_copy), "--out", str(tmp_path / "c"))
    _assert_one_line_error(code, err, r"case_001.nii.gz: orientation cannot be determined \(qform_code and sform_code are both 0\)")
    assert not (tmp_path / "c").exists()


def test_finetune_on_a_datalist_names_the_command_that_builds_its_cache(capsys, tiny_dataset, tmp_path, as_datalist):
    datalist = as_datalist(tiny_dataset, tmp_path / "btcv")
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {{cache_root: {tmp_path / 'cache'}, size: 32, spacing_mm: 10.0}}\n")
    code, _, err = _run(capsys, "finetune", "--config", str(config), "--datalist", str(datalist), "--key", "training",
                        "--label-fraction", "1")
    _assert_one_line_error(code, err, rf"no super-pixel cache .* make it with `lrc-ray superpixels --datalist {datalist} "
                                      r"--key training --out .* --size 32 --spacing 10`")
    code, _, err = _run(capsys, "finetune", "--data", str(tiny_dataset), "--datalist", str(datalist), "--label-fraction", "1")
    _assert_one_line_error(code, err, r"--data or --datalist: expected one data set, got both")
