import math
from functools import reduce
from pathlib import Path

import numpy as np
import pytest

from lrc_ray.config import RunConfig, config_from_dict
from lrc_ray.errors import UserInputError
from lrc_ray.search_space import (
    FinalistSettings,
    Choice,
    Fixed,
    LogUniform,
    QUniform,
    RandInt,
    SyntheticDataSpec,
    Uniform,
    grid_points,
    label_fractions,
    load_search_space,
    parse_search_space,
    run_config_for,
    sample_config,
    trial_overrides,
)

SEARCH_SPACES = sorted((Path(__file__).parent.parent / "search_spaces").glob("*.yaml"))


def _get(config: RunConfig, dotted: str):
    return reduce(getattr, dotted.split("."), config)


def _assert_in_range(param, value, key):
    if isinstance(param, Fixed):
        assert value == param.value, key
    elif isinstance(param, Choice):
        assert value in param.values, key
    else:
        assert param.low <= value <= param.high, (key, value)
    if isinstance(param, RandInt):
        assert float(value).is_integer(), (key, value)
    if isinstance(param, QUniform):
        assert math.isclose(value / param.q, round(value / param.q)), (key, value)


def test_the_search_space_files_exist():
    assert {p.name for p in SEARCH_SPACES} >= {"quickstart.yaml", "full.yaml", "ablation_scale_label_fraction.yaml"}


@pytest.mark.parametrize("path", SEARCH_SPACES, ids=lambda p: p.name)
def test_every_search_space_parses_and_a_draw_is_a_valid_run_config(path):
    space = load_search_space(path)
    assert space.description and "\n" not in space.description
    assert space.source == str(path)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        drawn = {key: param.sample(rng) for key, param in space.params.items()}  # sample_config's order
        config = sample_config(space, np.random.default_rng(seed))
        assert config_from_dict(config.to_dict()) == config, "the draw passes the validation a YAML file gets"
        for key, param in space.params.items():
            value = _get(config, key)
            assert value == (tuple(drawn[key]) if isinstance(drawn[key], list) else pytest.approx(drawn[key])), key
            _assert_in_range(param, value, key)


def test_quickstart_is_all_discrete_and_its_grid_is_the_cartesian_product():
    space = load_search_space(Path(__file__).parent.parent / "search_spaces" / "quickstart.yaml")
    sizes = [len(p.values) if isinstance(p, Choice) else 1 for p in space.params.values()]
    points = grid_points(space)
    assert len(points) == math.prod(sizes) == 32
    assert len({tuple(sorted(p.items())) for p in points}) == len(points)
    assert set(space.params["pretrain.method"].values) == {"scratch", "global", "lrc", "global+lrc"}
    for point in points:
        run_config_for(space, point)  # every grid point is a valid run config
    assert not space.sweep.use_gpu
    # finalists scored on test volumes, and a volume left to fine-tune on beside the held-out ones
    base = run_config_for(space, {})
    assert space.finalists is not None and base.data.test_cases >= 1
    assert space.data.cases > base.data.validation_cases + base.data.test_cases
    assert label_fractions(space) == (0.25, 1.0)


def test_ablation_samples_its_whole_grid():
    space = load_search_space(Path(__file__).parent.parent / "search_spaces" / "ablation_scale_label_fraction.yaml")
    assert space.sweep.num_samples == len(grid_points(space)) == 15
    assert space.params["pretrain.method"] == Fixed("lrc")


def test_full_space_fits_its_gpu_nodes_and_needs_real_data():
    space = load_search_space(Path(__file__).parent.parent / "search_spaces" / "full.yaml")
    assert space.sweep.use_gpu and space.sweep.workers_per_trial * space.sweep.max_concurrent_trials == 8
    assert space.data is None
    assert isinstance(space.params["data.min_size"], QUniform) and space.params["data.min_size"].integral
    with pytest.raises(UserInputError, match=r"full.yaml: space.data.scale: a loguniform has no finite grid"):
        grid_points(space)


def _space(**space):
    return {"base": {"pretrain": {"epochs": 1}}, "space": space}


def _finalists(finalists, test_cases=1):
    return {"base": {"data": {"test_cases": test_cases}}, "finalists": finalists, "space": {"seed": 1}}


def test_finalists_and_label_fractions_of_a_space():
    plain = parse_search_space(_space(**{"finetune.label_fraction": {"choice": [0.25, 1.0, 0.25]}}), source="s.yaml")
    assert plain.finalists is None and label_fractions(plain) == (0.25, 1.0)
    with_finalists = parse_search_space(_finalists({"top": 3}), source="s.yaml")
    assert with_finalists.finalists == FinalistSettings(top=3, seeds=3)
    assert parse_search_space(_finalists(None), source="s.yaml").finalists == FinalistSettings()
    assert label_fractions(with_finalists) is None
    assert label_fractions(parse_search_space(_space(**{"finetune.label_fraction": 0.5}), source="s.yaml")) is None


def test_defaults_and_types_of_a_minimal_file():
    space = parse_search_space({"space": {"data.scale": {"choice": [50, 150]}}}, source="min.yaml")
    assert space.sweep.mode == "max" and space.sweep.num_samples == 12 and space.sweep.max_concurrent_trials is None
    assert space.data is None and space.base == {} and space.description == ""
    assert parse_search_space({"data": None, "space": {"seed": 1}}, source="x").data == SyntheticDataSpec(6, 4, 24)
    parsed = parse_search_space(
        _space(**{
            "pretrain.temperature": {"loguniform": [0.05, 0.5]},
            "data.sigma": {"uniform": [0.5, 1.2]},
            "pretrain.regions_per_image": {"randint": [8, 32]},
            "data.min_size": {"quniform": [10, 50, 10]},
            "finetune.label_fraction": 0.5,
        }),
        source="s.yaml",
    ).params
    assert parsed == {
        "pretrain.temperature": LogUniform(0.05, 0.5),
        "data.sigma": Uniform(0.5, 1.2),
        "pretrain.regions_per_image": RandInt(8, 32),
        "data.min_size": QUniform(10, 50, 10),
        "finetune.label_fraction": Fixed(0.5),
    }


def test_int_ranges_draw_ints_and_randint_reaches_both_ends():
    rng = np.random.default_rng(0)
    draws = {RandInt(8, 10).sample(rng) for _ in range(200)}
    assert draws == {8, 9, 10} and all(type(d) is int for d in draws)
    quantized = {QUniform(10, 50, 10).sample(rng) for _ in range(200)}
    assert quantized == {10, 20, 30, 40, 50} and all(type(d) is int for d in quantized)
    assert all(isinstance(QUniform(0.5, 1.5, 0.5).sample(rng), float) for _ in range(10))


def test_sample_config_is_reproducible_and_applies_base():
    space = parse_search_space(_space(**{"data.sigma": {"uniform": [0.5, 1.2]}}), source="s.yaml")
    first, second = (sample_config(space, np.random.default_rng(7)) for _ in range(2))
    assert first == second and first.pretrain.epochs == 1 and 0.5 <= first.data.sigma <= 1.2


def test_trial_overrides_nest_dotted_keys():
    assert trial_overrides({"data.scale": 50, "data.sigma": 0.8, "pretrain.method": "lrc", "seed": 3}) == {
        "data": {"scale": 50, "sigma": 0.8},
        "pretrain": {"method": "lrc"},
        "seed": 3,
    }


def test_run_config_for_merges_base_and_trial_values():
    space = parse_search_space(
        {"base": {"data": {"size": 64}}, "space": {"data.scale": {"choice": [50, 150]}}}, source="s.yaml"
    )
    config = run_config_for(space, {"data.scale": 150})
    assert (config.data.size, config.data.scale) == (64, 150.0)
    with pytest.raises(UserInputError, match=r"^s.yaml: data.scale: expected a positive number"):
        run_config_for(space, {"data.scale": -1})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_space(**{"pretrain.temprature": 0.1}), r"space.pretrain.temprature: not a run-config key; did you mean 'pretrain.temperature'\?"),
        (_space(**{"data.scale": {"uniformm": [1, 2]}}),
         r"space.data.scale: unknown distribution 'uniformm'; did you mean 'uniform'\? \(expected one of choice, uniform, loguniform, randint, quniform, or a fixed value\)"),
        (_space(**{"data.sigma": {"uniform": [5, 1]}}), r"space.data.sigma: low 5 > high 1"),
        (_space(**{"pretrain.regions_per_image": {"randint": [32, 8]}}), r"space.pretrain.regions_per_image: low 32 > high 8"),
        (_space(**{"data.scale": {"choice": []}}), r"space.data.scale: choice is empty"),
        (_space(**{"pretrain.temperature": {"loguniform": [0, 1]}}), r"space.pretrain.temperature: loguniform needs low > 0, got 0"),
        (_space(**{"data.min_size": {"quniform": [10, 50, 0]}}), r"space.data.min_size: quniform needs q > 0, got 0"),
        (_space(**{"data.min_size": {"quniform": [5, 50, 10]}}), r"space.data.min_size: quniform needs low and high to be multiples of q"),
        (_space(**{"data.sigma": {"uniform": [0.5]}}), r"space.data.sigma: uniform expects \[low, high\], got \[0.5\]"),
        (_space(**{"data.sigma": {"uniform": 0.5}}), r"space.data.sigma: uniform expects a list"),
        (_space(**{"pretrain.lr": {"loguniform": ["1e-4", 0.01]}}), r"space.pretrain.lr: loguniform expects finite numbers, got '1e-4' \(YAML reads 1e-4 as text"),
        (_space(**{"pretrain.regions_per_image": {"randint": [8.5, 32]}}), r"space.pretrain.regions_per_image: randint needs integer ends"),
        (_space(**{"data.min_size": {"uniform": [10, 50]}}), r"space.data.min_size: data.min_size takes an integer, but uniform draws fractions"),
        (_space(**{"data.sigma": {"uniform": [0.5, 1], "choice": [1]}}), r"space.data.sigma: expected one distribution"),
        (_space(**{"pretrain": {"choice": [1, 2]}}), r"space.pretrain: 'pretrain' is a section of the run config, not a value; name one of its keys, e.g. 'pretrain.method'"),
        (_space(**{"data.scale": {"choice": [50, -1]}}), r"space.data.scale = -1: data.scale: expected a positive number, got -1.0"),
        (_space(**{"pretrain.temperature": {"uniform": [0, 1]}}), r"space.pretrain.temperature = 0: pretrain.temperature: expected a positive number"),
        (_space(**{"finetune.label_fraction": {"choice": [0.5, 2]}}), r"space.finetune.label_fraction = 2: finetune.label_fraction: expected in \(0, 1\]"),
        (_space(**{"pretrain.method": {"choice": ["lrc", "globl"]}}), r"space.pretrain.method = 'globl': pretrain.method: 'globl' is not one of .*did you mean 'global'\?"),
        (_space(**{"data.size": 100}), r"s.yaml: space: data.size: expected a multiple of 16"),
        (_space(**{"pretrain.epochs": 3}), r"space.pretrain.epochs: also set in base; set it in one place"),
        ({"space": {}}, r"s.yaml: space: missing or empty"),
        ({"sweep": {"mode": "max"}}, r"s.yaml: space: missing or empty"),
        ({"space": ["data.scale"]}, r"s.yaml: space: expected a mapping"),
        ({"spaces": {"seed": 1}}, r"s.yaml: unknown top-level key 'spaces'; did you mean 'space'\?"),
        ({"sweep": {"num_sample": 3}, "space": {"seed": 1}}, r"s.yaml: unknown key 'sweep.num_sample'; did you mean 'sweep.num_samples'\?"),
        ({"sweep": {"mode": "maxx"}, "space": {"seed": 1}}, r"s.yaml: sweep.mode: 'maxx' is not one of max, min; did you mean 'max'\?"),
        ({"sweep": {"num_samples": 0}, "space": {"seed": 1}}, r"s.yaml: sweep.num_samples: expected at least 1, got 0"),
        ({"sweep": {"reduction_factor": 1}, "space": {"seed": 1}}, r"s.yaml: sweep.reduction_factor: expected at least 2"),
        ({"sweep": {"grace_period": 0}, "space": {"seed": 1}}, r"s.yaml: sweep.grace_period: expected at least 1"),
        ({"sweep": {"max_failures": -1}, "space": {"seed": 1}}, r"s.yaml: sweep.max_failures: expected at least 0"),
        ({"sweep": {"workers_per_trial": -1}, "space": {"seed": 1}}, r"s.yaml: sweep.workers_per_trial: expected at least 0"),
        ({"sweep": {"max_concurrent_trials": 0}, "space": {"seed": 1}}, r"s.yaml: sweep.max_concurrent_trials: expected null or at least 1"),
        ({"sweep": {"startup_trials": 0}, "space": {"seed": 1}}, r"s.yaml: sweep.startup_trials: expected null or at least 1"),
        ({"sweep": {"use_gpu": "yes please"}, "space": {"seed": 1}}, r"s.yaml: sweep.use_gpu: expected true or false"),
        ({"data": {"cases": 2}, "space": {"seed": 1}}, r"s.yaml: data.cases: expected at least 3, got 2"),
        ({"data": {"slices": 3}, "space": {"seed": 1}}, r"s.yaml: data.slices: expected at least 4"),
        ({"data": {"unlabeled": -1}, "space": {"seed": 1}}, r"s.yaml: data.unlabeled: expected at least 0"),
        ({"base": {"pretrain": {"temprature": 1}}, "space": {"seed": 1}}, r"s.yaml: base: unknown key 'pretrain.temprature'; did you mean 'pretrain.temperature'\?"),
        ({"base": {"data": {"size": 50}}, "space": {"seed": 1}}, r"s.yaml: base: data.size: expected a multiple of 16"),
        ({"base": [1], "space": {"seed": 1}}, r"s.yaml: base: expected run-config sections"),
        ({"description": ["a", "list"], "space": {"seed": 1}}, r"s.yaml: description: expected one line of text"),
        (["not", "a", "mapping"], r"s.yaml: expected a mapping with keys description, sweep, data, base, space, finalists"),
        (_finalists({"top": 0}), r"s.yaml: finalists.top: expected at least 1, got 0"),
        (_finalists({"seeds": 0}), r"s.yaml: finalists.seeds: expected at least 1, got 0"),
        (_finalists({"seed": 3}), r"s.yaml: unknown key 'finalists.seed'; did you mean 'finalists.seeds'\?"),
        (_finalists({"top": 2}, test_cases=0),
         r"s.yaml: finalists: their numbers are scored on test volumes that the search never sees; set base.data.test_cases"),
        ({"data": {"cases": 4}, "base": {"data": {"validation_cases": 2, "test_cases": 2}}, "space": {"seed": 1}},
         r"s.yaml: data.cases: 4 labelled volumes leave none for fine-tuning beside base.data.validation_cases 2 \+ "
         r"base.data.test_cases 2"),
        (_space(**{"finetune.label_fraction": {"uniform": [0.1, 1.0]}}),
         r"s.yaml: space.finetune.label_fraction: a label budget is a condition to compare settings at"),
    ],
)
def test_bad_input_gives_one_line_naming_file_and_key(raw, message):
    with pytest.raises(UserInputError, match=message) as info:
        parse_search_space(raw, source="s.yaml")
    assert str(info.value).startswith("s.yaml: ") and "\n" not in str(info.value)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(UserInputError, match=r"missing.yaml: search space file not found"):
        load_search_space(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("space: {data.scale: [1, 2\n")
    with pytest.raises(UserInputError, match=r"broken.yaml: not valid YAML \(") as info:
        load_search_space(tmp_path / "broken.yaml")
    assert "\n" not in str(info.value)
    (tmp_path / "empty.yaml").write_text("# nothing but a comment\n")
    with pytest.raises(UserInputError, match=r"empty.yaml: expected a mapping"):
        load_search_space(tmp_path / "empty.yaml")
    (tmp_path / "quick.yaml").write_text("# a typo\nspace:\n  pretrain.temprature: {loguniform: [0.05, 0.5]}\n")
    with pytest.raises(
        UserInputError, match=r"^.*quick.yaml: space.pretrain.temprature: not a run-config key; did you mean 'pretrain.temperature'\?$"
    ):
        load_search_space(tmp_path / "quick.yaml")


def test_grid_points_expands_choices_and_refuses_continuous_keys():
    space = parse_search_space(
        _space(**{"pretrain.method": {"choice": ["lrc", "global"]}, "seed": 2, "data.scale": {"choice": [50, 150, 400]}}),
        source="s.yaml",
    )
    points = grid_points(space)
    assert len(points) == 6 and points[0] == {"pretrain.method": "lrc", "seed": 2, "data.scale": 50}
    continuous = parse_search_space(
        _space(**{"seed": {"choice": [0, 1]}, "data.sigma": {"uniform": [0.5, 1]}, "data.scale": {"loguniform": [10, 100]}}),
        source="s.yaml",
    )
    with pytest.raises(UserInputError, match=r"^s.yaml: space.data.sigma: a uniform has no finite grid"):
        grid_points(continuous)


def test_distribution_classes_validate_when_built_in_code():
    with pytest.raises(UserInputError, match="low 2 > high 1"):
        Uniform(2, 1)
    with pytest.raises(UserInputError, match="choice is empty"):
        Choice(())


def test_tpe_models_results_after_a_third_of_the_trials_unless_told():
    from lrc_ray.search_space import SweepSettings

    assert [SweepSettings().tpe_startup_trials(n) for n in (4, 10, 30, 100)] == [2, 3, 10, 10]
    assert SweepSettings(startup_trials=5).tpe_startup_trials(100) == 5

