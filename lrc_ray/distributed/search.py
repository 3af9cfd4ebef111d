"""The sweep's searchers: Optuna TPE that proposes each distinct run once, one per label fraction.

- A label fraction is a condition a user compares settings at, not a value to maximise: one TPE
  over it as one more dimension crowds toward 1.0 and leaves the low-label cells thin. So a
  space whose `finetune.label_fraction` is a choice gets one TPE per fraction
  (`StratifiedSearch`), and trials are dealt to the fractions in turn: each gets its share
  of the sweep and learns only from its own trials.
- TPE on a space of a few choices proposes points it has already run (a quarter of the
  quick-start's trials, replayed), and each repeat would spend one of the sweep's trials on a
  result it already has (`SweepOptunaSearch`).
- Each TPE keeps its study in an Optuna storage (`open_storage`: a journal file in the sweep's
  directory, or a database URL), where optuna-dashboard shows the sweep live and `optuna.load_study`
  reads it; a resumed sweep goes on in the same studies.
- Tune runs them through `search_algorithm` (as it runs a grid and the finalists, `ListedSearch`):
  `SweepSearch` keeps the trials-at-a-time limit and `SweepGenerator` the count of trials, and
  on resume both square themselves with the trials Tune restored, and the searches with the
  studies: a SIGKILL leaves Tune's trial states, its count, its limiter, the searcher's state and
  the studies from different moments (Tune uploads its files one by one, every 10 s or more; a
  study is written as each trial ends).
"""

from __future__ import annotations

import logging
import math
import pickle
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import optuna
from ray.tune.search import ConcurrencyLimiter, SearchGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

from lrc_ray.errors import UserInputError
from lrc_ray.search_space import LABEL_FRACTION_KEY as CONDITION_KEY, SearchSpace, label_fractions



class SweepOptunaSearch(OptunaSearch):
    """OptunaSearch as a sweep needs it: each distinct run proposed once, final results only.

    - A proposal whose run (`run_key` of the trial's values: equal when the fine-tuning and its
      pre-training would be) was proposed before is told to Optuna with that run's outcome (its
      metric; pruned when it was stopped or failed; failed, i.e. ignored, while it still runs)
      and drawn again, up to `max_redraws` times; after that the repeat runs (its results are
      reused, so it costs little). Without this, TPE repeats about a quarter of the quick-start
      sweep's trials (`bench/search_simulation.py`).
    - The per-epoch probe reports, which lack the searched metric, are not passed on: Optuna's
      intermediate values feed only pruners, and OptunaSearch runs a no-op pruner (ASHA stops).
    - After a restore it catches up with the study, which is written as trials end, not at Tune's
      checkpoints, and with the trials Tune restored (`catch_up`).
    """

    def __init__(self, *, run_key: Callable[[dict], str], max_redraws: int = 20, **kwargs) -> None:
        # kwargs: OptunaSearch's (metric, mode, sampler, and storage and study_name for a stored study)
        super().__init__(**kwargs)
        self._run_key = run_key
        self._max_redraws = max_redraws
        self._key_of_trial: dict[str, str] = {}
        self._outcome: dict[str, float | None] = {}  # run key -> its metric (None: not known yet)
        self._finished_keys: set[str] = set()

    def suggest(self, trial_id: str) -> dict | None:
        for redraw in range(self._max_redraws + 1):
            values = super().suggest(trial_id)
            key = self._run_key(values)
            if key not in self._outcome or redraw == self._max_redraws:
                break
            value = self._outcome[key]
            if value is not None:
                state = optuna.trial.TrialState.COMPLETE
            else:
                state = optuna.trial.TrialState.PRUNED if key in self._finished_keys else optuna.trial.TrialState.FAIL
            repeat = self._ot_trials.pop(trial_id)
            repeat.set_user_attr("repeat", "not run: proposed a run again, told that run's outcome")  # for the dashboard
            self._ot_study.tell(repeat, value, state=state)
        self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)  # the trial_id of the results table
        self._key_of_trial[trial_id] = key
        self._outcome.setdefault(key, None)
        return values

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result and self._is_running(trial_id):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._is_running(trial_id):
            self._record_outcome(trial_id, (result or {}).get(self.metric))
            super().on_trial_complete(trial_id, result=result, error=error)

    def _is_running(self, trial_id: str) -> bool:
        """Whether Optuna still waits for this trial: not one the study already has the outcome of
        (a restored sweep runs again the trials that ended after its checkpoint; they compute the
        same), nor one proposed after this searcher's checkpoint (`catch_up`)."""
        return trial_id in self._ot_trials and trial_id not in self._completed_trials

    def _record_outcome(self, trial_id: str, value: float | None) -> None:
        key = self._key_of_trial.get(trial_id)
        if key is not None and key not in self._finished_keys:
            self._finished_keys.add(key)
            self._outcome[key] = value

    def catch_up(self, tune_trials: dict[str, RestoredTrial] | None = None) -> None:
        """After a restore, take from the study what happened after this searcher's checkpoint,
        and from Tune which trials it will run (`tune_trials`, when known):
        - a trial it proposed that has finished there is finished here too (Tune, restored from
          the same checkpoint or an older one, runs it again: its reports are not told twice);
        - a trial it proposed that Tune does not have (Tune's state is older than this
          checkpoint) will not run: it is marked failed, not counted as running forever;
        - a trial still running there that it never proposed was proposed after the checkpoint;
          it is marked failed (Optuna then ignores it) rather than left running in the study forever.

        Raises:
            UserInputError: the study is no longer in its storage (a journal file on a node that is gone).
        """
        if self._ot_study is None:
            return
        try:
            stored = optuna.get_all_study_names(self._ot_study._storage)
        except FileNotFoundError as exc:  # the journal file
            raise lost_studies(exc.filename) from None
        if self._ot_study.study_name not in stored:
            raise lost_studies(f"study {self._ot_study.study_name!r}")
        trial_of_number = {trial.number: trial_id for trial_id, trial in self._ot_trials.items()}
        for trial in self._ot_study.get_trials(deepcopy=False):
            trial_id = trial_of_number.get(trial.number)
            if trial_id is None:
                if trial.state == optuna.trial.TrialState.RUNNING:
                    self._ot_study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            elif trial_id in self._completed_trials:
                continue
            elif trial.state.is_finished():
                self._record_outcome(trial_id, trial.value)
                self._completed_trials.add(trial_id)
            elif tune_trials is not None and trial_id not in tune_trials:
                self._forget(trial_id)

    def _forget(self, trial_id: str) -> None:
        """A proposal that will never run: failed in the study, and its run free to be proposed again."""
        self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.FAIL)
        self._completed_trials.add(trial_id)
        key = self._key_of_trial.pop(trial_id)
        if key not in self._finished_keys and key not in self._key_of_trial.values():
            del self._outcome[key]


class PickledSearcher(Searcher):
    """A searcher whose checkpoint is its whole state (its searches, with their studies)."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__dict__.copy(), handle)

    def load(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))


class StratifiedSearch(PickledSearcher):
    """One searcher per value of a condition key (the label fraction); trial n goes to value
    n mod V, so each value gets its share of the trials, and each searcher sees only the space
    without the key and only its own trials' results."""

    def __init__(self, searchers: dict[Any, SweepOptunaSearch], *, key: str, metric: str, mode: str) -> None:
        super().__init__(metric=metric, mode=mode)
        self._searchers = searchers
        self._key = key
        self._dealt = 0
        self._value_of_trial: dict[str, Any] = {}

    def set_search_properties(self, metric, mode, config: dict, **spec) -> bool:
        rest = {name: domain for name, domain in config.items() if name != self._key}
        return all(searcher.set_search_properties(metric, mode, rest, **spec) for searcher in self._searchers.values())

    def suggest(self, trial_id: str) -> dict | None:
        value = list(self._searchers)[self._dealt % len(self._searchers)]
        suggested = self._searchers[value].suggest(trial_id)
        if suggested is None or suggested == Searcher.FINISHED:
            return suggested
        self._dealt += 1
        self._value_of_trial[trial_id] = value
        return {**suggested, self._key: value}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        value = self._value_of_trial.get(trial_id)  # None: proposed after this searcher's checkpoint
        if value is not None:
            self._searchers[value].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        value = self._value_of_trial.get(trial_id)
        if value is not None:
            self._searchers[value].on_trial_complete(trial_id, result=result, error=error)

    def catch_up(self, tune_trials: dict[str, RestoredTrial] | None = None) -> None:
        for searcher in self._searchers.values():
            searcher.catch_up(tune_trials)

    def restore(self, checkpoint_path: str) -> None:
        # Tune holds this search unwrapped in the sweeps started before `SweepSearch`; they resume so.
        self.load(checkpoint_path)
        self.catch_up(trials_tune_restored(Path(checkpoint_path).parent))


class SweepSearch(PickledSearcher):
    """A search (`SweepOptunaSearch`, a `StratifiedSearch` of them, a `ListedSearch`) as Tune sees it.

    - It keeps the trials-at-a-time limit (`set_max_concurrency`: Tune's ConcurrencyLimiter then
      passes everything through), counting the trials Tune runs. More would not only crowd the
      cluster: a trial in its own process holds a CPU while its Ray Data reads wait for one.
    - Resumed, it counts the trials Tune restored unfinished (`trials_tune_restored`; Tune runs
      them again), and its search catches up with them and with the studies. Tune's own limiter
      comes back from a file of its own, which a SIGKILL during Tune's upload leaves older or newer
      than Tune's trial states: it counted a trial that had ended as running, and the resumed
      sweep proposed nothing more, forever.
    """

    def __init__(self, search: SweepOptunaSearch | StratifiedSearch | ListedSearch, *, metric: str | None = None,
                 mode: str | None = None) -> None:
        super().__init__(metric=metric, mode=mode)
        self._search = search  # not `searcher`: Tune would take this for a wrapper and restore the search alone
        self._running: set[str] = set()
        self._max_concurrent = 0  # 0: no limit

    def set_search_properties(self, metric, mode, config: dict, **spec) -> bool:
        return self._search.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self._max_concurrent = max_concurrent
        return True

    def suggest(self, trial_id: str) -> dict | None:
        if self._max_concurrent and len(self._running) >= self._max_concurrent:
            return None
        suggested = self._search.suggest(trial_id)
        if suggested is not None and suggested != Searcher.FINISHED:
            self._running.add(trial_id)
        return suggested

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._search.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._running.discard(trial_id)
        self._search.on_trial_complete(trial_id, result=result, error=error)

    def restore(self, checkpoint_path: str) -> None:
        self.load(checkpoint_path)  # `SweepGenerator` then squares it with Tune's trials (`resume`)

    def resume(self, tune_trials: dict[str, RestoredTrial] | None) -> None:
        """Square the restored state with the trials Tune restored (None where not known) and
        with the studies."""
        if tune_trials is not None:  # Tune runs its unfinished and failed trials again
            self._running = {trial_id for trial_id, trial in tune_trials.items() if trial.status != "TERMINATED"}
        self._search.catch_up(tune_trials)


class ListedSearch(Searcher):
    """Proposes each configuration of a list once, in order: a grid, the finalists. Through
    `search_algorithm`, so a resumed run proposes just those Tune's restored trials lack."""

    def __init__(self, configs: list[dict[str, Any]]) -> None:
        super().__init__()
        self._configs = configs
        self._proposed: set[int] = set()  # indices into configs

    def set_search_properties(self, metric, mode, config: dict, **spec) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict | None:
        index = next((index for index in range(len(self._configs)) if index not in self._proposed), None)
        if index is None:
            return Searcher.FINISHED
        self._proposed.add(index)
        return dict(self._configs[index])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass  # nothing to learn

    def catch_up(self, tune_trials: dict[str, RestoredTrial] | None = None) -> None:
        if tune_trials is not None:
            self._proposed = {index for index, config in enumerate(self._configs)
                              if any(config.items() <= trial.config.items() for trial in tune_trials.values())}


class SweepGenerator(SearchGenerator):
    """Tune's SearchGenerator, resumed from the trials Tune restored (read once, here). Its count of
    the trials created comes back from a file of its own: older than Tune's trial states, Tune
    would create trials beyond the sweep's number; newer, it would end the sweep short. So the
    count is that of the restored trials, and its `SweepSearch` resumes from them too."""

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        restored = trials_tune_restored(dirpath)
        sweep_search = self.searcher.searcher  # behind the ConcurrencyLimiter (`search_algorithm`)
        sweep_search.resume(restored)
        if restored is not None:
            self._counter = len(restored)
            self._finished = False  # the searcher says so again when it is


def search_algorithm(search: SweepOptunaSearch | StratifiedSearch | ListedSearch, *, metric: str | None = None,
                     mode: str | None = None, max_concurrent: int) -> SweepGenerator:
    """What Tune runs `search` as: `SweepSearch` keeps `max_concurrent` trials at a time (behind
    Tune's ConcurrencyLimiter, which passes it all through but sets Tune's pending-trial limit)."""
    return SweepGenerator(ConcurrencyLimiter(SweepSearch(search, metric=metric, mode=mode),
                                             max_concurrent=max_concurrent))


class RestoredTrial(NamedTuple):
    status: str  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    config: dict[str, Any]


def trials_tune_restored(directory: Path | str) -> dict[str, RestoredTrial] | None:
    """trial id -> status and config of the trials in the experiment state Tune resumes from: Tune
    restores its search from `directory`, into which it has just copied that state. None where no
    state lies there (a searcher restored by hand)."""
    from ray.tune import ExperimentAnalysis

    if not any(Path(directory).glob("experiment_state-*.json")):
        return None
    # Tune copies only its state files there, not the trials' results, which are not needed here:
    # ExperimentAnalysis would warn of each one missing.
    analysis_logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = analysis_logger.level
    analysis_logger.setLevel(logging.ERROR)
    try:
        return {trial.trial_id: RestoredTrial(trial.status, dict(trial.config))
                for trial in ExperimentAnalysis(str(directory)).trials}
    finally:
        analysis_logger.setLevel(level)


def lost_studies(what: str) -> UserInputError:
    return UserInputError(f"--resume: the sweep's Optuna studies are gone ({what} is missing: a journal file on a "
                          "node that is gone?); a sweep that outlives its cluster needs --optuna-storage with a "
                          "database URL (postgresql://...)")


def make_searcher(space: SearchSpace, run_key: Callable[[dict], str], trials: int, *, sampler: str = "tpe",
                  storage: optuna.storages.BaseStorage | None = None,
                  study_name: str = "sweep") -> SweepOptunaSearch | StratifiedSearch:
    """The sweep's searcher: TPE (seeded from the space) or, for comparison, random sampling; one
    per label fraction when the space searches several (`StratifiedSearch`, `trials` shared among
    them). `run_key` maps a trial's values to its run (equal for runs that would compute the same).
    With `storage`, the studies are kept there, named `study_names(space, study_name)`."""
    if sampler not in ("tpe", "random"):
        raise UserInputError(f"--sampler {sampler}: expected tpe or random")
    settings = space.sweep
    values = label_fractions(space)
    names = study_names(space, study_name)
    if values is None:
        return _optuna_search(space, run_key, trials, sampler=sampler, seed=settings.seed, storage=storage,
                              study_name=names[0])
    share = math.ceil(trials / len(values))
    searchers = {}
    for index, (value, name) in enumerate(zip(values, names)):
        seed = int(np.random.SeedSequence([settings.seed, index]).generate_state(1)[0])
        searchers[value] = _optuna_search(space, partial(_with_condition, run_key, value), share, sampler=sampler,
                                          seed=seed, storage=storage, study_name=name)
    return StratifiedSearch(searchers, key=CONDITION_KEY, metric=settings.metric, mode=settings.mode)


def study_names(space: SearchSpace, name: str) -> list[str]:
    """The Optuna studies a sweep called `name` keeps: `name`, or one per label fraction,
    `name` + " label_fraction=" + the fraction."""
    values = label_fractions(space)
    return [name] if values is None else [f"{name} {CONDITION_KEY.split('.')[-1]}={value:g}" for value in values]


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage: a database URL (sqlite:///..., postgresql://..., mysql://...) or the path of
    a journal file (optuna-dashboard reads both).

    Raises:
        UserInputError: a URL Optuna cannot open, naming it and why.
    """
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        path = Path(url).resolve()
        if path.is_file() and path.open("rb").read(16) == b"SQLite format 3\x00":
            raise UserInputError(f"--optuna-storage {url}: an SQLite database; give it as sqlite:///{path}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise UserInputError(f"--optuna-storage {url}: cannot write the journal file ({exc.strerror})") from None
    try:
        return optuna.storages.get_storage(url)
    except Exception as exc:  # SQLAlchemy raises many types for a bad URL, a missing driver or an unreachable server
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserInputError(f"--optuna-storage {url}: Optuna cannot open it ({reason})") from None


def storage_for_new_studies(url: str, names: list[str]) -> optuna.storages.BaseStorage:
    """`open_storage(url)` for a new sweep's studies `names`: a study of the same name there would
    mix another sweep's trials into this one's TPE.

    Raises:
        UserInputError: the URL cannot be opened, or it holds one of the names already.
    """
    storage = open_storage(url)
    taken = sorted(set(names) & set(optuna.get_all_study_names(storage)))
    if taken:
        raise UserInputError(f"--optuna-storage {url}: already holds the study {taken[0]!r}; give the sweep another "
                             "--name, or pass --resume to continue it")
    return storage


def _with_condition(run_key: Callable[[dict], str], value: Any, trial_values: dict) -> str:
    return run_key({**trial_values, CONDITION_KEY: value})


def _optuna_search(space: SearchSpace, run_key, trials: int, *, sampler: str, seed: int,
                   storage: optuna.storages.BaseStorage | None, study_name: str) -> SweepOptunaSearch:
    settings = space.sweep
    if sampler == "tpe":
        optuna_sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.tpe_startup_trials(trials))
    else:
        optuna_sampler = optuna.samplers.RandomSampler(seed=seed)
    return SweepOptunaSearch(metric=settings.metric, mode=settings.mode, sampler=optuna_sampler, run_key=run_key,
                             storage=storage, study_name=study_name)
