"""Pre-training and fine-tuning through the API and the CLI, on a tiny cached data set."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lrc_ray import api
from lrc_ray.cli import main
from lrc_ray.config import RunConfig, save_config
from lrc_ray.engine.checkpoint import load_checkpoint
from lrc_ray.errors import UserInputError

pytestmark = pytest.mark.ray

@pytest.fixture(scope="module")
def tiny_config(local_ray, tiny_dataset, tiny_network, tmp_path_factory) -> RunConfig:
    cache_root = tmp_path_factory.mktemp("cache")
    config = RunConfig().replace(
        data={"data_dir": str(tiny_dataset), "cache_root": str(cache_root), "size": 32, "validation_cases": 1},
        network=tiny_network,
        pretrain={"method": "global+lrc", "epochs": 1, "batch_size": 4, "queue_size": 16},
        finetune={"epochs": 1, "batch_size": 4},
    )
    data = config.data
    api.build_superpixels(data=data.data_dir, cache_root=data.cache_root, scale=data.scale, sigma=data.sigma,
                          min_size=data.min_size, size=data.size)
    return config


@pytest.fixture(scope="module")
def checkpoint(tiny_config, tmp_path_factory):
    return api.pretrain(config=tiny_config, out_dir=tmp_path_factory.mktemp("pretrain"), progress=False)


def test_pretraining_writes_a_checkpoint_with_its_context(checkpoint, tiny_config):
    payload = load_checkpoint(checkpoint)
    assert payload["config"] == tiny_config.to_dict()
    assert payload["epoch"] == 0 and len(payload["history"]) == 1
    assert all(key.startswith(("backbone.", "global_head.", "local_head.")) for key in payload["state_dict"])
    assert (checkpoint.parent / "config.yaml").is_file()


def test_finetuning_reports_per_organ_dice(checkpoint, tiny_config, tmp_path):
    results = api.finetune(config=tiny_config, checkpoint=checkpoint, out_dir=tmp_path, progress=False)
    assert 0.0 <= results["dice_mean"] <= 1.0
    assert set(results["dice_per_organ"]) == {"spleen", "right_kidney", "left_kidney", "gallbladder", "liver", "stomach",
                                              "aorta", "inferior_vena_cava", "pancreas"}
    assert len(results["train_cases"]) == 1 and len(results["validation_cases"]) == 1
    assert not set(results["train_cases"]) & set(results["validation_cases"])
    assert json.loads((tmp_path / "results.json").read_text())["dice_mean"] == results["dice_mean"]


def test_scratch_fine_tunes_from_random_weights(tiny_config):
    results = api.finetune(config=tiny_config, progress=False)
    assert results["initialisation"] == "random initialisation"


def _cli(capsys, *argv):
    code = main(["-q", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_corrupt_checkpoint(capsys, tiny_config, tmp_path):
    save_config(tiny_config, tmp_path / "run.yaml")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    code, err = _cli(capsys, "finetune", "--config", str(tmp_path / "run.yaml"), "--checkpoint",
                     str(tmp_path / "broken.pt"), "--label-fraction", "0.5", "--out", str(tmp_path / "ft"))
    assert code == 2 and len(err) == 1 and "broken.pt: not a readable lrc_ray checkpoint" in err[0]
    assert not (tmp_path / "ft").exists()


def test_checkpoint_of_another_architecture(capsys, checkpoint, tiny_config, tiny_network, tmp_path):
    other = tiny_config.replace(network={**tiny_network, "features": [8, 8, 8, 8, 16, 8]})
    save_config(other, tmp_path / "run.yaml")
    code, err = _cli(capsys, "finetune", "--config", str(tmp_path / "run.yaml"), "--checkpoint", str(checkpoint),
                     "--label-fraction", "0.5", "--out", str(tmp_path / "ft"))
    assert code == 2 and len(err) == 1 and "checkpoint.pt: built with network" in err[0]


def test_missing_superpixel_cache_names_the_command(capsys, tiny_config, tmp_path):
    config = tiny_config.replace(data={"scale": 321.0})
    save_config(config, tmp_path / "run.yaml")
    code, err = _cli(capsys, "pretrain", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "pre"))
    assert code == 2 and len(err) == 1
    assert "no super-pixel cache" in err[0] and "make it with `lrc-ray superpixels" in err[0] and "--scale 321" in err[0]
    assert not (tmp_path / "pre").exists()


def test_bad_config_key(capsys, tmp_path):
    (tmp_path / "run.yaml").write_text("pretrain:\n  regions_per_imag: 4\n")
    code, err = _cli(capsys, "pretrain", "--config", str(tmp_path / "run.yaml"))
    assert code == 2 and err == [f"lrc-ray: error: {tmp_path / 'run.yaml'}: unknown key 'pretrain.regions_per_imag'; "
                                 "did you mean 'pretrain.regions_per_image'?"]


def test_batch_norm_with_moco_is_refused_at_config_load(capsys, tmp_path):
    (tmp_path / "run.yaml").write_text("network:\n  norm: batch\npretrain:\n  method: global\n")
    code, err = _cli(capsys, "pretrain", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "pre"))
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"lrc-ray: error: {tmp_path / 'run.yaml'}: network.norm: 'batch' cannot be used with "
                             "pretrain.method 'global'") and err[0].endswith("use one of 'group', 'instance'")
    assert not (tmp_path / "pre").exists()


@pytest.mark.parametrize("fraction", ["0", "1.5"])
def test_label_fraction_out_of_range(capsys, tmp_path, fraction):
    code, err = _cli(capsys, "finetune", "--label-fraction", fraction)
    assert code == 2 and "finetune.label_fraction: expected in (0, 1]" in err[0]


class _RunsCodeWhenUnpickled:
    """Unpickles as a call to Path.touch: a checkpoint that runs code when loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_checkpoint_is_loaded_weights_only(tmp_path, monkeypatch):
    """Even where torch.load's default is the full unpickler (forced here by torch's own switch, as
    with torch < 2.6), a checkpoint that would run code is refused and the code never runs."""
    from lrc_ray.engine.checkpoint import CHECKPOINT_KIND

    marker = tmp_path / "code_ran"
    torch.save({"kind": CHECKPOINT_KIND, "state_dict": {}, "config": _RunsCodeWhenUnpickled(marker)},
               tmp_path / "checkpoint.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UserInputError, match="not a readable lrc_ray checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert not marker.exists()


def test_supervised_lrc_pretrains_on_a_separate_labelled_source(tiny_config, tmp_path):
    from lrc_ray.data.phantom import write_synthetic_dataset

    source = write_synthetic_dataset(tmp_path / "source", cases=1, unlabeled=1, size=48, slices=6, seed=11)
    data = tiny_config.data
    api.build_superpixels(data=source, cache_root=data.cache_root, scale=data.scale, sigma=data.sigma,
                          min_size=data.min_size, size=data.size)
    config = tiny_config.replace(pretrain={"method": "supervised+lrc", "source_data_dir": str(source)})
    checkpoint = api.pretrain(config=config, out_dir=tmp_path / "pretrain", progress=False)
    history = load_checkpoint(checkpoint)["history"]
    assert {"loss_supervised", "loss_local"} <= set(history[0]) and history[0]["steps"] == 1, "6 labelled slices, batch 4"
    results = api.finetune(config=config, checkpoint=checkpoint, progress=False)
    assert 0.0 <= results["dice_mean"] <= 1.0


def test_supervised_source_must_not_be_the_fine_tuning_data(tiny_config):
    config = tiny_config.replace(pretrain={"method": "supervised", "source_data_dir": tiny_config.data.data_dir})
    with pytest.raises(UserInputError, match="is the fine-tuning data set"):
        api.pretrain(config=config, out_dir="unused", progress=False)


def test_batch_larger_than_the_data(tiny_config, tmp_path):
    config = tiny_config.replace(pretrain={"batch_size": 1000})
    with pytest.raises(UserInputError, match=r"pretrain.batch_size: 1000 is more than the \d+ slices"):
        api.pretrain(config=config, out_dir=tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_finetune_gives_the_same_dice_whatever_ran_before_in_the_process(checkpoint, tiny_config):
    """Sweeps reuse worker processes: the random state they leave must not change a result."""
    import torch

    config = tiny_config.replace(finetune={"epochs": 1})
    first = api.finetune(config=config, checkpoint=checkpoint, progress=False)
    torch.rand(1000)  # what an earlier task might have drawn
    second = api.finetune(config=config, checkpoint=checkpoint, progress=False)
    assert first["dice_per_organ"] == second["dice_per_organ"]


def test_a_forced_device_mode_that_does_not_fit_is_one_line(capsys, tiny_config, tmp_path, monkeypatch):
    from lrc_ray.engine import pretrain_loop

    monkeypatch.setattr(pretrain_loop, "free_memory_bytes", lambda device: 1000)
    save_config(tiny_config.replace(pretrain={"input_mode": "device"}), tmp_path / "run.yaml")
    code, err = _cli(capsys, "pretrain", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "pre"))
    assert code == 2 and len(err) == 1
    assert re.fullmatch(r"lrc-ray: error: pretrain.input_mode: device needs \d+ bytes for \d+ slices of 32 x 32, "
                        r"but only 1000 bytes are free on the device .*use input_mode: stream or auto", err[0]), err
    assert not (tmp_path / "pre" / "checkpoint.pt").exists()


# --- saved models and `lrc-ray predict` -------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(tiny_config, tmp_path_factory):
    """A scratch model fine-tuned long enough to find the liver, written with its results."""
    config = tiny_config.replace(pretrain={"method": "scratch"}, finetune={"epochs": 10, "lr": 0.01})
    out = tmp_path_factory.mktemp("finetuned")
    return api.finetune(config=config, out_dir=out, progress=False), out


def _native_dice(prediction: Path, label: Path) -> dict[str, float | None]:
    import nibabel as nib
    import numpy as np

    from lrc_ray.data.phantom import ORGAN_LABELS
    from lrc_ray.engine.metrics import volume_dice

    predicted, truth = (np.asarray(nib.load(str(path)).dataobj) for path in (prediction, label))
    dice = volume_dice(predicted, truth.astype(np.uint8), len(ORGAN_LABELS))
    return {ORGAN_LABELS[index + 1]: (None if np.isnan(value) else float(value)) for index, value in enumerate(dice)}


def test_finetune_writes_its_model_next_to_its_results(finetuned):
    from lrc_ray.engine.saved_model import load_model

    results, out = finetuned
    assert results["model"] == str(out / "model.pt")
    assert json.loads((out / "results.json").read_text())["model"] == results["model"]
    assert load_model(out / "model.pt").config.finetune.epochs == 10
    assert sorted(path.name for path in out.iterdir()) == ["model.pt", "results.json"], "no temporary file left"


def test_predict_writes_the_scan_grid_and_scores_the_dice_finetune_reported(capsys, finetuned, tiny_dataset, tmp_path):
    import nibabel as nib

    results, out = finetuned
    (case,) = results["validation_cases"]
    image, label = tiny_dataset / "imagesTr" / f"{case}.nii.gz", tiny_dataset / "labelsTr" / f"{case}.nii.gz"
    code = main(["-q", "predict", "--model", results["model"], "--images", str(image), "--out", str(tmp_path / "seg")])
    assert code == 0
    written, original = nib.load(str(tmp_path / "seg" / f"{case}.nii.gz")), nib.load(str(image))
    assert written.shape == original.shape and np.array_equal(written.affine, original.affine)
    assert written.get_data_dtype() == np.uint8
    reported = results["dice_per_volume"][case]
    assert reported["liver"] > 0.2, f"the model should find the liver: {reported}"
    assert _native_dice(tmp_path / "seg" / f"{case}.nii.gz", label) == pytest.approx(reported, abs=1e-6)
    names = json.loads((tmp_path / "seg" / "labels.json").read_text())
    assert names["0"] == "background" and names["5"] == "liver"


def test_predict_with_ray_data_writes_what_the_local_loop_writes(finetuned, tiny_dataset, tmp_path, monkeypatch):
    import nibabel as nib

    results, _ = finetuned
    local = api.predict(model=results["model"], data=tiny_dataset, out=tmp_path / "local", progress=False)
    monkeypatch.setattr(api, "RAY_DATA_MIN_SCANS", 1)  # three scans: Ray Data batch inference
    distributed = api.predict(model=results["model"], data=tiny_dataset, out=tmp_path / "ray", progress=False)
    assert sorted(local) == sorted(distributed) == ["case_000", "case_001", "unlabeled_000"]
    for case in local:
        assert np.array_equal(np.asarray(nib.load(str(local[case])).dataobj), np.asarray(nib.load(str(distributed[case])).dataobj))
    assert sorted(path.name for path in (tmp_path / "ray").iterdir()) == sorted([f"{case}.nii.gz" for case in local] + ["labels.json"])


def test_predict_bad_input_is_one_line_and_writes_nothing(capsys, finetuned, checkpoint, tiny_dataset, tmp_path):
    import nibabel as nib

    results, _ = finetuned
    image = str(tiny_dataset / "imagesTr" / "case_000.nii.gz")
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 1, 2), np.int16), np.eye(4)), str(flat))
    (tmp_path / "a_file").write_text("x")
    cases = [
        (["--model", str(checkpoint), "--images", image], "checkpoint.pt: not an lrc_ray segmentation model"),
        (["--model", results["model"], "--images", str(flat)], r"flat.nii.gz: expected a 3D volume, got shape \(8, 8, 1, 2\)"),
        (["--model", results["model"], "--images", image, "--data", str(tiny_dataset)], "--data or --images: .* got both"),
        (["--model", results["model"]], "--data or --images: expected exactly one source of scans, got neither"),
    ]
    for args, message in cases:
        code, err = _cli(capsys, "predict", *args, "--out", str(tmp_path / "seg"))
        assert code == 2 and len(err) == 1 and re.search(message, err[0]), (args, err)
        assert not (tmp_path / "seg").exists()
    code, err = _cli(capsys, "predict", "--model", results["model"], "--images", image, "--out", str(tmp_path / "a_file" / "seg"))
    assert code == 2 and len(err) == 1 and err[0].startswith(f"lrc-ray: error: --out {tmp_path / 'a_file' / 'seg'}: not writable")
