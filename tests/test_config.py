import re

import pytest

from lrc_ray.config import RunConfig, config_from_dict, global_batch_size, load_config, save_config
from lrc_ray.errors import UserInputError


def test_defaults_validate_and_round_trip_through_yaml(tmp_path):
    config = RunConfig()
    save_config(config, tmp_path / "run.yaml")
    assert load_config(tmp_path / "run.yaml") == config


def test_yaml_overrides_nested_values(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "seed: 3\npretrain:\n  method: lrc\n  temperature: 0.05\naugment:\n  crop_scale: [0.5, 1.0]\n"
    )
    config = load_config(tmp_path / "run.yaml")
    assert (config.seed, config.pretrain.method, config.pretrain.temperature) == (3, "lrc", 0.05)
    assert config.augment.crop_scale == (0.5, 1.0)
    assert config.pretrain.uses_local and not config.pretrain.uses_global


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"pretrain": {"temprature": 0.1}}, r"unknown key 'pretrain.temprature'; did you mean 'pretrain.temperature'\?"),
        ({"pretrian": {}}, r"unknown key 'pretrian'; did you mean 'pretrain'\?"),
        ({"pretrain": {"temperature": 0}}, r"pretrain.temperature: expected a positive number, got 0.0"),
        ({"pretrain": {"temperature": -0.1}}, r"pretrain.temperature: expected a positive number"),
        ({"pretrain": {"regions_per_image": 0}}, r"pretrain.regions_per_image: expected at least 1, got 0"),
        ({"pretrain": {"pixels_per_region": 0}}, r"pretrain.pixels_per_region: expected at least 1, got 0"),
        ({"pretrain": {"method": "globl+lrc"}}, r"pretrain.method: 'globl\+lrc' is not one of .*did you mean 'global\+lrc'\?"),
        ({"pretrain": {"w_local": -1}}, r"pretrain.w_local: expected a non-negative weight"),
        ({"pretrain": {"w_global": -0.5}}, r"pretrain.w_global: expected a non-negative weight"),
        ({"finetune": {"label_fraction": 0}}, r"finetune.label_fraction: expected in \(0, 1\], got 0.0"),
        ({"finetune": {"label_fraction": 1.5}}, r"finetune.label_fraction: expected in \(0, 1\]"),
        ({"finetune": {"lr_schedule": "polly"}}, r"finetune.lr_schedule: 'polly' is not one of .*did you mean 'poly'\?"),
        ({"finetune": {"steps_per_epoch": 0}}, r"finetune.steps_per_epoch: expected at least 1, or null"),
        ({"data": {"size": 100}}, r"data.size: expected a multiple of 16"),
        ({"data": {"spacing_mm": 0}}, r"data.spacing_mm: expected a positive number of mm, or null for 400 mm / data.size"),
        ({"data": {"spacing_mm": "1mm"}}, r"data.spacing_mm: expected a finite number, got '1mm'"),
        ({"data": {"datalist_key": ""}}, r"data.datalist_key: expected a key of the datalist"),
        ({"pretrain": {"epochs": "ten"}}, r"pretrain.epochs: expected an integer, got 'ten'"),
        ({"augment": {"crop_scale": [0.5]}}, r"augment.crop_scale: expected a list of 2 values"),
        ({"network": {"local_dim": 0}}, r"network.local_dim"),
        ({"pretrain": {"method": "supervised"}}, r"pretrain.source_data_dir: expected a labelled source data set"),
        ({"pretrain": {"w_supervised": -1}}, r"pretrain.w_supervised: expected a non-negative weight"),
        ({"finetune": {"flip_left_right": "yes"}}, r"finetune.flip_left_right: expected true or false, got 'yes'"),
        ({"finetune": {"flip_anterior_posterior": True, "augment": False}},
         r"finetune.flip_anterior_posterior: expected false when finetune.augment is false"),
    ],
)
def test_bad_values_name_their_path(raw, message):
    with pytest.raises(UserInputError, match=message):
        config_from_dict(raw)


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("pretrain:\n  temperature: 0\n")
    with pytest.raises(UserInputError, match=r"bad.yaml: pretrain.temperature"):
        load_config(path)
    path.write_text("pretrain: [unclosed\n")
    with pytest.raises(UserInputError, match=r"bad.yaml: not valid YAML"):
        load_config(path)
    with pytest.raises(UserInputError, match=r"missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_replace_validates_too():
    assert RunConfig().replace(pretrain={"epochs": 3}).pretrain.epochs == 3
    with pytest.raises(UserInputError, match="pretrain.epochs"):
        RunConfig().replace(pretrain={"epochs": -1})


def test_global_batch_is_per_worker_batch_times_workers():
    assert global_batch_size(16, 4) == 64
    assert global_batch_size(16, 0) == 16, "local mode (0 workers) runs one process"


def test_fine_tuning_flips_are_off_by_default_and_can_be_turned_on():
    assert (RunConfig().finetune.flip_anterior_posterior, RunConfig().finetune.flip_left_right) == (False, False)
    flips = config_from_dict({"finetune": {"flip_anterior_posterior": True, "flip_left_right": True}}).finetune
    assert flips.flip_anterior_posterior and flips.flip_left_right


@pytest.mark.parametrize("method", ["global", "global+lrc"])
def test_moco_methods_refuse_batch_norm(method):
    with pytest.raises(UserInputError, match=rf"^config: network.norm: 'batch' cannot be used with pretrain.method "
                                             rf"'{re.escape(method)}' \(MoCo without shuffle-BN.*use one of 'group', 'instance'$"):
        config_from_dict({"network": {"norm": "batch"}, "pretrain": {"method": method}})


@pytest.mark.parametrize("pretrain", [{"method": "lrc"}, {"method": "scratch"}, {"method": "global+lrc", "w_global": 0}])
def test_batch_norm_is_allowed_without_the_global_branch(pretrain):
    assert config_from_dict({"network": {"norm": "batch"}, "pretrain": pretrain}).network.norm == "batch"
