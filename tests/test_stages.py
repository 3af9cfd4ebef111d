"""The run stages: keys made from the inputs, skipped when the output exists (plain layer)."""

import os
import subprocess
import sys

import pytest

from lrc_ray import stages
from lrc_ray.config import RunConfig
from lrc_ray.errors import UserInputError
from lrc_ray.stages import finetuning_key, pretraining_key, run_keys
from lrc_ray.storage import location


# --- pretraining_key ------------------------------------------------------------------------


def test_pretraining_key_ignores_the_finetune_section():
    quarter = RunConfig().replace(finetune={"label_fraction": 0.25})
    full = RunConfig().replace(finetune={"label_fraction": 1.0, "epochs": 3, "lr": 0.01})
    assert pretraining_key(quarter, "sp", 1) == pretraining_key(full, "sp", 1)


def test_pretraining_key_is_the_same_for_an_equal_config_in_another_process():
    """A restored sweep finds its checkpoints: the key depends on the settings only, not on the
    config object or on the process (Python's string hashing changes with PYTHONHASHSEED)."""
    config = RunConfig().replace(pretrain={"method": "lrc", "temperature": 0.3}, seed=4)
    script = (
        "from lrc_ray.config import RunConfig; from lrc_ray.stages import pretraining_key; "
        "print(pretraining_key(RunConfig().replace(pretrain={'method': 'lrc', 'temperature': 0.3}, seed=4), 'sp', 2))"
    )
    keys = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": str(hash_seed)}).stdout.strip()
        for hash_seed in (1, 2)
    }
    assert keys == {pretraining_key(config, "sp", 2)}


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
        {"data": {"spacing_mm": 2.0}},
        {"data": {"datalist": "dataset_0.json"}},
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




def test_the_stage_module_imports_no_ray():
    import subprocess
    import sys

    code = "import sys, lrc_ray.stages, lrc_ray.finalists; assert 'ray' not in sys.modules, 'ray imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


# --- the stages on a tiny data set, without Ray ---------------------------------------------


def _plain_extract(calls):
    """The super-pixel stage's `Extract` without Ray: the per-slice functions, volume by volume."""
    import pyarrow.parquet as pq

    from lrc_ray.data.msd import read_case
    from lrc_ray.data.slices import prepare_slices
    from lrc_ray.superpixels.table import add_superpixels, slices_table

    def extract(dataset, params, out_dir, headers):
        calls.append(dataset.root)
        for case in dataset.cases:
            image, label = read_case(case, dataset.labels)
            table = slices_table(case.case_id, prepare_slices(image.array, None if label is None else label.array,
                                                              params.slicing, native_spacing_mm=image.spacing_mm[1:]))
            pq.write_table(add_superpixels(table, params.felzenszwalb, params.slicing),
                           out_dir / f"part-{case.case_id}.parquet")

    return extract


@pytest.fixture(scope="module")
def four_labelled(tmp_path_factory):
    from lrc_ray.data.phantom import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "four", cases=4, unlabeled=1, size=48, slices=6,
                                   seed=5)


@pytest.fixture(scope="module")
def stage_config(four_labelled, tiny_network, tmp_path_factory):
    return RunConfig().replace(
        data={"data_dir": str(four_labelled), "cache_root": str(tmp_path_factory.mktemp("cache")), "size": 48,
              "validation_cases": 1, "test_cases": 1},
        network=tiny_network,
        pretrain={"method": "lrc", "epochs": 1, "batch_size": 4},
        finetune={"epochs": 1, "batch_size": 4, "label_fraction": 1.0},
    )


@pytest.fixture(scope="module")
def built(stage_config):
    """The stage-1 output, built once for the module by the plain extract."""
    calls = []
    return stages.run_data(stage_config.data, extract=_plain_extract(calls)), calls


def test_run_data_builds_the_cache_once_and_splits_the_labelled_volumes(stage_config, built):
    data, calls = built
    assert len(calls) == 1 and not data.cache_hit
    again_calls = []
    again = stages.run_data(stage_config.data, extract=_plain_extract(again_calls))
    assert again_calls == [] and again.cache_hit and again.entry.path == data.entry.path
    split = data.split
    assert len(split.validation) == 1 and len(split.test) == 1 and len(split.train_pool) == 2
    assert data.num_classes == 10 and data.labels[1] == "spleen"


def test_without_extract_a_missing_cache_names_the_command(stage_config, tmp_path):
    from dataclasses import replace

    missing = replace(stage_config.data, cache_root=str(tmp_path / "none"))
    with pytest.raises(UserInputError, match=r"no super-pixel cache under .*; make it with `lrc-ray superpixels --data"):
        stages.run_data(missing)
    assert not (tmp_path / "none").exists(), "nothing written"


def test_too_few_labelled_volumes_for_train_validation_and_test(stage_config, built):
    crowded = stage_config.replace(data={"validation_cases": 2, "test_cases": 2}).data
    with pytest.raises(UserInputError, match=r"data.validation_cases 2 \+ data.test_cases 2: 4 held-out volumes leave "
                                             r"none of the 4 labelled volumes"):
        stages.run_data(crowded)


def test_pretraining_leaves_the_held_out_volumes_out(stage_config, built):
    data, _ = built
    selection = stages.pretraining_data(stage_config, data).selection
    assert set(selection.exclude_cases) == set(data.split.validation) | set(data.split.test)


def _counting(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs))
    return calls


def test_a_run_reads_dataset_json_once_and_the_slice_table_once_per_use(stage_config, built, tmp_path, monkeypatch):
    """Stage outputs are keyed: a second run of the same config computes nothing."""
    from lrc_ray import api
    from lrc_ray.superpixels import cache

    data_reads = _counting(monkeypatch, stages, "load_dataset")
    table_reads = _counting(monkeypatch, cache, "read_entry_table")
    trained = []
    in_process = api.in_process_pretrain_fn()

    def pretrain_fn(config, inputs, checkpoint):
        trained.append(checkpoint)
        return in_process(config, inputs, checkpoint)

    data = stages.run_data(stage_config.data)
    pretrained = stages.pretrain(stage_config, data, root=tmp_path, workers=0, pretrain_fn=pretrain_fn)
    finetuned = stages.finetune_and_evaluate(stage_config, data, pretrained, root=tmp_path, parts=("validation",))
    assert len(data_reads) == 1, "dataset.json is read once per run"
    # counting the slices to pre-train on reads two columns, the in-process loop and fine-tuning one table each
    assert len(table_reads) == 3
    assert not pretrained.reused and len(pretrained.history) == 1 and pretrained.checkpoint.is_file()
    assert trained == [location(tmp_path / "pretrained" / pretrained.key / "checkpoint.pt")]
    assert not finetuned.reused and finetuned.seconds > 0 and set(finetuned.scores) == {"validation"}
    assert finetuned.scores["validation"]["cases"] == list(data.split.validation)

    # the same run again: every stage is skipped; the test part is scored from the saved model
    table_reads.clear()
    again = stages.pretrain(stage_config, data, root=tmp_path, workers=0, pretrain_fn=pretrain_fn)
    scored = stages.finetune_and_evaluate(stage_config, data, again, root=tmp_path, parts=("validation", "test"))
    assert again.reused and again.history == pretrained.history and len(trained) == 1
    assert scored.reused and scored.key == finetuned.key
    assert scored.scores["validation"] == finetuned.scores["validation"]
    assert scored.scores["test"]["cases"] == list(data.split.test) and 0 <= scored.scores["test"]["dice_mean"] <= 1
    assert scored.seconds == pytest.approx(scored.scores["test"]["seconds"]), "only the test part was computed"
    assert table_reads == [], "scoring reads the volumes' own files, not the slice table"
    nothing = stages.finetune_and_evaluate(stage_config, data, again, root=tmp_path, parts=("validation", "test"))
    assert nothing.seconds == 0 and nothing.scores == scored.scores


def test_scratch_has_nothing_to_pretrain_and_its_fine_tuning_is_keyed_without_a_checkpoint(stage_config, built, tmp_path):
    data, _ = built
    scratch = stage_config.replace(pretrain={"method": "scratch"})
    assert stages.pretrain(scratch, data, root=tmp_path, workers=0, pretrain_fn=None) is None
    finetuned = stages.finetune_and_evaluate(scratch, data, None, root=tmp_path, parts=("validation",))
    assert finetuned.key == stages.finetuning_key(scratch, None)
    assert finetuned.summary["initialisation"] == "random initialisation"


def test_scoring_the_test_part_without_test_volumes_is_a_user_error(stage_config, built):
    data, _ = built
    from dataclasses import replace

    from lrc_ray.engine.splits import CaseSplit

    no_test = replace(data, split=CaseSplit(train_pool=data.split.train_pool, validation=data.split.validation))
    with pytest.raises(UserInputError, match="data.test_cases: 0, so there are no test volumes to score"):
        stages.evaluate_model(None, None, no_test, "test")
