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
CLUSTER_WORKDIR = DEFAULT_WORKDIR / "cluster"  # the local head's, unless --workdir says otherwise
ADDRESS_HELP = "the Ray cluster's GCS address host:port (default: RAY_ADDRESS, else a local Ray)"
URI_HELP = ("a path or a URI: s3://BUCKET/PREFIX (endpoint from ?endpoint_override=HOST:PORT&scheme=http or AWS_ENDPOINT_URL), gs://..., file://...")


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
    synth.add_argument("--field-of-view", type=float, default=None, metavar="MM",
                       help="the scanner's field in mm, so the spacing is MM / SIZE (default: fitted to each patient, "
                            "358-512 mm); anatomy is drawn in mm, so organs keep their size in mm at any field")
    synth.set_defaults(handler=_run_synth)

    superpixels = commands.add_parser(
        "superpixels",
        help="extract Felzenszwalb super-pixels of every slice into the Parquet cache (Ray Data)",
        description="Extract super-pixels of every axial slice with Ray Data and cache them as Parquet under "
        "a key of the data's content and the parameters; an equal second call is a cache hit.",
    )
    superpixels.add_argument("--data", type=Path, default=None,
                             help="data set directory with dataset.json (MSD or nnU-Net v2 layout); or give --datalist")
    _add_datalist_options(superpixels)
    superpixels.add_argument("--out", required=True, help="cache root (created if new): " + URI_HELP)
    _add_superpixel_options(superpixels)
    superpixels.add_argument("--workers", type=int, default=None, help="parallel tasks (default: all CPUs of the Ray cluster)")
    superpixels.add_argument("--address", default=None, help=ADDRESS_HELP)
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
    pretrain.add_argument("--workers", type=int, default=0,
                          help="Ray Train data-parallel workers; 0 (default) runs in this process without Ray")
    pretrain.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL, bfloat16 autocast)")
    pretrain.add_argument("--name", default="ray_train",
                          help="Ray Train run name under --out; a rerun with the same name resumes (default ray_train)")
    pretrain.add_argument("--address", default=None, help=ADDRESS_HELP)
    pretrain.set_defaults(handler=_run_pretrain)

    finetune = commands.add_parser(
        "finetune",
        help="fine-tune at a label fraction and report per-organ 3D Dice",
        description="Fine-tune a segmentation head (and the pre-trained encoder-decoder, when a checkpoint is given) "
        "on a seeded per-volume subset of the labelled training volumes; evaluate 3D Dice on held-out volumes.",
    )
    _add_run_config_options(finetune)
    finetune.add_argument("--checkpoint", default=None, help="pre-trained checkpoint.pt, a path or URI (default: random init)")
    finetune.add_argument("--label-fraction", type=float, required=True, help="fraction of labelled training volumes used, in (0, 1]")
    finetune.add_argument("--out", type=Path, default=DEFAULT_WORKDIR / "finetune", help="where results.json goes")
    finetune.set_defaults(handler=_run_finetune)

    export = commands.add_parser(
        "export",
        help="write a pre-trained encoder-decoder as a plain MONAI BasicUNet (state_dict + YAML)",
        description="Write the encoder-decoder of a `lrc-ray pretrain` checkpoint as DIR/basic_unet.pt, a state_dict "
        "that monai.networks.nets.BasicUNet(**constructor) loads with strict=True, and DIR/basic_unet.yaml with the "
        "constructor arguments and the preprocessing (orientation, spacing, size, HU window). final_conv is the "
        "identity, so the network outputs the pre-trained decoder features; replace it for a task.",
    )
    export.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.pt written by `lrc-ray pretrain`")
    export.add_argument("--out", required=True, type=Path, help="directory to write basic_unet.pt and basic_unet.yaml")
    export.set_defaults(handler=_run_export)

    predict = commands.add_parser(
        "predict",
        help="segment CT scans with a fine-tuned model: OUT/<case>.nii.gz on each scan's own grid",
        description="Segment scans with a model written by `lrc-ray finetune` (or a sweep's finetuned/<key>/model.pt): "
        "slices are prepared as in training (HU window, resampled to the model's spacing, cropped or padded), "
        "predicted, and put back on the scan's grid. Writes OUT/<case>.nii.gz (uint8 labels, the scan's shape and "
        f"affine) and OUT/labels.json (label value -> organ name). From {api.RAY_DATA_MIN_SCANS} scans on, or with "
        "--address, scans are segmented with Ray Data, one model per CPU or GPU.",
    )
    predict.add_argument("--model", required=True, type=Path, help="model.pt written by `lrc-ray finetune --out DIR`")
    predict.add_argument("--data", type=Path, default=None, help="a data set directory with dataset.json: every volume in it (or give --images)")
    predict.add_argument("--images", type=Path, nargs="+", default=None, metavar="IMAGE",
                       help="NIfTI scans (.nii.gz or .nii), e.g. A.nii.gz B.nii.gz")
    predict.add_argument("--out", required=True, type=Path, help="directory for <case>.nii.gz and labels.json (created if new)")
    predict.add_argument("--address", default=None, help="Ray cluster address: segment there with Ray Data")
    predict.set_defaults(handler=_run_predict)

    sweep = commands.add_parser(
        "tune",
        help="search hyper-parameters with Ray Tune (Optuna TPE + ASHA) from a search-space YAML",
        description="Run a sweep: each trial gets or builds its super-pixel cache, pre-trains with Ray Train "
        "(reporting a probe Dice every epoch, for ASHA), fine-tunes at its label fraction and reports per-organ "
        "Dice on the validation volumes; each label fraction is searched on its own. With a `finalists:` section "
        "the top settings and scratch are then re-run at fresh seeds and scored on test volumes. Ends by printing "
        "the results table, the finalists table and the chosen configuration.",
    )
    sweep.add_argument("space", type=Path, help="search space YAML (see search_spaces/)")
    sweep.add_argument("--data", type=Path, default=None,
                       help="MSD or nnU-Net v2 layout data set (default: the space's built-in synthetic data)")
    _add_datalist_options(sweep)
    sweep.add_argument("--storage", default=None,
                       help=f"where sweeps are kept (default {DEFAULT_WORKDIR / 'sweeps'}; on a cluster, storage every "
                       "node reaches): " + URI_HELP)
    sweep.add_argument("--cache-root", default=None,
                       help="where the super-pixel cache is, instead of the space's base data.cache_root; on a "
                            "cluster, storage every node reaches: " + URI_HELP)
    sweep.add_argument("--name", default=None, help="sweep name (default: the space file's name)")
    sweep.add_argument("--samples", type=int, default=None, help="number of trials (default: the space's sweep.num_samples)")
    sweep.add_argument("--search", choices=("tpe", "grid"), default="tpe",
                       help="tpe (default): Optuna TPE + ASHA early stopping; grid: every point of a space of choices, no early stopping")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep, keeping finished trials")
    sweep.add_argument("--optuna-storage", default=None, metavar="URL",
                       help="where the TPE searcher keeps its Optuna studies, for `optuna-dashboard URL` and "
                            "optuna.load_study: a database URL (postgresql://..., mysql://..., sqlite:///...) or a "
                            "journal file's path (default: STORAGE/NAME/optuna_journal.log)")
    sweep.add_argument("--address", default=None, help=ADDRESS_HELP)
    sweep.set_defaults(handler=_run_tune)

    finalists = commands.add_parser(
        "finalists",
        help="re-run a sweep's top settings and scratch at fresh seeds, scored on test volumes",
        description="For each label fraction of a sweep: its top K distinct settings by validation Dice, and scratch, "
        "re-run at N seeds no search trial used, as Tune trials (a rerun continues where a killed one stopped). "
        "One search trial is one draw (the same setting moves by ~0.02 Dice between seeds), so the choice is made by "
        "the finalists' mean validation Dice and reported with its test Dice and a 95% interval. Ends by printing "
        "the finalists table.",
    )
    finalists.add_argument("experiment", help="the sweep directory (STORAGE/NAME; a path or URI)")
    finalists.add_argument("--top", type=int, default=None,
                           help="settings per label fraction (default: the space's finalists.top, else 2; 2-5 is useful)")
    finalists.add_argument("--seeds", type=int, default=None,
                           help="fresh seeds per setting (default: the space's finalists.seeds, else 3; the interval "
                           "narrows with more: 3 gives a t factor of 4.3, 5 of 2.8)")
    finalists.add_argument("--address", default=None, help=ADDRESS_HELP)
    finalists.set_defaults(handler=_run_finalists)

    results = commands.add_parser(
        "results",
        help="tables, chosen configs and plots of a sweep",
        description="Read a sweep with Ray Tune's API; print a sorted table and, when it has finalists, the finalists "
        "table (mean and 95% interval over seeds on validation and test, the paired gain over scratch); write "
        "results.parquet, results.csv, results.md, finalists.csv, finalists.md, the chosen config per group (a file "
        "`lrc-ray pretrain --config` takes, its numbers in a .json beside it) and PNG plots.",
    )
    results.add_argument("experiment", help="the sweep directory (STORAGE/NAME; a path or URI)")
    results.add_argument("--metric", default=None, help="column to rank by (default: the sweep's metric)")
    results.add_argument("--by", default="label_fraction", help="pick the best setting per value of this column (default label_fraction)")
    results.add_argument("--top", type=int, default=20, help="rows to print (default 20)")
    results.add_argument("--out", default=None, help="where files go (default EXPERIMENT/results; a path or URI)")
    results.set_defaults(handler=_run_results)

    cluster = commands.add_parser("cluster", help="a local Ray head for `ray job submit`").add_subparsers(
        dest="cluster_command", required=True)
    up = cluster.add_parser(
        "up", help="start a Ray head on 127.0.0.1 (dashboard + job server, token authentication on)",
        description="Start a Ray head bound to 127.0.0.1 with its own auth token and temp dir under --workdir; "
        "writes WORKDIR/env.sh with RAY_ADDRESS (the GCS, for lrc-ray), RAY_API_SERVER_ADDRESS (the job server, for `ray job`), "
        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH: source it, then run either.",
    )
    up.add_argument("--workdir", type=Path, default=CLUSTER_WORKDIR, help=f"state, token and logs (default {CLUSTER_WORKDIR})")
    up.add_argument("--num-cpus", type=int, default=None, help="CPUs the head offers (default: all)")
    up.add_argument("--port", type=int, default=6379, help="GCS port (default 6379)")
    up.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and job server port (default 8265)")
    up.set_defaults(handler=_run_cluster_up)
    submit = cluster.add_parser(
        "submit", help="`ray job submit` a command to the local head (token and runtime_env included)",
        description="Submit the command after -- as a Ray job to the head `lrc-ray cluster up` started, with its "
        "token and cluster/runtime_env.yaml, the checkout as working dir; waits and streams the logs.",
    )
    submit.add_argument("--workdir", type=Path, default=CLUSTER_WORKDIR, help=f"as given to `up` (default {CLUSTER_WORKDIR})")
    submit.add_argument("--no-wait", action="store_true", help="return once the job is accepted")
    submit.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the command, e.g. -- lrc-ray tune search_spaces/quickstart.yaml")
    submit.set_defaults(handler=_run_cluster_submit)
    down = cluster.add_parser("down", help="stop the head that `lrc-ray cluster up` started (only that one)")
    down.add_argument("--workdir", type=Path, default=CLUSTER_WORKDIR, help=f"as given to `up` (default {CLUSTER_WORKDIR})")
    down.set_defaults(handler=_run_cluster_down)

    demo = commands.add_parser(
        "demo", help="the quick start: a small sweep on the built-in data, its finalists, then its results")
    demo.add_argument("--storage", type=Path, default=None, help=f"where the sweep goes (default {DEFAULT_WORKDIR / 'sweeps'})")
    demo.set_defaults(handler=_run_demo)
    return parser


def _add_run_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="run config YAML (default: built-in defaults)")
    parser.add_argument("--data", type=Path, default=None, help="data set directory (overrides data.data_dir)")
    _add_datalist_options(parser)


def _add_datalist_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datalist", type=Path, default=None,
                        help="a MONAI datalist JSON (e.g. BTCV's dataset_0.json) instead of --data; relative paths "
                             "in it are relative to its own directory")
    parser.add_argument("--key", default="training", help="the datalist's list of volumes to use (default training)")


def _add_superpixel_options(parser: argparse.ArgumentParser) -> None:
    defaults = FelzenszwalbParams()
    parser.add_argument("--scale", type=float, default=defaults.scale, help=f"Felzenszwalb scale, larger = bigger regions (default {defaults.scale:g}; useful 25-1000)")
    parser.add_argument("--sigma", type=float, default=defaults.sigma, help=f"Gaussian pre-smoothing in pixels (default {defaults.sigma:g}; useful 0.3-2)")
    parser.add_argument("--min-size", type=int, default=defaults.min_size, help=f"smallest region in pixels (default {defaults.min_size}; useful 5-200)")
    parser.add_argument("--window", type=float, nargs=2, default=DEFAULT_WINDOW_HU, metavar=("LOW", "HIGH"), help="HU window (default -175 250, abdomen)")
    parser.add_argument("--size", type=int, default=None,
                        help="crop or pad the resampled slices to SIZE x SIZE (default: keep the resampled size)")
    parser.add_argument("--spacing", type=float, default=None, metavar="MM",
                        help="resample slices to MM per pixel first (default with --size: 400 mm / SIZE, an abdomen's "
                             "field; without: each scan's own grid)")


def _run_synth(args: argparse.Namespace) -> int:
    out = api.make_synthetic_data(out=args.out, cases=args.cases, unlabeled=args.unlabeled, size=args.size,
                                  slices=args.slices, seed=args.seed, field_of_view_mm=args.field_of_view)
    print(f"wrote {args.cases} labelled + {args.unlabeled} unlabelled volumes to {out}")
    return 0


def _run_superpixels(args: argparse.Namespace) -> int:
    result = api.build_superpixels(
        data=args.data, cache_root=args.out, scale=args.scale, sigma=args.sigma, min_size=args.min_size,
        window_hu=tuple(args.window), size=args.size, spacing_mm=args.spacing, workers=args.workers,
        overwrite=args.overwrite, address=args.address, datalist=args.datalist, key=args.key,
    )
    _print_entry(result)
    return 0


def _load_run_config(args: argparse.Namespace, **overrides: dict) -> RunConfig:
    config = load_config(args.config) if args.config is not None else RunConfig()
    if args.data is not None and args.datalist is not None:
        raise UserInputError("--data or --datalist: expected one data set, got both")
    if args.data is not None:
        overrides.setdefault("data", {})["data_dir"] = str(args.data)
    if args.datalist is not None:
        overrides.setdefault("data", {}).update(datalist=str(args.datalist), datalist_key=args.key)
    return config.replace(**overrides) if overrides else config


def _run_pretrain(args: argparse.Namespace) -> int:
    config = _load_run_config(args)
    checkpoint = api.pretrain(config=config, out_dir=args.out, workers=args.workers, use_gpu=args.gpu, name=args.name,
                              address=args.address)
    print(f"checkpoint: {checkpoint}")
    return 0


def _run_finetune(args: argparse.Namespace) -> int:
    config = _load_run_config(args, finetune={"label_fraction": args.label_fraction})
    results = api.finetune(config=config, checkpoint=args.checkpoint, out_dir=args.out)
    summary = {key: results[key] for key in ("label_fraction", "dice_mean", "dice_per_organ", "train_cases", "validation_cases")}
    print(json.dumps(summary, indent=2))
    print(f"results: {args.out / 'results.json'}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    written = api.export(checkpoint=args.checkpoint, out=args.out)
    print(f"weights: {written['weights']}\nconstructor and preprocessing: {written['spec']}")
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    written = api.predict(model=args.model, data=args.data, images=args.images, out=args.out, address=args.address,
                          progress=not args.quiet)
    print(f"{len(written)} segmentation(s) in {args.out} (names: {args.out / 'labels.json'})")
    return 0


def _run_tune(args: argparse.Namespace) -> int:
    experiment = api.tune(space=args.space, data=args.data, storage=args.storage, name=args.name,
                          num_samples=args.samples, resume=args.resume, address=args.address, search=args.search,
                          datalist=args.datalist, key=args.key, optuna_storage=args.optuna_storage,
                          cache_root=args.cache_root)
    print(f"sweep: {experiment}")
    return _print_results(api.results(experiment=experiment), top=20)


def _run_finalists(args: argparse.Namespace) -> int:
    experiment = api.finalists(experiment=args.experiment, top=args.top, seeds=args.seeds, address=args.address)
    return _print_results(api.results(experiment=experiment), top=20)


def _run_results(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise UserInputError(f"--top: expected at least 1, got {args.top}")
    return _print_results(api.results(experiment=args.experiment, metric=args.metric, by=args.by, out=args.out),
                          top=args.top)


def _run_cluster_up(args: argparse.Namespace) -> int:
    from lrc_ray.distributed.cluster import local_up

    head = local_up(args.workdir, num_cpus=args.num_cpus, port=args.port, dashboard_port=args.dashboard_port)
    # The commands below name this head's workdir unless it is the default one.
    workdir = "" if args.workdir == CLUSTER_WORKDIR else f" --workdir {args.workdir}"
    print(f"Ray head running (pid {head.pid}); dashboard and job server at {head.dashboard_url}")
    print(f"for `ray job ...` commands and lrc-ray runs on this head: source {head.env_file}")
    print(f"submit a sweep: lrc-ray cluster submit{workdir} -- lrc-ray tune search_spaces/quickstart.yaml "
          "--storage $PWD/.lrc_ray/sweeps --name quickstart")
    print(f"  (the same as: source {head.env_file} && ray job submit --runtime-env cluster/runtime_env.yaml "
          "--working-dir . -- lrc-ray tune ...)")
    print(f"stop it: lrc-ray cluster down{workdir}")
    return 0


def _run_cluster_submit(args: argparse.Namespace) -> int:
    from lrc_ray.distributed.cluster import submit

    entrypoint = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    return submit(args.workdir, entrypoint, project=Path(__file__).resolve().parents[1], wait=not args.no_wait)


def _run_cluster_down(args: argparse.Namespace) -> int:
    from lrc_ray.distributed.cluster import local_down

    print("stopped the local Ray head" if local_down(args.workdir) else f"no local head was running ({args.workdir})")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    """The quick-start sweep; a second run finds it finished and prints its results again."""
    from lrc_ray.distributed.tune import SWEEP_FILE

    space = _bundled_search_space("quickstart.yaml")
    storage = (args.storage or DEFAULT_WORKDIR / "sweeps").resolve()
    resume = (storage / "quickstart" / SWEEP_FILE).is_file()
    experiment = api.tune(space=space, storage=storage, name="quickstart", resume=resume)
    print(f"sweep: {experiment}")
    return _print_results(api.results(experiment=experiment), top=20)


def _print_results(written: dict, *, top: int) -> int:
    """Print the tables and the chosen configuration; 2 when some label fraction had no finished
    trial to pick finalists from (named on stderr, after everything the others gave)."""
    import pandas as pd

    from lrc_ray.results import summary_columns

    table, metric, by = written["table"], written["metric"], written["by"]
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(f"\ntrials, best {metric} first:")
        print(table[summary_columns(table, metric)].head(top).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    files = ["results.parquet", "results.csv", "results.md"] + (["finalists.csv", "finalists.md"] if written["finalists"] is not None else [])
    plots = written["plots"] + written.get("finalist_plots", [])
    print(f"\nfiles in {written['out_dir']}: " + ", ".join(files + [path.name for path in plots]))
    if written["finalists"] is not None:
        _print_finalists(written, metric)
    if not written["chosen"]:
        print("no trial has finished fine-tuning yet: no configuration chosen")
        return _missing_fractions(written)
    for group, path in written["chosen"].items():
        print(f"chosen for {by} {group}: {path.name}" + (f" (numbers: {written['numbers'][group].name})"
                                                          if group in written.get("numbers", {}) else ""))
    if written["finalists"] is not None and by == "label_fraction":
        # The largest label budget: the configuration a user with all the labels takes.
        group = max(written["chosen"])
        score = "by the finalists' mean validation " + metric
    else:
        overall = written["best"].sort_values(f"{metric}_mean", ascending=written["mode"] == "min", kind="stable").iloc[0]
        group = overall[by]
        score = f"{metric} {overall[metric]:.3f}, one search run"
        if overall["runs"] > 1:
            score = f"{metric} {overall[f'{metric}_mean']:.3f} +- {overall[f'{metric}_sd']:.3f} over {overall['runs']} seeds"
    chosen = written["chosen"][group]
    print(f"\nchosen configuration ({score}, {by} {group}): {chosen}")
    print(f"use it with: lrc-ray pretrain --config {chosen}")
    if group in written.get("models", {}):
        print(f"segment scans with its model: lrc-ray predict --model {written['models'][group]} --images SCAN.nii.gz --out DIR")
    print()
    print(chosen.read_text())
    return _missing_fractions(written)


def _print_finalists(written: dict, metric: str) -> None:
    import pandas as pd

    from lrc_ray.finalists import choice_lines

    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 40):
        print(f"\nfinalists: {metric}, mean [95% t-interval] over fresh seeds; test volumes were never seen before:")
        print(written["finalists_shown"].to_string(index=False))
    print()
    for line in choice_lines(written["choices"], metric):
        print(line)


def _missing_fractions(written: dict) -> int:
    if not written["missing"]:
        return 0
    listed = ", ".join(f"{fraction:g}" for fraction in written["missing"])
    print(f"lrc-ray: error: finalists: no trial finished with {written['metric']} at label fraction {listed}; "
          "no finalists there (resume the sweep, or give it more trials)", file=sys.stderr)
    return 2


def _bundled_search_space(name: str) -> Path:
    """A file of the project's search_spaces/ (beside the package in a checkout or working_dir)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / "search_spaces" / name).is_file():
            return root / "search_spaces" / name
    raise UserInputError(f"search_spaces/{name}: not found; run from the lrc_ray checkout")


def _print_entry(result: api.SuperpixelResult) -> None:
    summary = api.describe_entry(result.entry)
    print(("cache hit: " if result.cache_hit else "built: ") + summary.pop("path"))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
