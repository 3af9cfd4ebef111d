"""The run stages: keys made from the inputs, skipped when the output exists (plain layer)."""

import pytest

from lrc_ray.config import RunConfig
from lrc_ray.stages import finetuning_key, pretraining_key, run_keys


# --- pretraining_key ------------------------------------------------------------------------


def test_pretraining_key_ignores_the_finetune_section():
    quarter = RunConfig().replace(finetune={"label_fraction": 0.25})
    full = RunConfig().replace(finetune={"label_fraction": 1.0, "epochs": 3, "lr": 0.01})
    assert pretraining_key(quarter, "sp", 1) == pretraining_key(full, "sp", 1)
    assert pretraining_key(quarter, "sp", 1) == pretraining_key(quarter, "sp", 1)


def test_pretraining_key_names_the_method():
    assert pretraining_key(RunConfig(), "sp", 1).startswith("global_lrc-")
    assert pretraining_key(RunConfig().replace(pretrain={"method": "lrc"}), "sp", 1).startswith("lrc-")
    assert "+" not in pretraining_key(RunConfig(), "sp", 1)


@pytest.mark.parametrize(
    ("changed", "superpixels", "workers"),
    [
        (RunConfig().replace(pretrain={"temperature": 0.2}), "sp", 1),
        (RunConfig().replace(pretrain={"method": "lrc"}), "sp", 1),
        (RunConfig().replace(seed=1), "sp", 1),
        (RunConfig().replace(data={"split_seed": 1}), "sp", 1),
        (RunConfig().replace(data={"validation_cases": 3}), "sp", 1),
        (RunConfig().replace(data={"test_cases": 1}), "sp", 1),  # pre-training leaves test volumes out
        (RunConfig().replace(network={"local_dim": 32}), "sp", 1),
        (RunConfig(), "other", 1),
        (RunConfig(), "sp", 2),
    ],
)
def test_pretraining_key_changes_with_pretraining_settings(changed, superpixels, workers):
    assert pretraining_key(changed, superpixels, workers) != pretraining_key(RunConfig(), "sp", 1)


# --- finetuning_key -------------------------------------------------------------------------


def test_finetuning_key_is_shared_by_scratch_trials_at_any_felzenszwalb_setting():
    scratch = RunConfig().replace(pretrain={"method": "scratch"})
    other_scale = scratch.replace(data={"scale": 300.0, "sigma": 0.5}, pretrain={"temperature": 0.5})
    assert finetuning_key(scratch, None) == finetuning_key(other_scale, None)


@pytest.mark.parametrize(
    "changed",
    [
        {"finetune": {"label_fraction": 0.25}},
        {"finetune": {"epochs": 3}},
        {"data": {"size": 64}},
        {"data": {"validation_cases": 3}},
        {"data": {"test_cases": 1}},
        {"network": {"local_dim": 64}},
        {"seed": 1},
    ],
)
def test_finetuning_key_changes_with_what_fine_tuning_reads(changed):
    assert finetuning_key(RunConfig().replace(**changed), "key") != finetuning_key(RunConfig(), "key")


def test_finetuning_key_changes_with_the_pretrained_checkpoint():
    assert finetuning_key(RunConfig(), "lrc-a") != finetuning_key(RunConfig(), "lrc-b")
    assert finetuning_key(RunConfig(), "lrc-a") != finetuning_key(RunConfig(), None)


def test_the_run_key_equates_what_a_trial_would_not_run_differently():
    """`scratch` pre-trains nothing, so its temperature and scale change no run; a label fraction does."""
    scratch = RunConfig().replace(pretrain={"method": "scratch"})
    assert run_keys(scratch, 0) == run_keys(scratch.replace(pretrain={"temperature": 0.5}, data={"scale": 50.0}), 0)
    assert run_keys(scratch, 0)[1] != run_keys(scratch.replace(finetune={"label_fraction": 0.25}), 0)[1]
    lrc = RunConfig().replace(pretrain={"method": "lrc"})
    assert run_keys(lrc, 0)[1] != run_keys(lrc.replace(pretrain={"temperature": 0.5}), 0)[1]
    assert run_keys(lrc, 0)[1] != run_keys(lrc.replace(data={"scale": 50.0}), 0)[1]


