"""The sweep's searchers: each distinct run proposed once, one TPE per label fraction. No Ray cluster."""

import json
import pickle
import subprocess
import sys

import optuna
import pytest

import ray
from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from lrc_ray.distributed.search import (
    ListedSearch, RestoredTrial, StratifiedSearch, SweepOptunaSearch, SweepSearch, make_searcher, open_storage,
    search_algorithm, storage_for_new_studies, study_names,
)
from lrc_ray.errors import UserInputError
from lrc_ray.search_space import parse_search_space


@pytest.fixture(autouse=True)
def _no_ray_cluster():
    yield
    assert not ray.is_initialized(), "these helpers must not start Ray"


# --- SweepOptunaSearch ----------------------------------------------------------------------


def _searcher(choices=(1, 2), run_key=lambda values: str(values["x"]), **kwargs):
    searcher = SweepOptunaSearch(metric="dice_mean", mode="max", run_key=run_key, **kwargs)
    assert searcher.set_search_properties(None, None, {"x": tune.choice(list(choices))})
    return searcher


def _sweep_search(**kwargs) -> SweepSearch:
    """`_searcher` as Tune sees it (`make_searcher` wraps every search so)."""
    return SweepSearch(_searcher(**kwargs), metric="dice_mean", mode="max")


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
    assert trials[0].user_attrs == {"tune_trial_id": "t1"}


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
    assert [set(trial.user_attrs) for trial in searcher._ot_study.trials[:3]] == [{"tune_trial_id"}, {"repeat"},
                                                                                 {"tune_trial_id"}]
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




# --- StratifiedSearch: one search per label fraction -----------------------------------------


def _fraction_space(fractions=(0.25, 1.0), **sweep):
    return parse_search_space({
        "sweep": {"seed": 3, **sweep},
        "space": {"pretrain.method": {"choice": ["scratch", "lrc", "global"]}, "data.scale": {"choice": [50, 200]},
                  "finetune.label_fraction": {"choice": list(fractions)}},
    }, source="fractions")


def _run_key(values):
    return f"{values['pretrain.method']}-{values['data.scale']}-{values['finetune.label_fraction']}"


def _stratified(space, trials=6, **kwargs):
    from lrc_ray.distributed.tune import tune_param_space

    searcher = make_searcher(space, _run_key, trials, **kwargs)
    assert searcher.set_search_properties(None, None, tune_param_space(space))
    return searcher


def test_a_space_of_several_label_fractions_gets_one_search_per_fraction_dealt_in_turn():
    searcher = _stratified(_fraction_space((0.25, 0.5, 1.0)), trials=9)
    assert isinstance(searcher, StratifiedSearch)
    fractions = []
    for number in range(9):
        values = searcher.suggest(f"t{number}")
        fractions.append(values["finetune.label_fraction"])
        searcher.on_trial_complete(f"t{number}", {"dice_mean": 0.5})
    assert fractions == [0.25, 0.5, 1.0] * 3, "every fraction gets its share"
    inner = searcher._searchers
    assert [len(inner[fraction]._key_of_trial) for fraction in (0.25, 0.5, 1.0)] == [3, 3, 3]
    assert all("finetune.label_fraction" not in trial.params for s in inner.values() for trial in s._ot_study.trials), \
        "the fraction is a condition, not a dimension of each search"


def test_each_fraction_learns_only_from_its_own_trials():
    searcher = _stratified(_fraction_space(), trials=4)
    low = searcher.suggest("a")
    high = searcher.suggest("b")
    searcher.on_trial_complete("b", {"dice_mean": 0.9})
    searcher.on_trial_complete("a", {"dice_mean": 0.2})
    inner = searcher._searchers
    assert [trial.value for trial in inner[0.25]._ot_study.trials] == [0.2]
    assert [trial.value for trial in inner[1.0]._ot_study.trials] == [0.9]
    assert low["finetune.label_fraction"] == 0.25 and high["finetune.label_fraction"] == 1.0


def test_repeats_are_judged_within_a_fraction():
    """The same setting at another fraction is another run: each fraction's search may propose it."""
    searcher = _stratified(_fraction_space(), trials=12)
    proposed = []
    for number in range(12):
        proposed.append(_run_key(searcher.suggest(f"t{number}")))
        searcher.on_trial_complete(f"t{number}", {"dice_mean": 0.1})
    assert len(set(proposed)) == 12, "6 distinct runs per fraction, each proposed once"


def test_the_stratified_search_saves_and_restores_its_state(tmp_path):
    searcher = _stratified(_fraction_space(), trials=4)
    searcher.suggest("a")
    searcher.on_trial_complete("a", {"dice_mean": 0.4})
    searcher.save(str(tmp_path / "state"))
    restored = _stratified(_fraction_space(), trials=4)
    restored.restore(str(tmp_path / "state"))
    assert restored.suggest("b")["finetune.label_fraction"] == 1.0, "dealing continues where it stopped"
    assert [t.value for t in restored._searchers[0.25]._ot_study.trials] == [0.4]
    pickle.dumps(restored)  # Tune pickles the searcher with the Tuner


def test_one_fraction_is_one_search_and_random_sampling_is_stratified_too():
    one = parse_search_space({"space": {"pretrain.method": {"choice": ["lrc", "global"]},
                                        "finetune.label_fraction": 0.5}}, source="one")
    assert isinstance(make_searcher(one, _run_key, 4), SweepOptunaSearch)
    assert isinstance(_stratified(_fraction_space(), sampler="random"), StratifiedSearch)
    with pytest.raises(Exception, match="tpe or random"):
        make_searcher(one, _run_key, 4, sampler="grid")



# --- the stored study -----------------------------------------------------------------------


def test_the_studies_are_stored_one_per_fraction_and_a_fresh_process_reads_them(tmp_path):
    journal = tmp_path / "optuna_journal.log"
    space = _fraction_space()
    names = study_names(space, "tiny")
    assert names == ["tiny label_fraction=0.25", "tiny label_fraction=1"]
    searcher = _stratified(space, trials=4, storage=storage_for_new_studies(str(journal), names), study_name="tiny")
    for trial_id, value in (("a", 0.2), ("b", 0.7)):
        searcher.suggest(trial_id)
        searcher.on_trial_complete(trial_id, {"dice_mean": value})
    read = subprocess.run(
        [sys.executable, "-c", "import json, sys, optuna\n"
         "from optuna.storages import JournalStorage\n"
         "from optuna.storages.journal import JournalFileBackend\n"
         "storage = JournalStorage(JournalFileBackend(sys.argv[1]))\n"
         "print(json.dumps({name: [(t.state.name, t.value) for t in optuna.load_study(study_name=name, "
         "storage=storage).trials] for name in optuna.get_all_study_names(storage)}))", str(journal)],
        capture_output=True, text=True, timeout=60,
    )
    assert read.returncode == 0, read.stderr[-2000:]
    assert json.loads(read.stdout) == {names[0]: [["COMPLETE", 0.2]], names[1]: [["COMPLETE", 0.7]]}


def test_a_new_sweep_refuses_a_storage_that_holds_its_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    space = _fraction_space()
    _stratified(space, storage=storage_for_new_studies(url, study_names(space, "tiny")), study_name="tiny")
    with pytest.raises(UserInputError, match=r"--optuna-storage sqlite:///.*: already holds the study "
                                             r"'tiny label_fraction=0.25'; give the sweep another --name"):
        storage_for_new_studies(url, study_names(space, "tiny"))
    storage_for_new_studies(url, study_names(space, "other"))  # another sweep's names are free


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("nosuchdialect://x/y", "--optuna-storage nosuchdialect://x/y: Optuna cannot open it ("),
        ("/proc/lrc_ray/journal.log", "--optuna-storage /proc/lrc_ray/journal.log: cannot write the journal file"),
        ("{tmp}/an.db", ": an SQLite database; give it as sqlite:///"),
    ],
)
def test_a_bad_optuna_storage_is_one_line(tmp_path, url, message):
    optuna.create_study(storage=f"sqlite:///{tmp_path / 'an.db'}")
    with pytest.raises(UserInputError) as raised:
        open_storage(url.format(tmp=tmp_path))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def _study_states(storage, name="tiny"):
    return [(t.state.name, t.value) for t in optuna.load_study(study_name=name, storage=storage).trials]


def _restored(tmp_path, make, *, limit: int = 0, proposed=("a", "b"), after=lambda searcher: None,
              tune_trials: dict[str, str] | None):
    """`make()` as Tune runs it behind its ConcurrencyLimiter: `proposed`, a checkpoint, `after`
    it, then, as a resumed Tune does, a fresh one restored from that checkpoint (the limiter's
    state and the searcher's as they were, the studies as they are) and told the trials Tune restored."""
    limiter = ConcurrencyLimiter(make(), max_concurrent=limit) if limit else make()
    for trial_id in proposed:
        assert limiter.suggest(trial_id) is not None
    state = limiter.get_state() if limit else None
    (limiter.searcher if limit else limiter).save(str(tmp_path / "state"))
    after(limiter)
    restored = ConcurrencyLimiter(make(), max_concurrent=limit) if limit else make()
    if limit:
        restored.set_state(state)
    search = restored.searcher if limit else restored
    search.restore(str(tmp_path / "state"))
    search.resume(None if tune_trials is None else {trial_id: RestoredTrial(status, {})
                                                    for trial_id, status in tune_trials.items()})
    return restored


def test_a_restored_searcher_fails_the_stored_trials_it_never_proposed(tmp_path):
    """Killed between a proposal and Tune's next checkpoint: the proposal is in the study, but
    neither Tune nor the checkpointed searcher knows it; after the restore it is failed, not left
    running, and the trials the searcher knows are told as they finish."""
    storage = storage_for_new_studies(str(tmp_path / "journal.log"), ["tiny"])
    make = lambda: _sweep_search(choices=(1, 2, 3), run_key=str, storage=storage, study_name="tiny", seed=0)  # noqa: E731
    restored = _restored(tmp_path, make, proposed=("known",), after=lambda searcher: searcher.suggest("lost"),
                         tune_trials={"known": "RUNNING"})
    restored.on_trial_complete("known", {"dice_mean": 0.6})
    assert _study_states(storage) == [("COMPLETE", 0.6), ("FAIL", None)]


def test_a_restored_searcher_does_not_tell_again_what_the_study_recorded_after_its_checkpoint(tmp_path):
    """Killed after a trial ended (the study records it at once) but before Tune's next checkpoint:
    the resumed Tune runs it again, and its reports must not be told to Optuna twice (Optuna
    raises UpdateFinishedTrialError on a finished trial, which ended the resumed sweep)."""
    storage = storage_for_new_studies(str(tmp_path / "journal.log"), ["tiny"])
    make = lambda: _sweep_search(choices=(1,), run_key=str, storage=storage, study_name="tiny", seed=0)  # noqa: E731
    restored = _restored(tmp_path, make, proposed=("ended",),
                         after=lambda searcher: searcher.on_trial_complete("ended", {"dice_mean": 0.6}),
                         tune_trials={"ended": "RUNNING"})
    restored.on_trial_result("ended", {"dice_mean": 0.6, "training_iteration": 2})
    restored.on_trial_complete("ended", {"dice_mean": 0.6})
    restored.suggest("next")  # a repeat of the ended run, told the outcome the study has
    assert _study_states(storage)[:2] == [("COMPLETE", 0.6), ("COMPLETE", 0.6)]


def test_a_resumed_sweep_counts_the_trials_tune_restored_not_its_old_limiter(tmp_path):
    """Tune's ConcurrencyLimiter comes back from a file of its own, which can be older than Tune's
    trial states: it counted `a`, which had ended, as running, and the resumed sweep proposed
    nothing more, forever. The sweep's searcher counts the trials Tune restored unfinished."""
    storage = storage_for_new_studies(str(tmp_path / "journal.log"), ["tiny"])
    make = lambda: _sweep_search(choices=(1, 2, 3), run_key=str, storage=storage, study_name="tiny", seed=0)  # noqa: E731
    restored = _restored(tmp_path, make, limit=2, after=lambda limiter: limiter.on_trial_complete("a", {"dice_mean": 0.5}),
                         tune_trials={"a": "TERMINATED", "b": "RUNNING"})
    assert restored.suggest("c") is not None, "a ended: one trial (b) runs"
    assert restored.suggest("d") is None, "b and c run: the limit holds"
    restored.on_trial_complete("b", {"dice_mean": 0.4})
    assert restored.suggest("d") is not None


def test_a_trial_tune_runs_again_counts_against_the_limit(tmp_path):
    """A trial that ended after Tune's checkpoint runs again: with one trial at a time nothing
    else may start beside it (in its own process it holds the CPU its Ray Data reads wait for)."""
    storage = storage_for_new_studies(str(tmp_path / "journal.log"), ["tiny"])
    make = lambda: _sweep_search(choices=(1, 2, 3), run_key=str, storage=storage, study_name="tiny", seed=0)  # noqa: E731
    restored = _restored(tmp_path, make, limit=1, proposed=("a",),
                         after=lambda limiter: limiter.on_trial_complete("a", {"dice_mean": 0.5}),
                         tune_trials={"a": "RUNNING"})
    assert restored.suggest("b") is None
    restored.on_trial_complete("a", {"dice_mean": 0.5})
    assert restored.suggest("b") is not None


def test_a_proposal_missing_from_the_trials_tune_restored_is_failed_not_counted_as_running(tmp_path):
    """Tune's trial states can also be older than the searcher's checkpoint: `b` was proposed, but
    Tune will never run it."""
    storage = storage_for_new_studies(str(tmp_path / "journal.log"), ["tiny"])
    make = lambda: _sweep_search(choices=(1, 2, 3), run_key=str, storage=storage, study_name="tiny", seed=0)  # noqa: E731
    restored = _restored(tmp_path, make, limit=2, tune_trials={"a": "RUNNING"})
    assert restored.suggest("c") is not None and restored.suggest("d") is None, "a and c run"
    assert [state for state, _ in _study_states(storage)][:3] == ["RUNNING", "FAIL", "RUNNING"]


def test_the_stratified_search_keeps_one_limit_over_its_fractions(tmp_path):
    space = _fraction_space()
    storage = storage_for_new_studies(str(tmp_path / "journal.log"), study_names(space, "tiny"))
    restored = _restored(tmp_path, lambda: SweepSearch(_stratified(space, trials=6, storage=storage, study_name="tiny")),
                         limit=2,
                         after=lambda limiter: limiter.on_trial_complete("b", {"dice_mean": 0.5}),
                         tune_trials={"a": "RUNNING", "b": "TERMINATED"})
    assert restored.suggest("c")["finetune.label_fraction"] == 0.25
    assert restored.suggest("d") is None, "a (0.25) and c (0.25) run"


def _resumed(search: SweepSearch, checkpoint) -> SweepSearch:
    """Restored as Tune resumes it, where no Tune state lies beside the checkpoint."""
    search.restore(str(checkpoint))
    search.resume(None)
    return search


def test_a_restored_searcher_whose_study_is_gone_says_so(tmp_path):
    journal = tmp_path / "journal.log"
    searcher = _sweep_search(run_key=str, storage=storage_for_new_studies(str(journal), ["tiny"]), study_name="tiny")
    searcher.suggest("a")
    searcher.save(str(tmp_path / "state"))
    journal.unlink()  # the head that held it is gone
    with pytest.raises(UserInputError, match=f"--resume: the sweep's Optuna studies are gone \\({journal} is missing"):
        _resumed(_sweep_search(run_key=str), tmp_path / "state")
    journal.write_text("")  # a new, empty journal in its place
    with pytest.raises(UserInputError, match="--resume: the sweep's Optuna studies are gone \\(study 'tiny' is missing"):
        _resumed(_sweep_search(run_key=str), tmp_path / "state")


# --- ListedSearch and SweepGenerator: a grid, the finalists, the count of trials ---------------


def test_a_listed_search_proposes_each_config_once_then_finishes():
    search = ListedSearch([{"finalist": 0}, {"finalist": 1}])
    assert [search.suggest("a"), search.suggest("b"), search.suggest("c")] == [{"finalist": 0}, {"finalist": 1},
                                                                               Searcher.FINISHED]


def test_a_resumed_listed_search_proposes_what_tunes_restored_trials_lack():
    """Killed mid-upload, the searcher's state can be older or newer than Tune's trial states: the
    trials Tune restored (their configs) say what is left, neither run twice nor never."""
    search = ListedSearch([{"finalist": index} for index in range(4)])
    search.suggest("a")  # as checkpointed: one proposed
    search.catch_up({"a": RestoredTrial("TERMINATED", {"finalist": 0}),
                     "c": RestoredTrial("RUNNING", {"finalist": 2, "other": "keys"})})
    assert [search.suggest("d"), search.suggest("e"), search.suggest("f")] == [{"finalist": 1}, {"finalist": 3},
                                                                               Searcher.FINISHED]


def test_a_resumed_generator_counts_the_trials_tune_restored(tmp_path, monkeypatch):
    """Tune's SearchGenerator keeps its count of created trials in a file of its own; older than
    Tune's trial states it would create trials beyond the sweep's number, newer it would end the
    sweep short. Resumed, it counts the trials Tune restored."""
    from lrc_ray.distributed import search as search_module

    generator = search_algorithm(ListedSearch([{"finalist": index} for index in range(4)]), max_concurrent=1)
    generator._total_samples = 4  # Tune's num_samples
    generator._counter = 3  # a count newer than Tune's trial states
    generator.save_to_dir(str(tmp_path), session_str="s")
    restored = search_algorithm(ListedSearch([{"finalist": index} for index in range(4)]), max_concurrent=1)
    tune_trials = {"a": RestoredTrial("TERMINATED", {"finalist": 0}), "b": RestoredTrial("TERMINATED", {"finalist": 1})}
    monkeypatch.setattr(search_module, "trials_tune_restored", lambda directory: tune_trials)
    restored.restore_from_dir(str(tmp_path))
    assert restored._counter == 2 and not restored.is_finished()
