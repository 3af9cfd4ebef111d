"""The pure helpers of the Tune layer: no Ray cluster is started here."""

from types import SimpleNamespace

import pytest

import ray
from ray.tune.search import sample

from lrc_ray.config import RunConfig
from lrc_ray.distributed.runtime import user_error_line
from lrc_ray.distributed.tune import (
    TRIAL_SLOT,
    SweepContext,
    _finetune,
    driver_resources,
    early_stopping,
    fixed_values,
    trial_config,
    trial_run_key,
    summarise_failures,
    sweep_concurrency,
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


@pytest.mark.parametrize(
    ("resources", "cap", "expected"),
    [
        ({"CPU": 8, TRIAL_SLOT: 4}, 2, 2),  # GPU workers at zero: the trials start and wait for them
        ({"CPU": 8, TRIAL_SLOT: 4}, 8, 4),  # never more than the trial slots on the head
        ({"CPU": 8}, 3, 3),
        ({"CPU": 104, "GPU": 8, TRIAL_SLOT: 4}, None, 2),  # no cap: what fits now, as on a static cluster
    ],
)
def test_trial_concurrency_on_an_autoscaling_cluster(resources, cap, expected):
    assert trial_concurrency(resources, workers=4, use_gpu=True, cap=cap, autoscaling=True) == expected


def test_an_autoscaling_cluster_without_a_cap_or_room_asks_for_the_cap():
    with pytest.raises(UserInputError, match=r"needs 4 GPU\(s\) and 5 CPUs.*set sweep.max_concurrent_trials: the "
                                             "cluster autoscales"):
        trial_concurrency({"CPU": 8, TRIAL_SLOT: 4}, workers=4, use_gpu=True, cap=None, autoscaling=True)


@pytest.mark.parametrize(("autoscales", "expected"), [(True, 2), (False, None)])
def test_sweep_concurrency_follows_the_cluster(monkeypatch, autoscales, expected):
    """The GPU sweep on a head whose GPU workers are at zero: it starts with its cap where an
    autoscaler can add them, and is refused where none can."""
    import lrc_ray.distributed.tune as tune_module

    monkeypatch.setattr(tune_module, "cluster_autoscales", lambda: autoscales)
    settings = SweepSettings(max_concurrent_trials=2, workers_per_trial=4, use_gpu=True)
    head = {"CPU": 8.0, TRIAL_SLOT: 4.0}
    if expected is None:
        with pytest.raises(UserInputError, match="sweep.workers_per_trial"):
            sweep_concurrency(settings, head)
    else:
        assert sweep_concurrency(settings, head) == expected


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

    from lrc_ray import stages

    seen = []
    monkeypatch.setattr(stages, "finetune_and_evaluate",
                        lambda *args, **kwargs: seen.append((torch.get_num_threads(), kwargs["parts"])) or "finetuned")
    before = torch.get_num_threads()
    context = SweepContext(base={}, space_params={}, root="unused", workers=0, use_gpu=use_gpu, parts=("validation", "test"))
    assert _finetune(RunConfig(), None, None, context) == "finetuned"
    assert seen == [(threads or before, ("validation", "test"))]
    assert torch.get_num_threads() == before


def test_values_the_config_refuses_leave_the_error_to_the_trial():
    """The searcher must not fail where the trial would report a clear error of its own."""
    context = SweepContext(base=RunConfig().to_dict(), space_params={}, root="", workers=0, use_gpu=False)
    with pytest.raises(UserInputError, match="data.size"):
        trial_config(context, {"data.size": 100})
    assert trial_run_key(context, {"data.size": 100}) != trial_run_key(context, {"data.size": 90})
    assert trial_run_key(context, {"pretrain.method": "lrc"}) != trial_run_key(context, {"pretrain.method": "global"})


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
