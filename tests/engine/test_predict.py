"""Segmenting whole scans on their own grid, and the saved model file (plain layer, no Ray)."""

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lrc_ray.config import RunConfig
from lrc_ray.data.geometry import put_back
from lrc_ray.data.msd import CaseEntry
from lrc_ray.data.phantom import ORGAN_LABELS, generate_case
from lrc_ray.data.slices import SliceParams, prepare_slices
from lrc_ray.engine.metrics import volume_dice
from lrc_ray.engine.predict import evaluate_cases, output_paths, scans_of_files, segment_file, segment_volume
from lrc_ray.engine.saved_model import MODEL_KIND, load_model, save_model
from lrc_ray.errors import UserInputError
from lrc_ray.models.networks import SegmentationNetwork

NUM_CLASSES = len(ORGAN_LABELS)
TINY = {"features": [4, 4, 8, 8, 16, 4], "global_dim": 8, "global_hidden": 16, "local_dim": 8}


class Oracle(torch.nn.Module):
    """A stand-in network that returns given working-grid logits (Z, C, S, S), batch by batch in
    order: what a perfect model predicts, to check what happens after the network."""

    def __init__(self, logits: np.ndarray):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device to run on
        self.logits, self.done = torch.from_numpy(np.asarray(logits, dtype=np.float32)), 0

    def forward(self, x):
        batch = self.logits[self.done:self.done + len(x)]
        self.done += len(x)
        assert batch.shape[-2:] == x.shape[-2:]
        return batch


def confident(labels: np.ndarray) -> np.ndarray:
    """Logits (Z, C, H, W) that are sure of the labels (Z, H, W)."""
    return 10.0 * F.one_hot(torch.from_numpy(labels.astype(np.int64)), NUM_CLASSES).permute(0, 3, 1, 2).numpy()


def _mean_present(dice: np.ndarray) -> float:
    return float(np.nanmean(dice))


@pytest.fixture(scope="module")
def scan():
    """A non-square scan: 112 x 128 px at 3.125 mm."""
    case = generate_case(np.random.default_rng(5), size=128, slices=6, field_of_view_mm=400.0)
    return case.hu[:, 8:120, :].astype(np.float32), case.labels[:, 8:120, :], case.spacing_mm


def test_the_best_working_grid_prediction_lands_on_the_native_labels(scan):
    """The working grid (64 px at 5 mm: resampled, then cropped along columns and padded along rows)
    is coarser than the scan's. A perfect model there predicts each working pixel's organ fractions;
    put back as probabilities they beat nearest labels of the same prediction."""
    hu, labels, spacing = scan
    slicing = SliceParams(size=64, spacing_mm=5.0)
    geometry = slicing.geometry(hu.shape[1:], spacing[1:])
    assert geometry.resampled_shape == (70, 80) and geometry.offset == (-3, -8)
    from lrc_ray.data.geometry import to_working_grid

    fractions = to_working_grid(confident(labels) / 10.0, geometry, order=1, fill=0.0)  # (Z, C, 64, 64)
    predicted = segment_volume(Oracle(10.0 * fractions), hu, native_spacing_mm=spacing[1:], slicing=slicing,
                               batch_size=4)
    assert predicted.shape == labels.shape and predicted.dtype == np.uint8
    probabilities_dice = _mean_present(volume_dice(predicted, labels, NUM_CLASSES))
    nearest = put_back(fractions.argmax(axis=1).astype(np.uint8), geometry, order=0)
    nearest_dice = _mean_present(volume_dice(nearest, labels, NUM_CLASSES))
    print(f"native Dice: probabilities {probabilities_dice:.4f}, nearest {nearest_dice:.4f}")
    assert probabilities_dice > 0.8 and probabilities_dice > nearest_dice, (probabilities_dice, nearest_dice)
    cropped_columns = np.r_[0:12, 116:128]  # 8 working-grid columns of 5 mm each side: beyond the kept field
    assert (predicted[:, :, cropped_columns] == 0).all(), "pixels the crop cut off are background"


def _nifti(path, array_xyz, affine):
    image = nib.Nifti1Image(array_xyz, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)
    nib.save(image, str(path))
    return path


def test_a_scan_in_another_orientation_comes_back_with_its_own_shape_affine_and_axis_order(scan, tmp_path):
    """An LPS-like file with its axes permuted, stored as int32 (X, Y, Z, 1): the labels written are
    the label file's array, voxel for voxel (no resampling: the working grid is the scan's)."""
    hu, labels, spacing = scan
    affine = np.array([[0.0, -spacing[2], 0, 12.0], [-spacing[1], 0.0, 0, -7.0], [0, 0, spacing[0], 30.0], [0, 0, 0, 1]])
    # the display volume -> this file's axes: row (anterior->posterior) is x, column is y, both flipped
    to_file = lambda volume: np.ascontiguousarray(volume.transpose(1, 2, 0)[:, :, :, None])  # noqa: E731
    image = _nifti(tmp_path / "scan.nii.gz", to_file(hu).astype(np.int32), affine)
    label = _nifti(tmp_path / "label.nii.gz", to_file(labels).astype(np.uint8), affine)
    slicing = SliceParams(size=None, spacing_mm=None)  # keep the scan's grid: the oracle's labels are exact
    stored_labels = np.asarray(nib.load(str(label)).dataobj)
    from lrc_ray.data.nifti import read_volume

    oracle = Oracle(confident(read_volume(label).array))
    out = segment_file(oracle, slicing, image, tmp_path / "out" / "scan.nii.gz")
    written, original = nib.load(str(out)), nib.load(str(image))
    assert written.shape == original.shape == (112, 128, 6, 1)
    assert np.array_equal(written.affine, original.affine) and written.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(written.dataobj), stored_labels)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["scan.nii.gz"], "no temporary file left"


def test_evaluation_scores_the_native_grid_and_reports_absent_organs_as_absent(scan, tmp_path):
    hu, labels, spacing = scan
    without_liver = np.where(labels == 5, 0, labels).astype(np.uint8)
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    from lrc_ray.data.nifti import display_to_ras

    image = _nifti(tmp_path / "a.nii.gz", display_to_ras(hu).astype(np.int16), affine)
    label = _nifti(tmp_path / "a_label.nii.gz", display_to_ras(without_liver), affine)
    slicing = SliceParams(size=64, spacing_mm=5.0)
    working = prepare_slices(hu, without_liver, slicing, native_spacing_mm=spacing[1:]).labels
    scores = evaluate_cases(Oracle(confident(working)), [CaseEntry("a", image, label)], labels=ORGAN_LABELS, slicing=slicing)
    assert scores["dice_per_volume"]["a"]["liver"] is None and scores["dice_per_organ"]["liver"] is None
    assert 0.85 < scores["dice_mean"] < 1.0, "native-grid Dice of a perfect working-grid prediction"


def test_output_names_and_bad_scans(tmp_path, tiny_dataset):
    scans = sorted((tiny_dataset / "imagesTr").glob("*.nii.gz"))
    assert [p.name for p in output_paths(scans_of_files(scans), tmp_path)] == [p.name for p in scans]
    assert output_paths([("case_7", scans[0])], tmp_path) == [tmp_path / "case_7.nii.gz"], "a data set's case id"
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserInputError, match=r"notes.txt: expected a 3D NIfTI image \(.nii.gz or .nii\)"):
        output_paths(scans_of_files([tmp_path / "notes.txt"]), tmp_path)
    flat = _nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.int16), np.eye(4))
    with pytest.raises(UserInputError, match=r"flat.nii.gz: expected a 3D volume, got shape \(8, 8\)"):
        output_paths(scans_of_files([flat]), tmp_path)
    (tmp_path / "copy").mkdir()
    twin = shutil.copy(scans[0], tmp_path / "copy")
    with pytest.raises(UserInputError, match=r"case name 'case_000' is also"):
        output_paths(scans_of_files([scans[0], twin]), tmp_path)


# --- saved models ---------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    config = RunConfig().replace(data={"size": 32, "spacing_mm": 7.5}, network=TINY)
    torch.manual_seed(0)
    model = SegmentationNetwork(config.network, NUM_CLASSES)
    return model, config, save_model(tmp_path / "model.pt", model, config=config, labels=ORGAN_LABELS)


def test_a_saved_model_describes_itself_and_loads_weights_only(saved):
    model, config, path = saved
    raw = torch.load(path, weights_only=True)
    assert raw["kind"] == MODEL_KIND and raw["config"] == config.to_dict() and raw["labels"]["5"] == "liver"
    assert raw["preprocessing"]["spacing_mm"] == 7.5 and raw["preprocessing"]["size"] == 32
    assert raw["preprocessing"]["window_hu"] == list(config.data.window_hu)
    loaded = load_model(path)
    assert loaded.labels == ORGAN_LABELS and loaded.slicing == SliceParams(window_hu=config.data.window_hu, size=32, spacing_mm=7.5)
    x = torch.rand(2, 1, 32, 32)
    model.eval()
    assert torch.equal(loaded.model(x), model(x)) and not loaded.model.training


def test_files_that_are_not_lrc_ray_models_are_one_line(saved, tmp_path):
    from lrc_ray.engine.checkpoint import save_checkpoint

    model, config, path = saved
    (tmp_path / "garbage.pt").write_bytes(b"not a model")
    checkpoint = save_checkpoint(tmp_path / "checkpoint.pt", state_dict={}, config=config.to_dict(), epoch=0, history=[])
    other = torch.load(path, weights_only=True)
    other["config"]["network"]["features"] = [8, 8, 8, 8, 16, 8]  # another architecture than its weights
    torch.save(other, tmp_path / "other.pt")
    cases = [
        (tmp_path / "missing.pt", "model not found"),
        (tmp_path / "garbage.pt", "not a readable lrc_ray model"),
        (checkpoint, "not an lrc_ray segmentation model .*it is a pre-training checkpoint"),
        (tmp_path / "other.pt", "its weights, config or labels do not fit an lrc_ray"),
    ]
    for bad, message in cases:
        with pytest.raises(UserInputError, match=message) as raised:
            load_model(bad)
        assert str(bad) in str(raised.value) and "\n" not in str(raised.value)
