"""The YAML schema of a hyper-parameter sweep (`search_spaces/*.yaml`), validated at load time.

A file has six top-level keys: `description`, `sweep` (searcher and scheduler settings),
`data` (the built-in synthetic data to make when the sweep's data dir has none), `base`
(fixed run-config values, nested like a run-config YAML), `space` (dotted run-config
path -> a distribution such as `{loguniform: [0.05, 0.5]}`, or a fixed value) and `finalists`
(`{top: K, seeds: N}`: after the search, the top K settings per label fraction and scratch are
re-run at N fresh seeds and scored on test volumes; see `lrc_ray.finalists`).

Every value a distribution can produce is checked against the run config here, so a bad
space fails at load time with one line, never as a failed trial hours into a sweep. This
module knows nothing of Ray: the Ray layer maps the distribution classes to Tune's itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_type_hints

import numpy as np
import yaml

from lrc_ray.config import RunConfig, build_dataclass, require, require_choice, config_from_dict
from lrc_ray.errors import UserInputError


@dataclass(frozen=True)
class Choice:
    """One of `values`, each equally likely."""

    values: tuple

    def __post_init__(self) -> None:
        if not self.values:
            raise UserInputError("choice is empty")

    def sample(self, rng: np.random.Generator) -> Any:
        return self.values[rng.integers(len(self.values))]


@dataclass(frozen=True)
class Uniform:
    low: float
    high: float

    def __post_init__(self) -> None:
        _check_bounds(self)

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.low, self.high))


@dataclass(frozen=True)
class LogUniform:
    """Uniform in log space: for scales spanning orders of magnitude (temperature, Felzenszwalb scale)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        _check_bounds(self)
        if self.low <= 0:
            raise UserInputError(f"loguniform needs low > 0, got {self.low}")

    def sample(self, rng: np.random.Generator) -> float:
        # exp(log(x)) can land an ulp outside the range.
        return float(np.clip(math.exp(rng.uniform(math.log(self.low), math.log(self.high))), self.low, self.high))


@dataclass(frozen=True)
class RandInt:
    """An integer in [low, high], BOTH ends included (Tune's `randint` excludes `high`)."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not all(_is_int(v) for v in (self.low, self.high)):
            raise UserInputError(f"randint needs integer ends, got [{self.low!r}, {self.high!r}]")
        _check_bounds(self)

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.low, self.high, endpoint=True))


@dataclass(frozen=True)
class QUniform:
    """Uniform in [low, high], rounded to a multiple of q (as Tune's `quniform`); ints when all three are ints."""

    low: float
    high: float
    q: float

    def __post_init__(self) -> None:
        _check_bounds(self)
        if self.q <= 0:
            raise UserInputError(f"quniform needs q > 0, got {self.q}")
        # Tune refuses ends that are not multiples of q; refuse them here, at load time.
        for end in (self.low, self.high):
            if not math.isclose(end / self.q, round(end / self.q)):
                raise UserInputError(f"quniform needs low and high to be multiples of q, got {end} and q={self.q}")

    @property
    def integral(self) -> bool:
        return all(_is_int(v) for v in (self.low, self.high, self.q))

    def sample(self, rng: np.random.Generator) -> float | int:
        steps = round(rng.uniform(self.low, self.high) / self.q)
        return steps * self.q if self.integral else float(steps * self.q)


@dataclass(frozen=True)
class Fixed:
    """A value every trial gets (a plain value under `space:`)."""

    value: Any

    def sample(self, rng: np.random.Generator) -> Any:
        return self.value


Distribution = Union[Choice, Uniform, LogUniform, RandInt, QUniform]
# The whitelist of names a space file may use; each takes a list of arguments.
DISTRIBUTIONS: dict[str, type] = {
    "choice": Choice,
    "uniform": Uniform,
    "loguniform": LogUniform,
    "randint": RandInt,
    "quniform": QUniform,
}


@dataclass(frozen=True)
class SweepSettings:
    """How the searcher (Optuna TPE) and scheduler (ASHA) run the sweep."""

    metric: str = "dice_mean"  # a key the trials report
    mode: str = "max"
    num_samples: int = 12
    seed: int = 0
    # None: as many as fit the cluster's resources at the start; on a cluster that autoscales, this many
    # run at once and wait for the nodes they ask for
    max_concurrent_trials: int | None = None
    workers_per_trial: int = 1  # Ray Train workers per trial
    use_gpu: bool = False  # one GPU per worker
    grace_period: int = 1  # ASHA: epochs before a trial may be stopped
    reduction_factor: int = 2  # ASHA
    max_failures: int = 1  # retries of a failed trial
    # TPE's random trials before it models the results (Optuna's own default, 10, would make a
    # 10-trial sweep a random search); None: a third of the trials, between 2 and 10.
    startup_trials: int | None = None

    def __post_init__(self) -> None:
        require(bool(self.metric), "sweep.metric", "a metric name", self.metric)
        require_choice(self.mode, ("max", "min"), "sweep.mode")
        require(self.num_samples >= 1, "sweep.num_samples", "at least 1", self.num_samples)
        require(
            self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
            "sweep.max_concurrent_trials", "null or at least 1", self.max_concurrent_trials,
        )
        require(self.workers_per_trial >= 0, "sweep.workers_per_trial", "at least 0", self.workers_per_trial)
        require(self.grace_period >= 1, "sweep.grace_period", "at least 1", self.grace_period)
        require(self.reduction_factor >= 2, "sweep.reduction_factor", "at least 2", self.reduction_factor)
        require(self.max_failures >= 0, "sweep.max_failures", "at least 0", self.max_failures)
        require(self.startup_trials is None or self.startup_trials >= 1, "sweep.startup_trials", "null or at least 1",
                self.startup_trials)

    def tpe_startup_trials(self, trials: int) -> int:
        return self.startup_trials if self.startup_trials is not None else min(10, max(2, trials // 3))


@dataclass(frozen=True)
class SyntheticDataSpec:
    """The built-in data set to make; its slice size is the sweep's `data.size`."""

    cases: int = 6  # labelled volumes: validation ones plus at least one to fine-tune on
    unlabeled: int = 4
    slices: int = 24

    def __post_init__(self) -> None:
        require(self.cases >= 3, "data.cases", "at least 3", self.cases)
        require(self.unlabeled >= 0, "data.unlabeled", "at least 0", self.unlabeled)
        require(self.slices >= 4, "data.slices", "at least 4", self.slices)


@dataclass(frozen=True)
class FinalistSettings:
    """After the search: the `top` distinct settings per label fraction, and scratch, re-run at
    `seeds` seeds the search did not use, scored on validation and test volumes."""

    top: int = 2
    seeds: int = 3

    def __post_init__(self) -> None:
        require(self.top >= 1, "finalists.top", "at least 1", self.top)
        require(self.seeds >= 1, "finalists.seeds", "at least 1", self.seeds)


@dataclass(frozen=True)
class SearchSpace:
    description: str
    sweep: SweepSettings
    data: SyntheticDataSpec | None  # None: the file has no `data:` section (the sweep needs a real data set)
    base: dict  # nested run-config values, as in a run-config YAML
    params: dict[str, Distribution | Fixed]  # dotted run-config path -> what trials get, in file order
    source: str  # the file it came from, for messages
    finalists: FinalistSettings | None = None  # None: no `finalists:` section (the search alone)


TOP_LEVEL_KEYS = ("description", "sweep", "data", "base", "space", "finalists")
LABEL_FRACTION_KEY = "finetune.label_fraction"


def load_search_space(path: str | Path) -> SearchSpace:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserInputError(f"{path}: search space file not found") from None
    except yaml.YAMLError as exc:
        raise UserInputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_search_space(raw, source=str(path))


def parse_search_space(raw: Any, source: str) -> SearchSpace:
    """Validate a parsed YAML document; every error is one UserInputError line starting with `source`."""
    if not isinstance(raw, dict):
        raise UserInputError(f"{source}: expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise UserInputError(
                f"{source}: unknown top-level key '{key}'{_did_you_mean(key, TOP_LEVEL_KEYS)} "
                f"(expected {', '.join(TOP_LEVEL_KEYS)})"
            )
    description = raw.get("description") or ""
    if not isinstance(description, str) or "\n" in description.strip():
        raise UserInputError(f"{source}: description: expected one line of text, got {description!r}")
    try:
        sweep = build_dataclass(SweepSettings, raw.get("sweep") or {}, prefix="sweep.")
        data = None if "data" not in raw else build_dataclass(SyntheticDataSpec, raw["data"] or {}, prefix="data.")
        finalists = None if "finalists" not in raw else build_dataclass(FinalistSettings, raw["finalists"] or {},
                                                                          prefix="finalists.")
    except UserInputError as exc:
        raise UserInputError(f"{source}: {exc}") from None
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise UserInputError(f"{source}: base: expected run-config sections (data, pretrain, ...), got {base!r}")
    base_config = config_from_dict(base, source=f"{source}: base")
    _check_held_out(base_config, data, finalists, source)
    if not raw.get("space"):
        raise UserInputError(
            f"{source}: space: missing or empty; expected dotted run-config keys, "
            "e.g. 'pretrain.temperature: {loguniform: [0.05, 0.5]}'"
        )
    if not isinstance(raw["space"], dict):
        raise UserInputError(f"{source}: space: expected a mapping of dotted run-config keys, got {raw['space']!r}")
    params = {str(key): _parse_param(str(key), value, base, source) for key, value in raw["space"].items()}
    _check_values(params, base, source)
    fraction = params.get(LABEL_FRACTION_KEY)
    if fraction is not None and not isinstance(fraction, (Choice, Fixed)):
        raise UserInputError(
            f"{source}: space.{LABEL_FRACTION_KEY}: a label budget is a condition to compare settings at, not a value "
            "to optimise; give a choice of fractions, e.g. {choice: [0.25, 1.0]}, each searched on its own"
        )
    return SearchSpace(description.strip(), sweep, data, base, params, source, finalists)


def label_fractions(space: SearchSpace) -> tuple | None:
    """The label fractions a space searches, each its own search (None when it searches one or none)."""
    spec = space.params.get(LABEL_FRACTION_KEY)
    if isinstance(spec, Choice) and len(set(spec.values)) > 1:
        return tuple(dict.fromkeys(spec.values))
    return None


def _check_held_out(base: RunConfig, data: SyntheticDataSpec | None, finalists: FinalistSettings | None,
                    source: str) -> None:
    """Finalists report test Dice, so they need test volumes; built-in data needs a training
    volume beside the held-out ones."""
    held = base.data
    if finalists is not None and held.test_cases < 1:
        raise UserInputError(
            f"{source}: finalists: their numbers are scored on test volumes that the search never sees; "
            "set base.data.test_cases to at least 1"
        )
    if data is not None and data.cases <= held.validation_cases + held.test_cases:
        raise UserInputError(
            f"{source}: data.cases: {data.cases} labelled volumes leave none for fine-tuning beside "
            f"base.data.validation_cases {held.validation_cases} + base.data.test_cases {held.test_cases}"
        )


def sample_config(space: SearchSpace, rng: np.random.Generator) -> RunConfig:
    """One random setting of the space, as a validated run config (the searcher draws its own)."""
    return run_config_for(space, {key: param.sample(rng) for key, param in space.params.items()})


def trial_overrides(flat: dict[str, Any]) -> dict:
    """Dotted keys -> a nested dict: {"data.scale": 50} -> {"data": {"scale": 50}}."""
    nested: dict = {}
    for key, value in flat.items():
        *sections, name = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return nested


def run_config_for(space: SearchSpace, flat_values: dict[str, Any]) -> RunConfig:
    """The run config of one trial: the space's base with the trial's dotted values on top."""
    return config_with_values(space.base, flat_values, source=space.source)


def config_with_values(base: dict, flat_values: dict[str, Any], *, source: str) -> RunConfig:
    """A nested run-config dict with dotted values on top, validated."""
    return config_from_dict(_merge(base, trial_overrides(flat_values)), source=source)


def grid_points(space: SearchSpace) -> list[dict[str, Any]]:
    """Every combination of a space of choices and fixed values (the exhaustive grid), as flat dicts."""
    options = []
    for key, param in space.params.items():
        if not isinstance(param, (Choice, Fixed)):
            raise UserInputError(
                f"{space.source}: space.{key}: a {_name(param)} has no finite grid; "
                "a grid needs every parameter to be a choice or a fixed value"
            )
        options.append(param.values if isinstance(param, Choice) else (param.value,))
    return [dict(zip(space.params, combination)) for combination in itertools.product(*options)]


def _parse_param(key: str, value: Any, base: dict, source: str) -> Distribution | Fixed:
    where = f"{source}: space.{key}"
    leaves, sections = _run_config_paths()
    if key in sections:
        example = next(path for path in leaves if path.startswith(key + "."))
        raise UserInputError(
            f"{where}: '{key}' is a section of the run config, not a value; name one of its keys, e.g. '{example}'"
        )
    if key not in leaves:
        raise UserInputError(f"{where}: not a run-config key{_did_you_mean(key, leaves)}")
    if _lookup(base, key) is not _MISSING:
        raise UserInputError(f"{where}: also set in base; set it in one place")
    if not isinstance(value, dict):
        return Fixed(value)
    if len(value) != 1:
        keys = ", ".join(map(str, value))
        raise UserInputError(f"{where}: expected one distribution, e.g. {{uniform: [0.5, 1.2]}}, got keys {keys}")
    (name, args), = value.items()
    if name not in DISTRIBUTIONS:
        raise UserInputError(
            f"{where}: unknown distribution '{name}'{_did_you_mean(name, DISTRIBUTIONS)} "
            f"(expected one of {', '.join(DISTRIBUTIONS)}, or a fixed value)"
        )
    try:
        param = _make(DISTRIBUTIONS[name], name, args)
    except UserInputError as exc:
        raise UserInputError(f"{where}: {exc}") from None
    # A fractional draw would fail the run config's integer check mid-sweep; refuse it now.
    fractional = isinstance(param, (Uniform, LogUniform)) or (isinstance(param, QUniform) and not param.integral)
    if leaves[key] is int and fractional:
        raise UserInputError(
            f"{where}: {key} takes an integer, but {name} draws fractions; "
            "use randint, or quniform with integer low, high and q"
        )
    return param


def _make(cls: type, name: str, args: Any) -> Distribution:
    if not isinstance(args, list):
        raise UserInputError(f"{name} expects a list, e.g. {name}: [...], got {args!r}")
    if cls is Choice:
        return Choice(tuple(args))
    names = [f.name for f in dataclasses.fields(cls)]
    if len(args) != len(names):
        raise UserInputError(f"{name} expects [{', '.join(names)}], got {args!r}")
    for arg in args:
        if isinstance(arg, bool) or not isinstance(arg, (int, float)) or not math.isfinite(arg):
            # PyYAML reads 1e-3 (no dot) as text: say so, it is the usual cause.
            yaml_text = isinstance(arg, str) and _parses_as_float(arg)
            hint = f" (YAML reads {arg} as text; give the mantissa a dot, e.g. 1.0e-3)" if yaml_text else ""
            raise UserInputError(f"{name} expects finite numbers, got {arg!r}{hint}")
    return cls(*args)


def _check_values(params: dict[str, Distribution | Fixed], base: dict, source: str) -> None:
    """Build run configs with each choice value and each end of each range, so bad values fail now."""
    fixed = {key: p.value for key, p in params.items() if isinstance(p, Fixed)}
    context = _merge(base, trial_overrides(fixed))
    config_from_dict(context, source=f"{source}: space")
    for key, param in params.items():
        if isinstance(param, Fixed):
            continue
        for value in param.values if isinstance(param, Choice) else (param.low, param.high):
            overrides = trial_overrides({key: value})
            config_from_dict(_merge(context, overrides), source=f"{source}: space.{key} = {value!r}")


def _check_bounds(dist: Uniform | LogUniform | RandInt | QUniform) -> None:
    if dist.low > dist.high:
        raise UserInputError(f"low {dist.low} > high {dist.high}")


@functools.cache
def _run_config_paths() -> tuple[dict[str, Any], set[str]]:
    """Dotted paths of the run config: its leaf fields (with their types) and its sections."""
    leaves: dict[str, Any] = {}
    sections: set[str] = set()

    def walk(cls: type, prefix: str) -> None:
        hints = get_type_hints(cls)
        for name in (f.name for f in dataclasses.fields(cls)):
            hint = hints[name]
            if dataclasses.is_dataclass(hint):
                sections.add(prefix + name)
                walk(hint, f"{prefix}{name}.")
            else:
                leaves[prefix + name] = hint

    walk(RunConfig, "")
    return leaves, sections


_MISSING = object()


def _lookup(nested: dict, dotted: str) -> Any:
    node: Any = nested
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_sections else value
    return merged


def _did_you_mean(word: Any, options: Any) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _name(param: Distribution) -> str:
    return next(name for name, cls in DISTRIBUTIONS.items() if isinstance(param, cls))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
