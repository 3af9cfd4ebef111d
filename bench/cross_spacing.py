"""A model fine-tuned at one scanner's spacing, evaluated at another's: resampling vs resizing.

Two scanners image the built-in synthetic abdomen (patients differ; anatomy is drawn in mm):

    scan A: 64 x 64 px over a 360 mm field (5.625 mm), the training scanner
    scan B: 96 x 96 px over a 500 mm field (5.21 mm)

One model (random start, fine-tuned on A's labelled volumes) segments held-out volumes of A
and of B, with B's slices prepared two ways:

    resampled: to A's spacing, then centre-cropped to 64 px (lrc_ray since issue 17)
    resized:   each slice resized to 64 x 64 px (lrc_ray before), so B's organs are 1.39x
               smaller in pixels than A's

A's slices are the same either way (64 px at the working spacing), so one model serves both.
The reference is the same model on A's own volumes (trained and evaluated at one spacing).
Prints, per seed and as mean +- 95% CI over seeds, the mean Dice over all organs and over the
organs a 5.6 mm grid resolves (at least ~10 px across: liver, stomach, spleen, kidneys).

    .venv/bin/python bench/cross_spacing.py [--seeds 5] [--steps 400]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from scipy import stats
from skimage.transform import resize

from lrc_ray.config import FinetuneConfig, NetworkParams
from lrc_ray.data.phantom import ORGAN_LABELS, SyntheticCase, generate_case
from lrc_ray.data.slices import PreparedSlices, SliceParams, body_mask, prepare_slices, quantise_unit, window_to_unit
from lrc_ray.engine.finetune import build_segmentation_model, evaluate, finetune
from lrc_ray.superpixels.table import slices_table

SIZE = 64
FIELD_A_MM, SIZE_A = 360.0, 64
FIELD_B_MM, SIZE_B = 500.0, 96
RESOLVED_ORGANS = ("liver", "stomach", "spleen", "right_kidney", "left_kidney")
NETWORK = NetworkParams(features=(8, 8, 16, 32, 64, 8))


@dataclass(frozen=True)
class CrossSpacingDice:
    """Mean Dice (all organs, resolved organs) of one model on A, and on B resampled or resized."""

    same: tuple[float, float]
    resampled: tuple[float, float]
    resized: tuple[float, float]


def run_once(seed: int, *, steps: int = 400, train_cases: int = 4, validation_cases: int = 8,
             slices: int = 12) -> CrossSpacingDice:
    """Fine-tune on scan A (seeded patients and weights) and evaluate on A and on B both ways."""

    def patients(first: int, count: int, field_mm: float, size: int) -> list[SyntheticCase]:
        return [generate_case(np.random.default_rng([seed, first + index]), size=size, slices=slices,
                              field_of_view_mm=field_mm) for index in range(count)]

    working = SliceParams(size=SIZE, spacing_mm=FIELD_A_MM / SIZE_A)
    train = _table(patients(0, train_cases, FIELD_A_MM, SIZE_A), "train", lambda c: _resampled(c, working))
    validation_a = patients(1000, validation_cases, FIELD_A_MM, SIZE_A)
    validation_b = patients(1000, validation_cases, FIELD_B_MM, SIZE_B)

    torch.manual_seed(seed)
    model = build_segmentation_model(NETWORK, len(ORGAN_LABELS), None)
    config = FinetuneConfig(epochs=steps // 10, steps_per_epoch=10, batch_size=8, lr=1e-2, lr_schedule="poly")
    finetune(model, train, train_cases=tuple(f"train{i}" for i in range(train_cases)), config=config, seed=seed,
             progress=False)

    def dice(cases: list[SyntheticCase], prepare) -> tuple[float, float]:
        results = evaluate(model, _table(cases, "val", prepare), labels=ORGAN_LABELS,
                           cases=tuple(f"val{i}" for i in range(validation_cases)))
        resolved = np.mean([results["dice_per_organ"][name] for name in RESOLVED_ORGANS])
        return results["dice_mean"], float(resolved)

    return CrossSpacingDice(
        same=dice(validation_a, lambda c: _resampled(c, working)),
        resampled=dice(validation_b, lambda c: _resampled(c, working)),
        resized=dice(validation_b, lambda c: _resized(c, working)),
    )


def _table(cases: list[SyntheticCase], prefix: str, prepare) -> pa.Table:
    return pa.concat_tables([slices_table(f"{prefix}{index}", prepare(case)) for index, case in enumerate(cases)])


def _resampled(case: SyntheticCase, params: SliceParams) -> PreparedSlices:
    return prepare_slices(case.hu, case.labels, params, native_spacing_mm=case.spacing_mm[1:])


def _resized(case: SyntheticCase, params: SliceParams) -> PreparedSlices:
    """What lrc_ray did before resampling: window, mask, then resize every slice to size x size."""
    shape = (case.hu.shape[0], params.size, params.size)
    image01 = resize(window_to_unit(case.hu, params.window_hu), shape, order=1, anti_aliasing=True, preserve_range=True)
    mask = np.stack([body_mask(hu_slice) for hu_slice in case.hu])
    return PreparedSlices(
        image_u8=quantise_unit(image01),
        body_mask=resize(mask, shape, order=0, anti_aliasing=False).astype(bool),
        labels=resize(case.labels, shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.uint8),
        geometry=params.geometry(case.hu.shape[1:], case.spacing_mm[1:]),  # not used: evaluation is on slices
    )


def _mean_ci(values: list[float]) -> str:
    mean = float(np.mean(values))
    if len(values) < 2:
        return f"{mean:.3f}"
    half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
    return f"{mean:.3f} +- {half:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400, help="fine-tuning steps of batch 8")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    started = time.perf_counter()
    for seed in range(args.seeds):
        result = run_once(seed, steps=args.steps)
        rows.append(result)
        print(f"[{time.perf_counter() - started:5.0f} s] seed {seed}: A->A {result.same[0]:.3f}  "
              f"A->B resampled {result.resampled[0]:.3f}  A->B resized {result.resized[0]:.3f}  "
              f"(resolved organs {result.same[1]:.3f} / {result.resampled[1]:.3f} / {result.resized[1]:.3f})", flush=True)
    print(f"\nmean Dice over {args.seeds} seeds (mean +- 95% CI), {args.steps} fine-tuning steps")
    print(f"{'':>34}{'all organs':>18}{'resolved organs':>20}")
    for label, pick in (("A -> A (same spacing)", lambda r: r.same), ("A -> B resampled", lambda r: r.resampled),
                        ("A -> B resized", lambda r: r.resized)):
        print(f"{label:>34}" + "".join(f"{_mean_ci([pick(r)[k] for r in rows]):>19}" for k in (0, 1)))
    for label, pick in (("loss A->B resampled", lambda r: r.resampled), ("loss A->B resized", lambda r: r.resized)):
        print(f"{label:>34}" + "".join(f"{_mean_ci([r.same[k] - pick(r)[k] for r in rows]):>19}" for k in (0, 1)))


if __name__ == "__main__":
    main()
