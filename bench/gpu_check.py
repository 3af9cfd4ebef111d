"""GPU check: is the GPU fed? The model step alone against Ray Train pre-training, one prepared command.

Made for a short lease of a GPU machine (<= 8 minutes). Each stage is timed on its own while
the GPU's utilisation is sampled every 0.25 s (`nvidia-smi`):
0. checks: keyed random numbers and the loss's pixel sampling give the same values on the GPU
   as on the CPU (the input modes and the data-parallel equivalence rest on it);
1. the model step alone, the batch already on the GPU, for each speed option (batch size,
   bfloat16, channels_last, torch.compile), with the loss of one fixed batch against float32's;
2. Ray Train pre-training, 1 GPU worker, with the fastest option, in both input modes
   (device-resident and streamed): slices/s over the epochs after the first, by wall clock
   between epoch ends (checkpoints and reports included), and the GPU's mean utilisation over
   those epochs;
3. scaling on paper: gradient all-reduce bytes per step against the step time, the projected
   data-parallel efficiency on 1-8 GPUs (ring all-reduce; NVLink and a 200 Gb/s network);
4. a 2-trial sweep of full.yaml's space, shrunk to a few epochs, on a smaller data set of its own:
   each trial's Dice, own compute, wall time, and the seconds beyond its compute by stage.
The last line is `train_over_step=<ratio> gpu_busy=<fraction>`: the better input mode's Ray
Train rate over the model step's at the same options, and its GPU utilisation.
Targets: train_over_step >= 0.8, gpu_busy >= 0.8, and the model step >= 2x the 214-239 slices/s
measured on an H100 on 2026-11-27 (bf16, batch 16, before this change).

    python bench/gpu_check.py [--size 256] [--out DIR] [--cpu (to try it without a GPU)]

The data is the built-in synthetic CT, made at --phantom-size pixels and resampled to --size
(making phantoms is sequential and slow; the input path and the model see --size slices),
with full.yaml's network and global+lrc.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from sweep_common import stage_overheads, trial_reports

from lrc_ray import api
from lrc_ray.config import RunConfig
from lrc_ray.data.shard import compact_slices
from lrc_ray.distributed.runtime import ray_session, user_error_line
from lrc_ray.distributed.tune import TRIAL_SLOT
from lrc_ray.engine.checkpoint import load_checkpoint
from lrc_ray.engine.input_path import DeviceResidentSlices, TwoViewBatches
from lrc_ray.engine.pretrain import LrcPretrainer, build_optimizer, pretrain_one_epoch
from lrc_ray.engine.pretrain_loop import compile_networks
from lrc_ray.augment.two_views import TwoViewAugment
from lrc_ray.keyed_random import keyed_uniform
from lrc_ray.losses import sample_region_pixels
from lrc_ray.search_space import load_search_space, run_config_for
from lrc_ray.superpixels.cache import read_entry_table

REPO = Path(__file__).resolve().parents[1]
BASELINE_STEP_RATE = (214.0, 239.0)  # slices/s, H100, bf16, batch 16, 2026-11-27
# Speed options of the model step: (name, batch, bfloat16, channels_last, compile).
# Measured 2026-11-29 on an H200 before the local head moved to the sampled pixels: channels_last
# 0.8x at batch 64, torch.compile 1.0x after 29 s of compiling; they stay options, off by default.
OPTIONS = [
    ("fp32 b16", 16, False, False, False),
    ("bf16 b16", 16, True, False, False),
    ("bf16 b64", 64, True, False, False),
    ("bf16 b128", 128, True, False, False),
    ("bf16 b128 channels_last", 128, True, True, False),
    ("bf16 b128 compile", 128, True, False, True),
]
# Bandwidths for the all-reduce projection, bytes/s: NCCL's bus bandwidth over NVLink on an
# 8-GPU H100/H200 node is about 350-450 GB/s; 200 Gb/s InfiniBand between nodes about 25 GB/s.
LINKS = {"NVLink": 350e9, "200Gb/s network": 25e9}


class GpuSampler:
    """`nvidia-smi` every 0.25 s in a thread: (time, utilisation %, memory MiB) while a stage runs."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                line = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5, check=True,
                ).stdout.splitlines()[0]
                utilisation, memory = (float(part) for part in line.split(","))
                self.samples.append((time.time(), utilisation, memory))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                pass
            self._stop.wait(0.25)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def busy(self, start: float = 0.0, end: float = float("inf")) -> float | None:
        """Mean utilisation (as a fraction) of the samples taken between `start` and `end` (time.time())."""
        inside = [util for stamp, util, _ in self.samples if start <= stamp <= end]
        return round(sum(inside) / len(inside) / 100, 3) if inside else None

    def memory_max_mib(self) -> float | None:
        return max((memory for *_, memory in self.samples), default=None)


@contextmanager
def stage(name: str, report: dict):
    """Time a stage, sample the GPU, and go on if it fails (one lease: as much as it can tell)."""
    print(f"\n=== {name}", flush=True)
    started = time.perf_counter()
    entry = report.setdefault(name, {})
    with GpuSampler() as sampler:
        try:
            yield entry, sampler
            entry["ok"] = True
        except Exception as exc:  # noqa: BLE001 - a failed stage is reported, the next one still runs
            entry["ok"] = False
            entry["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    entry["wall_seconds"] = round(time.perf_counter() - started, 1)
    entry.setdefault("gpu_busy", sampler.busy())
    entry["gpu_mem_max_mib"] = sampler.memory_max_mib()
    print(f"=== {name}: {json.dumps(entry)}", flush=True)


@contextmanager
def one_ray():
    """One local Ray for every stage, with the trial slots `lrc-ray tune` gives its own. Without
    the dashboard's packages (a hand-carried Ray), Ray starts without its dashboard."""
    import ray
    from ray._private.utils import get_dashboard_dependency_error

    resources = {TRIAL_SLOT: os.cpu_count() or 1}
    if get_dashboard_dependency_error() is None:
        with ray_session(resources=resources):
            yield
        return
    ray.init(resources=resources, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="lrc_ray_"))
    try:
        yield
    finally:
        ray.shutdown()


def base_config(args, workdir: Path) -> RunConfig:
    space = load_search_space(REPO / "search_spaces" / "full.yaml")
    return run_config_for(space, {"pretrain.method": "global+lrc"}).replace(
        data={"data_dir": str(workdir / "data"), "cache_root": str(workdir / "cache"), "size": args.size,
              "validation_cases": 2, "test_cases": 0},
        pretrain={"epochs": args.epochs},
    )


def with_option(config: RunConfig, option) -> RunConfig:
    _, batch, _, channels_last, compile_ = option
    return config.replace(pretrain={"batch_size": batch, "channels_last": channels_last, "compile": compile_})


def device_checks(device: torch.device, arrays: dict) -> dict:
    """Keyed random numbers and the pixel sampling: the same on the GPU as on the CPU."""
    seeds = torch.arange(1000, dtype=torch.int64)
    uniform_equal = torch.equal(keyed_uniform(seeds.unsqueeze(1), 3, torch.arange(64)),
                                keyed_uniform(seeds.to(device).unsqueeze(1), 3, torch.arange(64, device=device)).cpu())
    regions = torch.from_numpy(arrays["regions"][:32]).int()
    sample = dict(regions_per_image=16, pixels_per_region=8, seeds=seeds[:32], num_ids=int(arrays["n_regions"].max()))
    on_cpu = sample_region_pixels(regions, regions.flip(-1), **sample)
    on_device = sample_region_pixels(regions.to(device), regions.flip(-1).to(device), **sample | {"seeds": seeds[:32].to(device)})
    same = all(torch.equal(getattr(on_cpu, name), getattr(on_device, name).cpu())
               for name in ("view1_index", "view2_index", "region_ids"))
    return {"keyed_uniform_equal": uniform_equal, "sampling_equal": same}


def model_step(config: RunConfig, arrays: dict, device: torch.device, option, steps: int) -> dict:
    """Slices/s of steps on one batch already on the device (after warm-up), and the loss of that
    batch with fresh weights (to compare the options)."""
    name, batch, bf16, _, compile_ = option
    config = with_option(config, option)
    maker = TwoViewBatches(TwoViewAugment(config.augment, output_size=config.data.size), seed=0, with_labels=False)
    slices = DeviceResidentSlices(arrays, device, batch_size=batch)
    fixed = next(slices.batches(maker, 0))
    torch.manual_seed(0)
    pretrainer = LrcPretrainer(config.pretrain, config.network, seed=0).to(
        device, memory_format=torch.channels_last if config.pretrain.channels_last else torch.preserve_format)
    if compile_:
        compile_networks(pretrainer)
    autocast = torch.bfloat16 if bf16 else None
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        first_loss = float(pretrainer.batch_losses(fixed).total)
    optimizer = build_optimizer(pretrainer, config.pretrain)
    run = dict(progress=False, autocast_dtype=autocast)
    started = time.perf_counter()
    pretrain_one_epoch(pretrainer, [fixed] * 3, optimizer, epoch=0, **run)  # warm-up (and compilation)
    warm_up = time.perf_counter() - started
    window_start = time.time()
    metrics = pretrain_one_epoch(pretrainer, [fixed] * steps, optimizer, epoch=1, **run)
    return {"option": name, "batch": batch, "slices_per_s": round(metrics["steps"] * batch / metrics["seconds"], 1),
            "first_loss": round(first_loss, 5), "warm_up_seconds": round(warm_up, 1),
            "window": (window_start, time.time())}


def ray_train_rates(config: RunConfig, workdir: Path, mode: str, use_gpu: bool) -> dict:
    chosen = config.replace(pretrain={"input_mode": mode})
    checkpoint = api.pretrain(config=chosen, out_dir=workdir / f"pretrain_{mode}", workers=1, use_gpu=use_gpu,
                              progress=False)
    history = load_checkpoint(checkpoint)["history"]
    later = history[1:]
    batch = chosen.pretrain.batch_size
    slices = sum(entry["steps"] for entry in later) * batch
    wall = history[-1]["ended_at"] - history[0]["ended_at"]
    return {"mode": history[-1]["input_mode"], "epochs": len(history), "steps_per_epoch": history[0]["steps"],
            "first_epoch_seconds": round(history[0]["seconds"], 2),
            "slices_per_s_wall": round(slices / wall, 1),
            "slices_per_s_loop": round(slices / sum(entry["seconds"] for entry in later), 1),
            "window": (history[0]["ended_at"], history[-1]["ended_at"])}


def scaling_on_paper(config: RunConfig, step_rate: float) -> list[str]:
    """DDP all-reduces every trainable parameter's float32 gradient once a step (ring: each GPU
    sends and receives 2 (n-1)/n of the bytes). Efficiency with no overlap of communication and
    backward is t / (t + t_comm); DDP's bucketed overlap lies between that and min(1, t / t_comm)."""
    pretrainer = LrcPretrainer(config.pretrain, config.network, seed=0)
    gradient_bytes = 4 * sum(p.numel() for p in pretrainer.parameters() if p.requires_grad)
    step_seconds = config.pretrain.batch_size / step_rate
    lines = [f"all-reduce {gradient_bytes / 1e6:.1f} MB of gradients a step; step {step_seconds * 1e3:.1f} ms "
             f"(batch {config.pretrain.batch_size} per GPU)"]
    for link, bandwidth in LINKS.items():
        cells = []
        for gpus in (1, 2, 4, 8):
            comm = 2 * (gpus - 1) / gpus * gradient_bytes / bandwidth
            cells.append(f"{gpus} GPUs {step_seconds / (step_seconds + comm):.3f}-{min(1.0, step_seconds / max(comm, 1e-12)):.2f}")
        lines.append(f"{link} ({bandwidth / 1e9:.0f} GB/s): efficiency (no overlap - full overlap): " + ", ".join(cells))
    return lines


def sweep_space(args, workdir: Path, option) -> Path:
    """full.yaml's space, 2 trials, one GPU worker each, a few epochs of each stage, no finalists."""
    raw = yaml.safe_load((REPO / "search_spaces" / "full.yaml").read_text())
    raw["sweep"] |= {"num_samples": 2, "max_concurrent_trials": 1, "workers_per_trial": 1, "use_gpu": not args.cpu,
                     "grace_period": 1}
    raw["base"]["data"] |= {"size": args.size, "validation_cases": 2, "test_cases": 0}
    raw.pop("finalists")  # the search's trials alone: their speed on the GPU is what is checked
    _, batch, _, channels_last, _ = option
    raw["base"]["pretrain"] |= {"epochs": args.sweep_epochs, "batch_size": batch, "channels_last": channels_last}
    raw["base"]["finetune"] |= {"epochs": 4, "head_epochs": 1, "steps_per_epoch": 20}
    path = workdir / "gpu_sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def sweep_stage(args, workdir: Path, option, entry: dict) -> None:
    """On a data set of its own, --sweep-volumes: each trial extracts super-pixels at its own scale,
    and a trial's start-ups, not its size, set its time (on 2026-11-30, 16 volumes took 234 s)."""
    data = api.make_synthetic_data(out=workdir / "sweep_data", cases=4, unlabeled=args.sweep_volumes - 4,
                                   size=args.phantom_size, slices=args.slices, seed=0)
    experiment = api.tune(space=sweep_space(args, workdir, option), data=data, storage=workdir / "sweeps",
                          cache_root=str(workdir / "sweep_cache"), name="gpu_sweep").local_path  # a local sweep
    trials = []
    for lines in trial_reports(experiment).values():
        epochs = [line for line in lines if "steps" in line and not line.get("replayed")]
        # No dice_mean: ASHA stopped the trial before it fine-tuned (errors are listed below).
        overheads = stage_overheads(lines) or {}
        trial = {"method": lines[0]["config"].get("pretrain.method"), "pretrain_epochs": len(epochs),
                 "dice_mean": lines[-1].get("dice_mean"), "wall_seconds": round(lines[-1]["time_total_s"], 1),
                 "compute_seconds": round(lines[-1].get("compute_seconds", float("nan")), 1),
                 "overhead_seconds": {stage: round(seconds, 1) for stage, seconds in overheads.items()}}
        if len(epochs) > 1:
            wall = epochs[-1]["ended_at"] - epochs[0]["ended_at"]
            trial["slices_per_s_wall"] = round(sum(e["steps"] for e in epochs[1:]) * option[1] / wall, 1)
        trials.append(trial)
    entry["trials"] = trials
    entry["errors"] = [user_error_line(path.read_text()) for path in sorted(experiment.glob("run_trial_*/error.txt"))]


def release_device_memory(device: torch.device) -> None:
    """Hand the model steps' cached blocks back to the GPU: the Ray Train worker is another process
    (left held, they made its first step run out of memory on 2026-11-29)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        print(f"GPU memory held by this process after release: {torch.cuda.memory_reserved() / 2**20:.0f} MiB", flush=True)


def save(report: dict, out: Path | None) -> None:
    """Write the report so far (a run stopped at its time limit still returns what it measured)."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--phantom-size", type=int, default=96, help="pixels the phantoms are made at")
    parser.add_argument("--volumes", type=int, default=48, help="synthetic volumes in all (4 labelled)")
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=6, help="Ray Train pre-training epochs (the first warms up)")
    parser.add_argument("--sweep-epochs", type=int, default=2)
    parser.add_argument("--sweep-volumes", type=int, default=16, help="synthetic volumes of the sweep's data set")
    parser.add_argument("--steps", type=int, default=20, help="timed model steps per option")
    # On the H200 of 2026-11-30 the sweep started at about 220 s and took 234 s (16 volumes): a
    # later start would pass the 8 minutes a lease is planned for.
    parser.add_argument("--deadline", type=float, default=240.0,
                        help="seconds after which the optional stages (sweep; compile 60 s later) no longer start")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="where gpu_check.json goes")
    parser.add_argument("--cpu", action="store_true", help="run the same stages without a GPU (to try the script)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (torch.cuda.is_available() is False); --cpu tries it without")
    device = torch.device("cpu" if args.cpu else "cuda")
    workdir = Path(tempfile.mkdtemp(prefix="lrc_gpu_check_"))
    began = time.perf_counter()
    report: dict = {"torch": torch.__version__, "device": "cpu" if args.cpu else torch.cuda.get_device_name(),
                    "size": args.size, "cpus": os.cpu_count()}
    print(json.dumps(report), flush=True)
    api.make_synthetic_data(out=workdir / "data", cases=4, unlabeled=args.volumes - 4, size=args.phantom_size,
                            slices=args.slices, seed=0)
    report["data_seconds"] = round(time.perf_counter() - began, 1)
    config = base_config(args, workdir)
    eager = [option for option in OPTIONS if not option[4]]
    compiled = [option for option in OPTIONS if option[4]]
    if args.cpu:  # a try-out: bfloat16 and compile are the GPU's options
        eager, compiled = [option for option in eager if not option[2]][:1], []
    steps: list[dict] = []
    with one_ray():
        with stage("superpixels", report) as (entry, _):
            entry["slices"] = api.superpixels_for(config.data).entry.num_slices
            data = api.pretraining_data(config)
            arrays = compact_slices(read_entry_table(data.entry), data.selection)
            entry["pretraining_slices"] = data.num_slices
        with stage("checks", report) as (entry, _):
            entry |= device_checks(device, arrays)
        with stage("model_step", report) as (entry, sampler):
            entry["options"] = steps
            for option in eager:
                steps.append(model_step(config, arrays, device, option, args.steps))
                steps[-1]["gpu_busy"] = sampler.busy(*steps[-1].pop("window"))
                print(json.dumps(steps[-1]), flush=True)
        release_device_memory(device)
        save(report, args.out)
        best = max(eager, key=lambda option: next(r["slices_per_s"] for r in steps if r["option"] == option[0]))
        best_rate = next(r["slices_per_s"] for r in steps if r["option"] == best[0])
        train_config = with_option(config, best)
        report["ray_train_option"] = best[0]
        runs = {}
        for mode in ("device", "stream"):
            with stage(f"ray_train_{mode}", report) as (entry, sampler):
                result = ray_train_rates(train_config, workdir, mode, use_gpu=not args.cpu)
                result["gpu_busy"] = sampler.busy(*result.pop("window"))
                entry |= result
                runs[mode] = result
            save(report, args.out)
        with stage("scaling_on_paper", report) as (entry, _):
            entry["lines"] = scaling_on_paper(train_config, best_rate)
            print("\n".join(entry["lines"]), flush=True)
        if not args.no_sweep and time.perf_counter() - began <= args.deadline:
            with stage("sweep_2_trials", report) as (entry, _):
                sweep_stage(args, workdir, best, entry)
        for option in compiled:
            if time.perf_counter() - began > args.deadline + 60:
                print(f"skipped {option[0]}: past the deadline", flush=True)
                continue
            with stage("model_step_compiled", report) as (entry, sampler):
                steps.append(model_step(config, arrays, device, option, args.steps))
                steps[-1]["gpu_busy"] = sampler.busy(*steps[-1].pop("window"))
                entry |= steps[-1]
            release_device_memory(device)
            save(report, args.out)
    reference = steps[0]["first_loss"] if steps else None
    for result in steps:
        result["loss_vs_first"] = round(result["first_loss"] / reference - 1, 5)
    report["seconds"] = round(time.perf_counter() - began, 1)
    save(report, args.out)
    print("\n" + json.dumps(report, indent=2, default=str))
    print("\nmodel step, slices/s:")
    for result in steps:
        print(f"  {result['option']:32} {result['slices_per_s']:8.1f}  GPU busy {result['gpu_busy']}  "
              f"loss vs {steps[0]['option']} {result['loss_vs_first']:+.5f}  warm-up {result['warm_up_seconds']} s")
    fastest = max(steps, key=lambda result: result["slices_per_s"])
    print(f"fastest option {fastest['option']}: {fastest['slices_per_s']:.0f} slices/s = "
          f"{fastest['slices_per_s'] / BASELINE_STEP_RATE[1]:.2f}x the {BASELINE_STEP_RATE[0]:.0f}-"
          f"{BASELINE_STEP_RATE[1]:.0f} of 2026-11-27 (target >= 2x)")
    for trial in report.get("sweep_2_trials", {}).get("trials", []):
        dice = "- (stopped by ASHA)" if trial["dice_mean"] is None else f"{trial['dice_mean']:.3f}"
        print(f"sweep trial {trial['method']}: {trial['pretrain_epochs']} pre-training epochs, "
              f"{trial.get('slices_per_s_wall')} slices/s (wall), Dice {dice}; {trial['wall_seconds']} s in all, "
              f"own compute {trial['compute_seconds']} s, beyond it by stage {trial['overhead_seconds']}")
    measured = {mode: run for mode, run in runs.items() if run.get("slices_per_s_wall")}
    for mode, run in measured.items():
        print(f"Ray Train {mode:6} ({best[0]}): {run['slices_per_s_wall']:.0f} slices/s (loop only "
              f"{run['slices_per_s_loop']:.0f}), GPU busy {run['gpu_busy']}, train/step "
              f"{run['slices_per_s_wall'] / best_rate:.2f}")
    if measured:
        mode = max(measured, key=lambda name: measured[name]["slices_per_s_wall"])
        print(f"train_over_step={measured[mode]['slices_per_s_wall'] / best_rate:.3f} gpu_busy={measured[mode]['gpu_busy']}")


if __name__ == "__main__":
    main()
