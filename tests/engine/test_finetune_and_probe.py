import numpy as np
import pytest
import torch

from lrc_ray.config import FinetuneConfig
from lrc_ray.engine import finetune as finetune_module
from lrc_ray.engine.finetune import build_segmentation_model, finetune
from lrc_ray.engine.probe import linear_probe_dice, probe_slices
from lrc_ray.models.networks import NetworkParams

NETWORK = NetworkParams(features=(4, 4, 8, 8, 16, 4), global_dim=8, global_hidden=16, local_dim=8)
NUM_CLASSES = 10


def test_head_epochs_train_only_the_head_then_everything(slice_table, monkeypatch):
    frozen_during = {}
    original = finetune_module._epochs

    def recording(model, *args, phase, **kwargs):
        frozen_during[phase] = all(not p.requires_grad for p in model.backbone.parameters())
        return original(model, *args, phase=phase, **kwargs)

    monkeypatch.setattr(finetune_module, "_epochs", recording)
    torch.manual_seed(0)
    model = build_segmentation_model(NETWORK, NUM_CLASSES, None)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    history = finetune(model, slice_table, train_cases=("case_0",), seed=0, progress=False,
                       config=FinetuneConfig(epochs=1, head_epochs=2, batch_size=2))
    assert [entry["phase"] for entry in history] == ["head", "head", "all"]
    assert [entry["epoch"] for entry in history] == [0, 1, 2]
    assert frozen_during == {"head": True, "all": False}
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.backbone.parameters()))


def test_without_head_epochs_the_backbone_trains_from_the_start(slice_table):
    model = build_segmentation_model(NETWORK, NUM_CLASSES, None)
    history = finetune(model, slice_table, train_cases=("case_0",), seed=0, progress=False,
                       config=FinetuneConfig(epochs=2, batch_size=2))
    assert [entry["phase"] for entry in history] == ["all", "all"]


@pytest.mark.parametrize("schedule", ["poly", "constant"])
def test_learning_rate_schedule_of_full_fine_tuning(slice_table, schedule):
    model = build_segmentation_model(NETWORK, NUM_CLASSES, None)
    history = finetune(model, slice_table, train_cases=("case_0",), seed=0, progress=False,
                       config=FinetuneConfig(epochs=4, head_epochs=1, batch_size=2, lr=1e-3, head_lr=1e-2,
                                             lr_schedule=schedule))
    head, full = history[0]["lr"], [entry["lr"] for entry in history[1:]]
    assert head == pytest.approx(1e-2), "the head-only epochs keep head_lr"
    if schedule == "poly":  # nnU-Net: lr * (1 - epoch / epochs) ** 0.9
        assert full == pytest.approx([1e-3 * (1 - epoch / 4) ** 0.9 for epoch in range(4)])
    else:
        assert full == pytest.approx([1e-3] * 4)


@pytest.mark.parametrize("steps_per_epoch", [None, 3])
def test_steps_per_epoch_fixes_the_training_budget_whatever_the_label_fraction(slice_table, steps_per_epoch):
    """One volume (4 slices) or two (8), batch 2: a pass is 2 or 4 steps; a fixed budget is 3 for both."""
    steps = {}
    for train_cases in [("case_0",), ("case_0", "case_1")]:
        model = build_segmentation_model(NETWORK, NUM_CLASSES, None)
        batches = []
        model.register_forward_hook(lambda module, inputs, output: batches.append(inputs[0].shape[0]))
        history = finetune(model, slice_table, train_cases=train_cases, seed=0, progress=False,
                           config=FinetuneConfig(epochs=2, batch_size=2, steps_per_epoch=steps_per_epoch))
        assert len(history) == 2 and set(batches) == {2}
        steps[len(train_cases)] = len(batches) / 2
    assert steps == ({1: 2, 2: 4} if steps_per_epoch is None else {1: 3, 2: 3})


@pytest.mark.parametrize("flips", [{}, {"flip_anterior_posterior": True, "flip_left_right": True}])
def test_fine_tuning_passes_its_flip_settings_to_the_labelled_slices(slice_table, monkeypatch, flips):
    made = []
    original = finetune_module.LabelledSliceDataset

    def recording(*args, **kwargs):
        made.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "LabelledSliceDataset", recording)
    model = build_segmentation_model(NETWORK, NUM_CLASSES, None)
    finetune(model, slice_table, train_cases=("case_0",), seed=0, progress=False,
             config=FinetuneConfig(epochs=1, batch_size=2, **flips))
    expected = {"flip_anterior_posterior": False, "flip_left_right": False} | flips
    assert [{key: kwargs[key] for key in expected} for kwargs in made] == [expected]


def test_probe_is_deterministic_and_a_dice(slice_table):
    probe = probe_slices(slice_table, train_case="case_0", validation_cases=("case_1", "case_2"), num_classes=NUM_CLASSES)
    assert probe.train_images.shape == (4, 1, 32, 32) and len(probe.validation) == 2
    torch.manual_seed(0)
    model = build_segmentation_model(NETWORK, NUM_CLASSES, None)
    first = linear_probe_dice(model.backbone, probe, steps=20, seed=0)
    second = linear_probe_dice(model.backbone, probe, steps=20, seed=0)
    assert first == second and 0.0 <= first <= 1.0
    assert model.backbone.training, "the backbone's mode is restored"


def test_evaluation_reports_an_organ_missing_from_a_validation_volume_as_absent(slice_table):
    import pyarrow as pa
    import pyarrow.compute as pc

    from lrc_ray.engine.finetune import evaluate
    from lrc_ray.superpixels.table import decode_row

    # Volume case_1 without its liver (label 5): as if that scan's liver was out of the field.
    labels = []
    for row in range(slice_table.num_rows):
        label = decode_row(slice_table, row).label
        if slice_table.column("case_id")[row].as_py() == "case_1":
            label = np.where(label == 5, 0, label)
        labels.append(label.ravel())
    table = slice_table.set_column(slice_table.schema.get_field_index("label"), "label",
                                   pa.array([list(label) for label in labels], pa.list_(pa.uint8())))
    assert (pc.list_flatten(table.column("label")).to_numpy() == 5).any()
    torch.manual_seed(0)
    model = build_segmentation_model(NETWORK, NUM_CLASSES, None)
    names = {index: str(index) for index in range(NUM_CLASSES)} | {5: "liver"}
    results = evaluate(model, table, cases=("case_0", "case_1"), labels=names)
    assert results["dice_per_volume"]["case_1"]["liver"] is None
    assert results["dice_per_volume"]["case_0"]["liver"] is not None
    assert results["dice_per_organ"]["liver"] == results["dice_per_volume"]["case_0"]["liver"]
