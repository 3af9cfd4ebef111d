"""The synthetic abdomen: organs, HU, anatomy, smoothness along z, determinism, the MSD files."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lrc_ray.data.nifti import read_volume
from lrc_ray.data.phantom import ORGAN_LABELS, generate_case, write_synthetic_dataset
from lrc_ray.errors import UserInputError

SEEDS = [0, 1, 2, 3]
ID = {name: label for label, name in ORGAN_LABELS.items()}
SMALL = dict(size=32, slices=4)


@pytest.fixture(scope="module", params=SEEDS)
def case(request):
    """One case of the default quick-start size (96 x 96 x 24)."""
    return generate_case(np.random.default_rng(request.param))


def centroid(mask: np.ndarray) -> np.ndarray:
    """(z, row, col) centre of mass of a non-empty mask."""
    assert mask.any()
    return np.argwhere(mask).mean(axis=0)


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The largest connected component above -500 HU: the patient without the table."""
    components, _ = ndimage.label(hu > -500)
    sizes = np.bincount(components.ravel())[1:]
    return components == 1 + int(np.argmax(sizes))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_organ_ids_are_contiguous_from_background():
    assert list(ORGAN_LABELS) == list(range(len(ORGAN_LABELS)))
    assert ORGAN_LABELS[0] == "background"
    required = "spleen right_kidney left_kidney gallbladder liver stomach aorta inferior_vena_cava pancreas"
    assert [ORGAN_LABELS[i] for i in range(1, 10)] == required.split()


def test_case_arrays_and_spacing(case):
    assert case.hu.shape == case.labels.shape == (24, 96, 96)
    assert case.hu.dtype == np.int16 and case.labels.dtype == np.uint8
    assert case.hu.min() >= -1024 and case.hu.max() <= 3071
    spacing_z, spacing_row, spacing_col = case.spacing_mm
    assert 2.5 <= spacing_z <= 5.0
    assert spacing_row == spacing_col
    assert 350 <= 96 * spacing_row <= 515  # a clinical field of view whatever the matrix size


def test_every_organ_is_present(case):
    assert set(np.unique(case.labels).tolist()) == set(ORGAN_LABELS)


def test_tissue_intensities(case):
    hu, labels = case.hu.astype(np.float32), case.labels
    median = {name: float(np.median(hu[labels == label])) for label, name in ORGAN_LABELS.items() if label}
    assert 48 <= median["liver"] <= 72  # 55-65 HU, plus at most ~6 HU of bias field
    assert 35 <= median["spleen"] <= 60
    assert 30 <= median["pancreas"] <= 55
    assert -10 <= median["gallbladder"] <= 30
    assert median["aorta"] > median["inferior_vena_cava"] > median["liver"] + 20
    assert median["right_kidney"] > median["liver"] + 40 and median["left_kidney"] > median["liver"] + 40

    body = body_mask(case.hu)
    far_outside = ~ndimage.binary_dilation(hu > -500, iterations=3)
    assert np.percentile(hu[far_outside], 99) < -900
    fat = (hu > -150) & (hu < -50) & body
    assert fat.mean() > 0.05  # subcutaneous and visceral fat are a real part of the image
    bone = (hu > 300) & body
    assert bone.sum() > 100 and hu.max() > 600


def test_anatomical_placement(case):
    hu, labels = case.hu, case.labels
    body = body_mask(hu)
    mid_col = centroid(body)[2]

    def centre(name):
        return centroid(labels == ID[name])

    # Display order: image left (low col) is the patient's right; row 0 is anterior.
    assert centre("liver")[2] < mid_col < centre("spleen")[2]
    assert centre("right_kidney")[2] < mid_col < centre("left_kidney")[2]
    assert centre("inferior_vena_cava")[2] < centre("aorta")[2]
    assert centre("stomach")[2] > mid_col
    assert centre("gallbladder")[2] < mid_col
    assert centre("gallbladder")[1] < centre("right_kidney")[1]  # anterior
    assert centre("stomach")[1] < centre("spleen")[1]

    near_midline = np.abs(np.arange(hu.shape[2]) - mid_col) < 0.1 * hu.shape[2]
    spine = (hu > 300) & body & near_midline[None, None, :]
    assert centre("aorta")[1] < centroid(spine)[1]
    assert centre("pancreas")[1] < centre("aorta")[1]


def test_organs_appear_along_z_plausibly(case):
    labels = case.labels
    area = {name: (labels == label).sum(axis=(1, 2)) for label, name in ORGAN_LABELS.items() if label}
    lower, upper = slice(0, 12), slice(12, 24)
    assert area["liver"][upper].sum() > 2 * area["liver"][lower].sum()
    assert area["spleen"][upper].sum() > area["spleen"][lower].sum()
    assert area["liver"][0] == 0 and area["spleen"][0] == 0  # the bottom slice lies below both
    assert (area["gallbladder"] > 0).sum() <= 8
    assert area["right_kidney"][-1] == 0 and area["left_kidney"][-1] == 0  # the top slice lies above both
    assert (area["aorta"] > 0).all()


@pytest.mark.parametrize("name", ["liver", "spleen", "stomach", "right_kidney", "left_kidney"])
def test_organs_change_smoothly_between_slices(case, name):
    mask = case.labels == ID[name]
    areas = mask.sum(axis=(1, 2))
    for z in range(len(mask) - 1):
        # Near the poles a cross-section shrinks fast, as real ones do; judge the body of the organ.
        if min(areas[z], areas[z + 1]) >= 0.5 * areas.max():
            assert dice(mask[z], mask[z + 1]) > 0.7, f"{name}: slices {z} and {z + 1}"


def test_body_outline_changes_smoothly(case):
    body = body_mask(case.hu)
    assert min(dice(body[z], body[z + 1]) for z in range(len(body) - 1)) > 0.9


def test_same_seed_same_case_and_different_seed_different_case():
    first, again = (generate_case(np.random.default_rng(7), **SMALL) for _ in range(2))
    other = generate_case(np.random.default_rng(8), **SMALL)
    assert first.hu.tobytes() == again.hu.tobytes()
    assert first.labels.tobytes() == again.labels.tobytes()
    assert first.spacing_mm == again.spacing_mm
    assert not np.array_equal(first.hu, other.hu)


def test_generate_case_rejects_a_small_matrix():
    with pytest.raises(UserInputError, match="--size"):
        generate_case(np.random.default_rng(0), size=16)


def test_written_dataset_round_trip(tmp_path):
    root = write_synthetic_dataset(tmp_path / "synthetic", cases=1, unlabeled=0, size=64, slices=12, seed=5)
    assert root == tmp_path / "synthetic"
    image_path, label_path = root / "imagesTr" / "case_000.nii.gz", root / "labelsTr" / "case_000.nii.gz"
    assert nib.load(image_path).get_data_dtype() == np.int16
    assert nib.load(label_path).get_data_dtype() == np.uint8
    image, label = read_volume(image_path), read_volume(label_path)
    assert image.array.shape == label.array.shape == (12, 64, 64)
    assert image.spacing_mm == pytest.approx(label.spacing_mm)
    spacing_z, spacing_row, spacing_col = image.spacing_mm
    assert 2.5 <= spacing_z <= 5.0 and spacing_row == pytest.approx(spacing_col)
    assert 350 <= 64 * spacing_row <= 515
    assert set(np.unique(label.array).astype(int).tolist()) == set(ORGAN_LABELS)
    # Display order survives the RAS+ file: liver on image left, above the kidney, gallbladder in front.
    organ = {name: centroid(label.array == ID[name]) for name in ("liver", "spleen", "right_kidney", "gallbladder")}
    assert organ["liver"][2] < organ["spleen"][2]
    assert organ["right_kidney"][0] < organ["liver"][0]
    assert organ["gallbladder"][1] < organ["right_kidney"][1]


def test_dataset_json_lists_every_file_and_monai_reads_it(tmp_path):
    from monai.data import load_decathlon_datalist

    root = write_synthetic_dataset(tmp_path / "synthetic", cases=2, unlabeled=3, seed=5, **SMALL)
    manifest = json.loads((root / "dataset.json").read_text())
    assert manifest["name"] == "lrc_ray synthetic abdomen"
    assert manifest["tensorImageSize"] == "3D" and manifest["modality"] == {"0": "CT"}
    assert manifest["labels"] == {str(label): name for label, name in ORGAN_LABELS.items()}
    assert (manifest["numTraining"], manifest["numUnlabeled"]) == (2, 3)

    training = load_decathlon_datalist(str(root / "dataset.json"), data_list_key="training")
    unlabeled = load_decathlon_datalist(str(root / "dataset.json"), data_list_key="unlabeled")
    listed = {item["image"] for item in training + unlabeled} | {item["label"] for item in training}
    written = {str(path) for path in root.rglob("*.nii.gz")}
    assert listed == written and len(written) == 2 * 2 + 3
    assert sorted(path.name for path in root.iterdir()) == ["dataset.json", "imagesTr", "imagesUnlabeled", "labelsTr"]


def test_a_case_does_not_depend_on_how_many_are_made(tmp_path):
    few = write_synthetic_dataset(tmp_path / "few", cases=1, unlabeled=1, seed=11, **SMALL)
    many = write_synthetic_dataset(tmp_path / "many", cases=3, unlabeled=2, seed=11, **SMALL)
    for relative in ("imagesTr/case_000.nii.gz", "labelsTr/case_000.nii.gz", "imagesUnlabeled/unlabeled_000.nii.gz"):
        np.testing.assert_array_equal(read_volume(few / relative).array, read_volume(many / relative).array)
    different = read_volume(many / "imagesTr/case_001.nii.gz").array
    assert not np.array_equal(read_volume(many / "imagesTr/case_000.nii.gz").array, different)


@pytest.mark.parametrize(
    "option, kwargs",
    [
        ("--cases", dict(cases=0)),
        ("--cases", dict(cases=2.0)),
        ("--cases", dict(cases=True)),
        ("--unlabeled", dict(unlabeled=-1)),
        ("--size", dict(size=31)),
        ("--slices", dict(slices=3)),
        ("--seed", dict(seed=-1)),
    ],
)
def test_bad_arguments_are_named_and_nothing_is_written(tmp_path, option, kwargs):
    with pytest.raises(UserInputError, match=f"^{re.escape(option)}: expected an integer >= "):
        write_synthetic_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_fixed_field_of_view_sets_the_spacing_and_keeps_the_anatomy_in_mm():
    def organ_area_mm2(fov):  # mean labelled area per slice over four patients
        cases = [generate_case(np.random.default_rng(seed), size=64, slices=6, field_of_view_mm=fov) for seed in range(4)]
        assert {case.spacing_mm[1:] for case in cases} == {(round(fov / 64, 3),) * 2}
        return np.mean([(case.labels > 0).mean(axis=0).sum() * case.spacing_mm[1] * case.spacing_mm[2] for case in cases])

    tight, wide = organ_area_mm2(360), organ_area_mm2(500)
    assert tight == pytest.approx(wide, rel=0.15), "organs are drawn in mm, whatever the field"
    default = generate_case(np.random.default_rng(5), size=64, slices=6)
    assert default.spacing_mm[1] not in (5.625, 7.812), "without a field, it is fitted to the patient"


@pytest.mark.parametrize("field", [100, 2000, True, "400"])
def test_bad_field_of_view_is_named_and_nothing_is_written(tmp_path, field):
    with pytest.raises(UserInputError, match=r"^--field-of-view: expected a field of view in mm in \[150, 1000\]"):
        write_synthetic_dataset(tmp_path / "out", field_of_view_mm=field)
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_directory_is_never_overwritten(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    with pytest.raises(UserInputError, match="exists and is not empty; choose a new directory"):
        write_synthetic_dataset(out_dir, **SMALL)
    assert [path.name for path in out_dir.iterdir()] == ["notes.txt"]


def test_an_empty_output_directory_is_used(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    write_synthetic_dataset(out_dir, cases=1, unlabeled=0, **SMALL)
    assert (out_dir / "dataset.json").is_file()
