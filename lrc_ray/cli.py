"""`lrc-ray` command line: each subcommand parses its arguments and calls one API function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lrc_ray import __version__, api
from lrc_ray.data.slices import DEFAULT_WINDOW_HU
from lrc_ray.config import RunConfig, load_config
from lrc_ray.errors import TrainingError, UserInputError
from lrc_ray.superpixels.felzenszwalb import FelzenszwalbParams

DEFAULT_WORKDIR = Path(".lrc_ray")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except UserInputError as exc:
        print(f"lrc-ray: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"lrc-ray: training stopped: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("lrc-ray: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrc-ray", description="Localized Region Contrast pre-training and search on Ray.")
    parser.add_argument("--version", action="version", version=f"lrc_ray {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="data set tools").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser(
        "synth",
        help="write the built-in synthetic abdominal CT data set (MSD layout)",
        description="Write synthetic abdominal CT volumes with organ labels in Medical Segmentation "
        "Decathlon layout: imagesTr/, labelsTr/, imagesUnlabeled/ and dataset.json.",
    )
    synth.add_argument("--out", required=True, type=Path, help="new or empty directory to write")
    synth.add_argument("--cases", type=int, default=6, help="labelled volumes (default 6; BTCV has 30)")
    synth.add_argument("--unlabeled", type=int, default=4, help="unlabelled pre-training volumes (default 4)")
    synth.add_argument("--size", type=int, default=96, help="in-plane pixels (default 96; 256-512 looks like real CT)")
    synth.add_argument("--slices", type=int, default=24, help="axial slices per volume (default 24)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; equal seeds give equal data")
    synth.set_defaults(handler=_run_synth)

    superpixels = commands.add_parser(
        "superpixels",
        help="extract Felzenszwalb super-pixels of every slice into the Parquet cache (Ray Data)",
        description="Extract super-pixels of every axial slice with Ray Data and cache them as Parquet under "
        "a key of the data's content and the parameters; an equal second call is a cache hit.",
    )
    superpixels.add_argument("--data", required=True, type=Path, help="data set directory with dataset.json")
    superpixels.add_argument("--out", required=True, type=Path, help="cache root directory (created if new)")
    _add_superpixel_options(superpixels)
    superpixels.add_argument("--workers", type=int, default=None, help="parallel tasks (default: all CPUs of the Ray cluster)")
    superpixels.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    superpixels.add_argument("--overwrite", action="store_true", help="rebuild the entry even if it exists")
    superpixels.set_defaults(handler=_run_superpixels)

    pretrain = commands.add_parser(
        "pretrain",
        help="pre-train a network with one LRC method on cached super-pixels",
        description="Pre-train with scratch, global (MoCo v2), lrc or global+lrc on the super-pixel cache of the "
        "config's data (make it first with `lrc-ray superpixels`). Writes checkpoint.pt and config.yaml.",
    )
    _add_run_config_options(pretrain)
    pretrain.add_argument("--out", type=Path, default=DEFAULT_WORKDIR / "pretrain", help="output directory")
    pretrain.set_defaults(handler=_run_pretrain)

    finetune = commands.add_parser(
        "finetune",
        help="fine-tune at a label fraction and report per-organ 3D Dice",
        description="Fine-tune a segmentation head (and the pre-trained encoder-decoder, when a checkpoint is given) "
        "on a seeded per-volume subset of the labelled training volumes; evaluate 3D Dice on held-out volumes.",
    )
    _add_run_config_options(finetune)
    finetune.add_argument("--checkpoint", type=Path, default=None, help="pre-trained checkpoint.pt (default: random init)")
    finetune.add_argument("--label-fraction", type=float, required=True, help="fraction of labelled training volumes used, in (0, 1]")
    finetune.add_argument("--out", type=Path, default=DEFAULT_WORKDIR / "finetune", help="where results.json goes")
    finetune.set_defaults(handler=_run_finetune)

    demo = commands.add_parser("demo", help="the quick start on the built-in data")
    demo.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"where data and caches go (default {DEFAULT_WORKDIR})")
    demo.set_defaults(handler=_run_demo)
    return parser


def _add_run_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="run config YAML (default: built-in defaults)")
    parser.add_argument("--data", type=Path, default=None, help="data set directory (overrides data.data_dir)")


def _add_superpixel_options(parser: argparse.ArgumentParser) -> None:
    defaults = FelzenszwalbParams()
    parser.add_argument("--scale", type=float, default=defaults.scale, help=f"Felzenszwalb scale, larger = bigger regions (default {defaults.scale:g}; useful 25-1000)")
    parser.add_argument("--sigma", type=float, default=defaults.sigma, help=f"Gaussian pre-smoothing in pixels (default {defaults.sigma:g}; useful 0.3-2)")
    parser.add_argument("--min-size", type=int, default=defaults.min_size, help=f"smallest region in pixels (default {defaults.min_size}; useful 5-200)")
    parser.add_argument("--window", type=float, nargs=2, default=DEFAULT_WINDOW_HU, metavar=("LOW", "HIGH"), help="HU window (default -175 250, abdomen)")
    parser.add_argument("--size", type=int, default=None, help="resize slices to SIZE x SIZE (default: keep the volume's size)")


def _run_synth(args: argparse.Namespace) -> int:
    out = api.make_synthetic_data(out=args.out, cases=args.cases, unlabeled=args.unlabeled, size=args.size, slices=args.slices, seed=args.seed)
    print(f"wrote {args.cases} labelled + {args.unlabeled} unlabelled volumes to {out}")
    return 0


def _run_superpixels(args: argparse.Namespace) -> int:
    result = api.build_superpixels(
        data=args.data, cache_root=args.out, scale=args.scale, sigma=args.sigma, min_size=args.min_size,
        window_hu=tuple(args.window), size=args.size, workers=args.workers, overwrite=args.overwrite, address=args.address,
    )
    _print_entry(result)
    return 0


def _load_run_config(args: argparse.Namespace, **overrides: dict) -> RunConfig:
    config = load_config(args.config) if args.config is not None else RunConfig()
    if args.data is not None:
        overrides.setdefault("data", {})["data_dir"] = str(args.data)
    return config.replace(**overrides) if overrides else config


def _run_pretrain(args: argparse.Namespace) -> int:
    config = _load_run_config(args)
    checkpoint = api.pretrain(config=config, out_dir=args.out)
    print(f"checkpoint: {checkpoint}")
    return 0


def _run_finetune(args: argparse.Namespace) -> int:
    config = _load_run_config(args, finetune={"label_fraction": args.label_fraction})
    results = api.finetune(config=config, checkpoint=args.checkpoint, out_dir=args.out)
    summary = {key: results[key] for key in ("label_fraction", "dice_mean", "dice_per_organ", "train_cases", "validation_cases")}
    print(json.dumps(summary, indent=2))
    print(f"results: {args.out / 'results.json'}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    data = RunConfig().data
    data_dir = args.workdir / "data" / "synthetic_abdomen"
    if not (data_dir / "dataset.json").is_file():
        api.make_synthetic_data(out=data_dir, cases=6, unlabeled=4, size=data.size, slices=24, seed=0)
        print(f"wrote the synthetic data set to {data_dir}")
    result = api.build_superpixels(
        data=data_dir, cache_root=args.workdir / "superpixels", scale=data.scale, sigma=data.sigma,
        min_size=data.min_size, window_hu=data.window_hu, size=data.size,
    )
    _print_entry(result)
    return 0


def _print_entry(result: api.SuperpixelResult) -> None:
    summary = api.describe_entry(result.entry)
    print(("cache hit: " if result.cache_hit else "built: ") + summary.pop("path"))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
