import numpy as np
import pytest

from lrc_ray.engine.metrics import summarise_dice, volume_dice


def test_dice_of_a_known_overlap():
    label = np.zeros((2, 4, 4), int)
    label[:, :2, :2] = 1  # 8 voxels of organ 1
    prediction = np.zeros_like(label)
    prediction[:, :2, :1] = 1  # 4 of them found
    prediction[0, 3, 3] = 2  # organ 2 predicted, absent from the label
    dice = volume_dice(prediction, label, num_classes=3)
    assert dice[0] == pytest.approx(2 * 4 / (8 + 4))
    assert np.isnan(dice[1]), "an organ absent from the label does not count"


def test_summary_averages_volumes_then_organs():
    summary = summarise_dice([np.array([1.0, np.nan]), np.array([0.5, 0.2])], ["liver", "spleen"])
    assert summary["dice_per_organ"] == {"liver": 0.75, "spleen": pytest.approx(0.2)}
    assert summary["dice_mean"] == pytest.approx((0.75 + 0.2) / 2)


def test_an_organ_absent_from_a_volume_is_reported_absent_not_zero():
    per_volume = [np.array([0.8, np.nan, np.nan]), np.array([0.6, 0.4, np.nan])]
    summary = summarise_dice(per_volume, ["liver", "spleen", "pancreas"], ["a", "b"])
    assert summary["dice_per_organ"] == {"liver": pytest.approx(0.7), "spleen": pytest.approx(0.4), "pancreas": None}
    assert summary["dice_per_volume"]["a"] == {"liver": pytest.approx(0.8), "spleen": None, "pancreas": None}
    assert summary["dice_mean"] == pytest.approx((0.7 + 0.4) / 2)


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(1, 2, 2\) and label \(1, 2, 3\)"):
        volume_dice(np.zeros((1, 2, 2), int), np.zeros((1, 2, 3), int), 2)
