"""Which labelled volumes validate, which test, and which a label fraction trains on
(LRC_METHOD.md section 8).

Splits are per volume, never per slice, so no slice of a held-out volume is ever seen in
training, and seeded, so every method and trial of a sweep sees the same volumes. Validation
volumes serve the probe, early stopping, the search and the choice; test volumes serve only
the final report of the finalists, so the reported number of a chosen setting is not the one
it was chosen by. Label fraction subsets are nested: the volumes of fraction 0.2 are among
those of fraction 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrc_ray.errors import UserInputError


SPLIT_PARTS = ("validation", "test")  # the held-out parts a fine-tuned model is scored on


@dataclass(frozen=True)
class CaseSplit:
    train_pool: tuple[str, ...]  # labelled volumes that fine-tuning may use
    validation: tuple[str, ...]  # held out: probe, early stopping, search and choice
    test: tuple[str, ...] = ()  # held out from everything but the finalists' report

    def part(self, name: str) -> tuple[str, ...]:
        """The volumes of a held-out part, by name (one of `SPLIT_PARTS`)."""
        if name not in SPLIT_PARTS:
            raise ValueError(f"split part {name!r}: expected one of {', '.join(SPLIT_PARTS)}")
        return getattr(self, name)


def split_labelled_cases(case_ids: list[str], *, validation_cases: int, seed: int, test_cases: int = 0) -> CaseSplit:
    """Hold out `validation_cases`, then `test_cases` labelled volumes, by one seeded permutation.

    The validation volumes are the first of the permutation whatever `test_cases` is, so adding
    test volumes leaves the validation split of earlier runs unchanged.

    Raises:
        UserInputError: when the held-out volumes leave none to fine-tune on (names both counts).
    """
    ordered = sorted(case_ids)
    held_out = validation_cases + test_cases
    if len(ordered) <= held_out:
        counts = f"data.validation_cases {validation_cases} + data.test_cases {test_cases}"
        raise UserInputError(
            f"{counts}: {held_out} held-out volumes leave none of the {len(ordered)} labelled volumes for "
            "fine-tuning; lower them or add labelled data"
        )
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    shuffled = [ordered[i] for i in permutation]
    return CaseSplit(train_pool=tuple(sorted(shuffled[held_out:])), validation=tuple(sorted(shuffled[:validation_cases])),
                     test=tuple(sorted(shuffled[validation_cases:held_out])))


def label_fraction_subset(train_pool: tuple[str, ...], fraction: float, *, seed: int) -> tuple[str, ...]:
    """round(fraction * N) volumes of the pool, at least one; nested across fractions."""
    if not 0 < fraction <= 1:
        raise UserInputError(f"label fraction: expected a value in (0, 1], got {fraction!r}")
    count = max(1, int(round(fraction * len(train_pool))))
    permutation = np.random.default_rng(seed).permutation(len(train_pool))
    return tuple(sorted(train_pool[i] for i in permutation[:count]))


@dataclass(frozen=True)
class ProbeSource:
    """Where the probe's slices are: a cache entry's Parquet directory and the volumes to use."""

    parquet_dir: str
    train_case: str
    validation_cases: tuple[str, ...]
    num_classes: int
