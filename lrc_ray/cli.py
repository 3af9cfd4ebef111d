"""`lrc-ray` command line: each subcommand parses its arguments and calls one API function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lrc_ray import __version__, api
from lrc_ray.data.slices import DEFAULT_WINDOW_HU
from lrc_ray.errors import UserInputError
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

    demo = commands.add_parser("demo", help="the quick start on the built-in data")
    demo.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"where data and caches go (default {DEFAULT_WORKDIR})")
    demo.set_defaults(handler=_run_demo)
    return parser


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


def _run_demo(args: argparse.Namespace) -> int:
    data_dir = args.workdir / "data" / "synthetic_abdomen"
    if not (data_dir / "dataset.json").is_file():
        api.make_synthetic_data(out=data_dir, cases=6, unlabeled=4, size=96, slices=24, seed=0)
        print(f"wrote the synthetic data set to {data_dir}")
    result = api.build_superpixels(data=data_dir, cache_root=args.workdir / "superpixels")
    _print_entry(result)
    return 0


def _print_entry(result: api.SuperpixelResult) -> None:
    summary = api.describe_entry(result.entry)
    print(("cache hit: " if result.cache_hit else "built: ") + summary.pop("path"))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
