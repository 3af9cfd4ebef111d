import pytest

from lrc_ray.engine.splits import label_fraction_subset, split_labelled_cases
from lrc_ray.errors import UserInputError

CASES = [f"case_{i:03d}" for i in range(10)]


def test_validation_is_held_out_per_volume_and_seeded():
    split = split_labelled_cases(CASES, validation_cases=3, seed=0)
    assert len(split.validation) == 3 and len(split.train_pool) == 7
    assert not set(split.validation) & set(split.train_pool)
    assert split == split_labelled_cases(list(reversed(CASES)), validation_cases=3, seed=0), "order of input is irrelevant"
    assert split != split_labelled_cases(CASES, validation_cases=3, seed=1)


def test_label_fraction_subsets_are_nested_and_keep_one_volume():
    pool = split_labelled_cases(CASES, validation_cases=2, seed=0).train_pool
    small, middle, full = (label_fraction_subset(pool, f, seed=0) for f in (0.01, 0.5, 1.0))
    assert len(small) == 1 and len(middle) == 4 and set(full) == set(pool)
    assert set(small) <= set(middle) <= set(full)


def test_too_many_validation_volumes():
    with pytest.raises(UserInputError, match=r"data.validation_cases 3 \+ data.test_cases 0: 3 held-out volumes leave none of the 3"):
        split_labelled_cases(CASES[:3], validation_cases=3, seed=0)


@pytest.mark.parametrize("fraction", [0, -0.5, 1.01])
def test_fraction_out_of_range(fraction):
    with pytest.raises(UserInputError, match="label fraction"):
        label_fraction_subset(tuple(CASES), fraction, seed=0)


def test_test_volumes_are_held_out_from_training_and_validation():
    split = split_labelled_cases(CASES, validation_cases=2, test_cases=3, seed=0)
    assert len(split.validation) == 2 and len(split.test) == 3 and len(split.train_pool) == 5
    assert not set(split.test) & (set(split.validation) | set(split.train_pool))
    assert split.part("test") == split.test and split.part("validation") == split.validation


def test_adding_test_volumes_keeps_the_validation_split():
    before = split_labelled_cases(CASES, validation_cases=2, seed=4)
    after = split_labelled_cases(CASES, validation_cases=2, test_cases=3, seed=4)
    assert after.validation == before.validation and before.test == ()
    assert set(after.train_pool) | set(after.test) == set(before.train_pool)


def test_test_and_validation_volumes_leaving_no_training_volume_name_both_counts():
    with pytest.raises(UserInputError, match=r"data.validation_cases 2 \+ data.test_cases 2: 4 held-out volumes "
                                             r"leave none of the 4 labelled volumes"):
        split_labelled_cases(CASES[:4], validation_cases=2, test_cases=2, seed=0)
