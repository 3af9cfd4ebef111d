"""Does LRC help at low label budgets? scratch vs global vs lrc vs global+lrc on the built-in data.

For each seed, each pre-training method is trained once and fine-tuned at two label
fractions: the lowest one (a single training volume) and a middle one. Every fine-tuning gets
the same number of optimiser steps (`finetune.steps_per_epoch` batches drawn at random per
epoch), so a smaller label fraction trains as long as a larger one and "fewer labels" is not
confounded with "fewer steps". Prints mean +- std of the validation mean Dice over seeds, and
each method's paired difference to scratch (same seeds, same fraction) with its 95% t-interval.
Sized for ~30 minutes on 2 quiet CPU cores; the budget flags make it longer (and more telling)
on bigger machines.

    .venv/bin/python bench/lrc_evidence.py [--seeds 3] [--pretrain-epochs 5] [--finetune-epochs 40] [--head-epochs 20]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import stats

from lrc_ray import api
from lrc_ray.config import NORMS, NetworkParams, RunConfig
from lrc_ray.engine.checkpoint import load_checkpoint

METHODS = ("scratch", "global", "lrc", "global+lrc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cases", type=int, default=8, help="labelled volumes (2 validate)")
    parser.add_argument("--unlabeled", type=int, default=8, help="unlabelled volumes (pre-training only)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=40)
    parser.add_argument("--middle-fraction", type=float, default=0.5)
    parser.add_argument("--pretrain-lr", type=float, default=None, help="pretrain.lr (the global branch comes apart at "
                        "3e-5 after about 25 epochs, not at the default: docs/benchmarks.md, 2026-11-30 late)")
    parser.add_argument("--flip-prob", type=float, default=None, help="augment.flip_prob for pre-training views")
    parser.add_argument("--backbone-lr-scale", type=float, default=1.0, help="finetune.backbone_lr_scale")
    parser.add_argument("--head-epochs", type=int, default=20,
                        help="finetune.head_epochs: head-only epochs on the frozen backbone before full fine-tuning")
    parser.add_argument("--steps-per-epoch", type=int, default=8,
                        help="finetune.steps_per_epoch for every fraction (8: one pass over fraction 0.5's slices)")
    parser.add_argument("--norm", default=NetworkParams().norm, choices=NORMS, help="network.norm")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lrc_evidence_"))
    data_dir = workdir / "data"
    if not (data_dir / "dataset.json").is_file():
        api.make_synthetic_data(out=data_dir, cases=args.cases, unlabeled=args.unlabeled, size=args.size,
                                slices=args.slices, seed=0)
    base = RunConfig().replace(
        data={"data_dir": str(data_dir), "cache_root": str(workdir / "cache"), "size": args.size, "validation_cases": 2},
        network={"norm": args.norm},
        pretrain={"epochs": args.pretrain_epochs, "batch_size": 16, "queue_size": 256},
        finetune={"epochs": args.finetune_epochs, "batch_size": 8, "backbone_lr_scale": args.backbone_lr_scale,
                  "head_epochs": args.head_epochs, "steps_per_epoch": args.steps_per_epoch},
    )
    if args.flip_prob is not None:
        base = base.replace(augment={"flip_prob": args.flip_prob})
    if args.pretrain_lr is not None:
        base = base.replace(pretrain={"lr": args.pretrain_lr})
    methods = [m for m in args.methods.split(",") if m]
    api.build_superpixels(data=data_dir, cache_root=base.data.cache_root, scale=base.data.scale, sigma=base.data.sigma,
                          min_size=base.data.min_size, size=base.data.size)
    lowest = 1 / (args.cases - base.data.validation_cases)  # one training volume
    fractions = (lowest, args.middle_fraction)

    dice: dict[tuple[str, float], list[float]] = {}
    started = time.perf_counter()
    for seed in range(args.seeds):
        for method in methods:
            config = base.replace(seed=seed, pretrain={"method": method})
            checkpoint = None
            if method != "scratch":
                checkpoint = api.pretrain(config=config, out_dir=workdir / f"{method}-seed{seed}", progress=False)
                last_epoch = load_checkpoint(checkpoint)["history"][-1]
                if "global_top1" in last_epoch:  # has the global branch come apart? (chance: 1 / batch)
                    print(f"seed {seed} {method}: global_top1 {last_epoch['global_top1']:.3f} at the last epoch", flush=True)
            for fraction in fractions:
                results = api.finetune(config=config.replace(finetune={"label_fraction": fraction}),
                                       checkpoint=checkpoint, progress=False)
                dice.setdefault((method, fraction), []).append(results["dice_mean"])
                print(f"[{time.perf_counter() - started:6.0f} s] seed {seed} {method:>10} fraction {fraction:.3f}: "
                      f"mean Dice {results['dice_mean']:.3f}", flush=True)

    print(f"\nmean validation Dice over {args.seeds} seeds (mean +- std), {args.size}x{args.size}, "
          f"pre-train {args.pretrain_epochs} epochs, fine-tune {args.finetune_epochs} epochs "
          f"(+{args.head_epochs} head-only) of {args.steps_per_epoch} steps at every fraction, batch "
          f"{base.finetune.batch_size}, network.norm {args.norm}, flip_prob {base.augment.flip_prob}, "
          f"backbone_lr_scale {args.backbone_lr_scale}, pretrain.lr {base.pretrain.lr}")
    print(f"{'method':>12}" + "".join(f"{f'fraction {f:.2f}':>20}" for f in fractions))
    for method in methods:
        cells = [dice[(method, fraction)] for fraction in fractions]
        print(f"{method:>12}" + "".join(f"{np.mean(c):>13.3f} +- {np.std(c, ddof=1) if len(c) > 1 else 0:.3f}"
                                        for c in cells))
    if "scratch" in methods and args.seeds > 1:
        print(f"\npaired difference to scratch (same seeds), mean [95% t-interval over {args.seeds} seeds]")
        print(f"{'method':>12}" + "".join(f"{f'fraction {f:.2f}':>26}" for f in fractions))
        for method in (m for m in methods if m != "scratch"):
            cells = [paired_difference(dice[(method, f)], dice[("scratch", f)]) for f in fractions]
            print(f"{method:>12}" + "".join(f"{mean:>+10.3f} [{low:+.3f}, {high:+.3f}]" for mean, low, high in cells))
    print(f"total {time.perf_counter() - started:.0f} s; data and checkpoints in {workdir}")


def paired_difference(values: list[float], baseline: list[float]) -> tuple[float, float, float]:
    """Mean of the per-seed differences and its 95% t-interval (n - 1 degrees of freedom)."""
    differences = np.asarray(values) - np.asarray(baseline)
    mean = float(differences.mean())
    half_width = float(stats.t.ppf(0.975, len(differences) - 1) * stats.sem(differences))
    return mean, mean - half_width, mean + half_width


if __name__ == "__main__":
    main()
