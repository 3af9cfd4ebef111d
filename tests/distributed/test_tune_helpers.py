"""The pure helpers of the Tune layer: no Ray cluster is started here."""

from types import SimpleNamespace

import pytest

import ray
from ray import tune
from ray.tune.search import sample
from ray.tune.search.optuna import OptunaSearch

from lrc_ray.config import RunConfig
from lrc_ray.distributed.runtime import user_error_line
from lrc_ray.distributed.tune import (
    TRIAL_SLOT,
    SweepContext,
    _finetune,
    SweepOptunaSearch,
    driver_resources,
    early_stopping,
    finetuning_key,
    fixed_values,
    pretraining_key,
    run_keys,
    trial_config,
    summarise_failures,
    trial_concurrency,
    tune_param_space,
)
from lrc_ray.errors import TrainingError, UserInputError
from lrc_ray.search_space import SearchSpace, SweepSettings, parse_search_space


@pytest.fixture(autouse=True)
def _no_ray_cluster():
    yield
    assert not ray.is_initialized(), "these helpers must not start Ray"


def _space():
    return parse_search_space(
        {
            "space": {
                "pretrain.method": {"choice": ["lrc", "global+lrc"]},
                "pretrain.temperature": {"loguniform": [0.05, 0.5]},
                "pretrain.w_local": {"uniform": [0.5, 1.5]},
                "pretrain.regions_per_image": {"randint": [4, 6]},
                "data.min_size": {"quniform": [10, 40, 10]},
                "data.sigma": {"quniform": [0.5, 1.5, 0.5]},
                "pretrain.epochs": 2,
                "seed": 7,
            }
        },
        source="test_space",
    )


def _samples(domain, n=2000):
    return domain.sample(size=n, random_state=0)


# --- tune_param_space / fixed_values --------------------------------------------------------


def test_tune_param_space_keys_and_fixed_values():
    space = _space()
    domains = tune_param_space(space)
    assert list(domains) == [
        "pretrain.method", "pretrain.temperature", "pretrain.w_local", "pretrain.regions_per_image",
        "data.min_size", "data.sigma",
    ], "fixed keys are left out, file order kept"
    assert fixed_values(space) == {"pretrain.epochs": 2, "seed": 7}


def test_choice_maps_to_categorical():
    domain = tune_param_space(_space())["pretrain.method"]
    assert isinstance(domain, sample.Categorical)
    assert list(domain.categories) == ["lrc", "global+lrc"]
    assert set(_samples(domain, 200)) == {"lrc", "global+lrc"}


def test_uniform_and_loguniform_map_to_floats_with_their_samplers():
    domains = tune_param_space(_space())
    uniform, log = domains["pretrain.w_local"], domains["pretrain.temperature"]
    assert isinstance(uniform, sample.Float) and isinstance(log, sample.Float)
    assert (uniform.lower, uniform.upper) == (0.5, 1.5)
    assert (log.lower, log.upper) == (0.05, 0.5)
    assert isinstance(log.get_sampler(), sample.LogUniform)
    assert not isinstance(uniform.get_sampler(), sample.LogUniform)
    assert all(0.05 <= value <= 0.5 for value in _samples(log))
    assert all(0.5 <= value <= 1.5 for value in _samples(uniform))


def test_randint_includes_both_ends():
    domain = tune_param_space(_space())["pretrain.regions_per_image"]
    assert isinstance(domain, sample.Integer)
    assert (domain.lower, domain.upper) == (4, 7), "Tune's upper end is exclusive: high + 1"
    values = _samples(domain)
    assert set(values) == {4, 5, 6}, "both ends reachable, never above high"
    assert all(isinstance(domain.sample(random_state=i), int) for i in range(10))


def test_integral_quniform_gives_ints_on_the_grid():
    domain = tune_param_space(_space())["data.min_size"]
    assert isinstance(domain, sample.Integer)
    assert isinstance(domain.get_sampler(), sample.Quantized)
    values = _samples(domain)
    assert set(values) == {10, 20, 30, 40}
    assert all(isinstance(value, int) for value in values)


def test_fractional_quniform_gives_floats_on_the_grid():
    domain = tune_param_space(_space())["data.sigma"]
    assert isinstance(domain, sample.Float)
    assert isinstance(domain.get_sampler(), sample.Quantized)
    values = _samples(domain)
    assert set(values) <= {0.5, 1.0, 1.5}
    assert {0.5, 1.5} <= set(values)


def test_sampled_values_make_valid_run_configs():
    from lrc_ray.search_space import run_config_for

    space = _space()
    domains = tune_param_space(space)
    for i in range(20):
        values = {key: domain.sample(random_state=i) for key, domain in domains.items()}
        config = run_config_for(space, {**fixed_values(space), **values})
        assert config.seed == 7 and config.pretrain.epochs == 2
        assert 4 <= config.pretrain.regions_per_image <= 6


def test_unmapped_schema_type_is_refused():
    space = SearchSpace("x", _space().sweep, None, {}, {"data.scale": object()}, "test")
    with pytest.raises(TypeError, match="no Tune distribution for object"):
        tune_param_space(space)


# --- trial_concurrency / driver_resources ---------------------------------------------------


@pytest.mark.parametrize(
    ("resources", "workers", "use_gpu", "cap", "expected"),
    [
        ({"CPU": 2, TRIAL_SLOT: 2}, 1, False, None, 1),
        ({"CPU": 16}, 1, False, None, 8),
        ({"CPU": 16, TRIAL_SLOT: 3}, 1, False, None, 3),
        ({"CPU": 16}, 1, False, 3, 3),
        ({"CPU": 16}, 1, False, 20, 8),
        ({"CPU": 2}, 0, False, None, 1),  # in-trial pre-training: its own CPU plus one for data reads
        ({"CPU": 8, "GPU": 2}, 0, True, None, 2),
        ({"CPU": 32, "GPU": 8}, 4, True, None, 2),
        ({"CPU": 8, "GPU": 8}, 1, True, None, 4),
    ],
)
def test_trial_concurrency(resources, workers, use_gpu, cap, expected):
    assert trial_concurrency(resources, workers=workers, use_gpu=use_gpu, cap=cap) == expected


def test_trial_concurrency_too_few_resources_is_a_user_error():
    with pytest.raises(UserInputError, match=r"workers_per_trial: a trial needs 3 CPUs"):
        trial_concurrency({"CPU": 2}, workers=2, use_gpu=False, cap=None)
    with pytest.raises(UserInputError, match=r"needs 2 GPU\(s\) and 3 CPUs"):
        trial_concurrency({"CPU": 16}, workers=2, use_gpu=True, cap=None)
    with pytest.raises(UserInputError, match="workers_per_trial"):
        trial_concurrency({"CPU": 16, TRIAL_SLOT: 0}, workers=1, use_gpu=False, cap=None)


def test_driver_resources():
    assert driver_resources({"CPU": 4, TRIAL_SLOT: 2}, workers=1, use_gpu=False) == {TRIAL_SLOT: 1}
    assert driver_resources({"CPU": 4}, workers=2, use_gpu=True) == {"CPU": 1}
    # a trial that pre-trains in its own process holds its device
    assert driver_resources({"CPU": 4, TRIAL_SLOT: 2}, workers=0, use_gpu=False) == {TRIAL_SLOT: 1, "CPU": 1}
    assert driver_resources({"CPU": 4, "GPU": 1}, workers=0, use_gpu=True) == {"CPU": 1, "GPU": 1}


@pytest.mark.parametrize(("use_gpu", "threads"), [(False, 2), (True, None)])
def test_in_trial_fine_tuning_computes_on_the_trials_spare_cpu(monkeypatch, use_gpu, threads):
    """A CPU trial that trains in its own process has 2 CPUs set aside (see trial_concurrency); its
    pre-training leaves one to Ray Data, its fine-tuning uses both, and the process gets its
    thread count back for the next trial."""
    import torch

    from lrc_ray import api

    seen = []
    monkeypatch.setattr(api, "finetune", lambda **kwargs: seen.append(torch.get_num_threads()) or {"dice_mean": 0.5})
    before = torch.get_num_threads()
    context = SweepContext(base={}, space_params={}, pretrained_root="unused", workers=0, use_gpu=use_gpu)
    results = _finetune(RunConfig(), None, context)
    assert seen == [threads or before] and results["dice_mean"] == 0.5 and "seconds" in results
    assert torch.get_num_threads() == before


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
        {"network": {"local_dim": 64}},
        {"seed": 1},
    ],
)
def test_finetuning_key_changes_with_what_fine_tuning_reads(changed):
    assert finetuning_key(RunConfig().replace(**changed), "key") != finetuning_key(RunConfig(), "key")


def test_finetuning_key_changes_with_the_pretrained_checkpoint():
    assert finetuning_key(RunConfig(), "lrc-a") != finetuning_key(RunConfig(), "lrc-b")
    assert finetuning_key(RunConfig(), "lrc-a") != finetuning_key(RunConfig(), None)


# --- SweepOptunaSearch ----------------------------------------------------------------------


def _searcher(choices=(1, 2), run_key=lambda values: str(values["x"]), **kwargs):
    searcher = SweepOptunaSearch(metric="dice_mean", mode="max", run_key=run_key, **kwargs)
    assert searcher.set_search_properties(None, None, {"x": tune.choice(list(choices))})
    return searcher


def test_optuna_search_ignores_reports_without_the_metric():
    searcher = _searcher(seed=0)
    suggested = searcher.suggest("t1")
    assert suggested["x"] in (1, 2)
    searcher.on_trial_result("t1", {"probe_dice": 0.1, "training_iteration": 1})
    searcher.on_trial_complete("t1", {"dice_mean": 0.5, "probe_dice": 0.1, "training_iteration": 2})
    trials = searcher._ot_study.trials
    assert len(trials) == 1
    assert trials[0].state.name == "COMPLETE"
    assert trials[0].value == 0.5
    assert trials[0].params == suggested
    assert trials[0].intermediate_values == {}


def test_optuna_search_still_records_reports_with_the_metric():
    searcher = _searcher()
    searcher.suggest("t1")
    searcher.on_trial_result("t1", {"dice_mean": 0.3, "training_iteration": 1})
    searcher.on_trial_complete("t1", {"dice_mean": 0.4})
    (trial,) = searcher._ot_study.trials
    assert trial.intermediate_values == {1: 0.3}
    assert trial.value == 0.4


def test_plain_optuna_search_would_fail_on_probe_reports():
    """Why the subclass exists: the base class indexes the metric in every result."""
    searcher = OptunaSearch(metric="dice_mean", mode="max", seed=0)
    searcher.set_search_properties(None, None, {"x": tune.choice([1, 2])})
    searcher.suggest("t1")
    with pytest.raises(KeyError):
        searcher.on_trial_result("t1", {"probe_dice": 0.1, "training_iteration": 1})


def test_optuna_search_marks_a_trial_stopped_before_the_metric_as_pruned():
    searcher = _searcher()
    searcher.suggest("t1")
    searcher.on_trial_result("t1", {"probe_dice": 0.1, "training_iteration": 1})
    searcher.on_trial_complete("t1", {"probe_dice": 0.1, "training_iteration": 1})
    (trial,) = searcher._ot_study.trials
    assert trial.state.name == "PRUNED"


def _each_choice_twice_sampler():
    """Proposes each choice twice in a row (Optuna trial numbers 0, 1 -> first choice; 2, 3 ->
    second; ...): the repeats TPE makes, on cue."""
    import optuna

    class EachChoiceTwice(optuna.samplers.RandomSampler):
        def sample_independent(self, study, trial, name, distribution):
            return distribution.choices[min(trial.number // 2, len(distribution.choices) - 1)]

    return EachChoiceTwice(seed=0)


def test_a_repeated_run_is_told_its_known_outcome_and_drawn_again():
    searcher = _searcher(choices=(1, 2, 3), sampler=_each_choice_twice_sampler())
    assert searcher.suggest("t1") == {"x": 1}
    searcher.on_trial_complete("t1", {"dice_mean": 0.5})
    second = searcher.suggest("t2")
    assert second != {"x": 1}, "the repeat of x=1 was drawn again"
    states = [(trial.params["x"], trial.state.name, trial.value) for trial in searcher._ot_study.trials]
    assert states[:2] == [(1, "COMPLETE", 0.5), (1, "COMPLETE", 0.5)], "the repeat got the first run's Dice"
    searcher.on_trial_complete("t2", {"probe_dice": 0.1})  # stopped by ASHA
    assert searcher.suggest("t3") == {"x": 3}
    assert [trial.state.name for trial in searcher._ot_study.trials if trial.params["x"] == 2] == ["PRUNED", "PRUNED"]


def test_a_repeat_of_a_running_trial_is_ignored_by_optuna_and_drawn_again():
    searcher = _searcher(choices=(1, 2), sampler=_each_choice_twice_sampler())
    searcher.suggest("t1")  # still running
    assert searcher.suggest("t2") == {"x": 2}
    assert [trial.state.name for trial in searcher._ot_study.trials if trial.params["x"] == 1] == ["RUNNING", "FAIL"]


def test_runs_repeat_once_every_distinct_one_has_run():
    searcher = _searcher(choices=(1, 2), seed=0, max_redraws=5)
    seen = []
    for number in range(4):
        seen.append(searcher.suggest(f"t{number}")["x"])
        searcher.on_trial_complete(f"t{number}", {"dice_mean": 0.1 * seen[-1]})
    assert sorted(seen[:2]) == [1, 2] and set(seen[2:]) <= {1, 2}


def test_values_the_config_refuses_leave_the_error_to_the_trial():
    """The searcher must not fail where the trial would report a clear error of its own."""
    from lrc_ray.distributed.tune import _trial_run_key

    context = SweepContext(base=RunConfig().to_dict(), space_params={}, pretrained_root="", workers=0, use_gpu=False)
    with pytest.raises(UserInputError, match="data.size"):
        trial_config(context, {"data.size": 100})
    assert _trial_run_key(context, {"data.size": 100}) != _trial_run_key(context, {"data.size": 90})


def test_the_run_key_equates_what_a_trial_would_not_run_differently():
    """`scratch` pre-trains nothing, so its temperature and scale change no run; a label fraction does."""
    scratch = RunConfig().replace(pretrain={"method": "scratch"})
    assert run_keys(scratch, 0) == run_keys(scratch.replace(pretrain={"temperature": 0.5}, data={"scale": 50.0}), 0)
    assert run_keys(scratch, 0)[1] != run_keys(scratch.replace(finetune={"label_fraction": 0.25}), 0)[1]
    lrc = RunConfig().replace(pretrain={"method": "lrc"})
    assert run_keys(lrc, 0)[1] != run_keys(lrc.replace(pretrain={"temperature": 0.5}), 0)[1]
    assert run_keys(lrc, 0)[1] != run_keys(lrc.replace(data={"scale": 50.0}), 0)[1]


# --- summarise_failures / _last_error_line --------------------------------------------------


def _result(error):
    return SimpleNamespace(error=error)


def test_summarise_failures_none_when_some_trial_succeeded():
    grid = [_result(RuntimeError("boom")), _result(None), _result(RuntimeError("boom"))]
    assert summarise_failures(grid) is None
    assert summarise_failures([_result(None)]) is None
    assert summarise_failures([]) is None


def test_summarise_failures_groups_equal_reasons():
    grid = [_result(RuntimeError("out of memory")), _result(ValueError("bad value")), _result(RuntimeError("out of memory"))]
    assert summarise_failures(grid) == "all 3 trial(s) failed: 2 x out of memory; 1 x bad value"


def test_summarise_failures_uses_the_innermost_cause():
    try:
        try:
            raise TrainingError("loss is not finite at epoch 2")
        except TrainingError as inner:
            raise RuntimeError("Trial raised an exception.\nTraceback ...") from inner
    except RuntimeError as outer:
        wrapped = outer
    assert summarise_failures([_result(wrapped)]) == "all 1 trial(s) failed: 1 x loss is not finite at epoch 2"


def test_summarise_failures_cuts_long_reasons():
    line = summarise_failures([_result(RuntimeError("x" * 1000))])
    assert line == "all 1 trial(s) failed: 1 x " + "x" * 300


def test_last_error_line_prefers_the_lrc_ray_error():
    text = """Failure # 1 (occurred at 2024-01-01_00-00-00)
ray.exceptions.RayTaskError(UserInputError): ray::run_trial() (pid=123, ip=127.0.0.1)
  File "/x/lrc_ray/distributed/tune.py", line 10, in run_trial
    config = _trial_config(context, trial_values)
lrc_ray.errors.UserInputError: trial config: data.size: expected a multiple of 16, got 100

During handling of the above exception, another exception occurred:

ray.exceptions.RayActorError: The actor died unexpectedly.
"""
    assert user_error_line(text) == "trial config: data.size: expected a multiple of 16, got 100"


def test_last_error_line_otherwise_the_last_line():
    text = "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: CUDA out of memory\n\n   \n"
    assert user_error_line(text) == "RuntimeError: CUDA out of memory"
    assert user_error_line("") == "unknown error"
    assert user_error_line("TrainingError: loss is nan\nsomething after") == "loss is nan"


# --- early_stopping -------------------------------------------------------------------------


@pytest.mark.parametrize(("epochs", "grace", "factor"), [(3, 1, 2), (3, 1, 3), (9, 1, 3), (4, 2, 2), (10, 1, 2), (2, 1, 2)])
def test_asha_never_stops_a_trial_at_its_last_pre_training_epoch(epochs, grace, factor):
    scheduler = early_stopping(SweepSettings(grace_period=grace, reduction_factor=factor), epochs)
    milestones = [milestone for milestone, _ in scheduler._brackets[0]._rungs]  # Tune keeps rungs private
    assert milestones and max(milestones) < epochs and min(milestones) == min(grace, epochs - 1)


def test_one_epoch_sweeps_have_no_early_stopping():
    assert early_stopping(SweepSettings(), 1) is None
