"""Which labelled volumes validate, and which a label fraction trains on (LRC_METHOD.md section 8).

Splits are per volume, never per slice, so no slice of a validation volume is ever seen in
training, and seeded, so every method and trial of a sweep sees the same volumes. Label
fraction subsets are nested: the volumes of fraction 0.2 are among those of fraction 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrc_ray.errors import UserInputError


@dataclass(frozen=True)
class CaseSplit:
    train_pool: tuple[str, ...]  # labelled volumes that fine-tuning may use
    validation: tuple[str, ...]  # held-out labelled volumes


def split_labelled_cases(case_ids: list[str], *, validation_cases: int, seed: int) -> CaseSplit:
    """Hold out `validation_cases` labelled volumes, chosen by a seeded permutation."""
    ordered = sorted(case_ids)
    if len(ordered) <= validation_cases:
        raise UserInputError(
            f"data.validation_cases: {validation_cases} held-out volumes leave none of the "
            f"{len(ordered)} labelled volumes for fine-tuning; lower it or add labelled data"
        )
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    shuffled = [ordered[i] for i in permutation]
    return CaseSplit(train_pool=tuple(sorted(shuffled[validation_cases:])), validation=tuple(sorted(shuffled[:validation_cases])))


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
