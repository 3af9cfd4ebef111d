"""GPU check: a short Ray Train pre-training on one GPU worker, then a 2-trial sweep on the GPU.

Made for a short lease of a GPU machine: one script, each stage timed on its own, GPU
utilisation sampled every 0.5 s by `nvidia-smi` while each stage runs. Stages:
1. step rate with the batch already on the GPU (the model's own speed, no data loading),
   bfloat16 autocast and float32;
2. two-view augmentation of cached slices alone, one torch thread: item by item on the CPU (how
   a Train worker augmented until 2026-11-27) and batched on the GPU (how it does now);
3. `api.pretrain(..., workers=1, use_gpu=True)`: Ray Train, NCCL, bfloat16 autocast, the
   worker streaming its shard from the Parquet cache; images/s of the epochs after the first;
4. a 2-trial sweep of `search_spaces/full.yaml`'s space shrunk to a few epochs (one GPU
   worker per trial).
Images are slices; each gives two augmented views. The data is the built-in synthetic CT at
`--size` pixels with full.yaml's network.

    python bench/gpu_check.py [--size 256] [--out DIR]        (add --cpu to try it without a GPU)

Measured 2026-11-27 on one H100 80GB (16 CPUs; Ray 2.60 and MONAI carried to the machine as
wheels, torch 2.11+cu130), 256 px, batch 16, global+lrc, two runs:
- model step, batch on the GPU: 214 / 239 slices/s in bfloat16, 175 / 185 in float32; even so
  the GPU was busy in only about a quarter of the samples: at batch 16 this small U-Net's step
  is bound by the host (kernel launches, the loss's per-step `.item()` reads);
- augmentation on the CPU, item by item: 70 / 56 slices/s on one thread; 65 on 8 threads (GIL-bound);
- Ray Train, 1 GPU worker, NCCL, bf16: 19.9 slices/s (10 steps an epoch) / 21.9 (24 steps);
  mean GPU utilisation 3-4 %, 27.6 GB of GPU memory at most;
- 2-trial sweep (full.yaml's space, 2 pre-training epochs, 4 short fine-tuning epochs): both
  trials finished on the GPU in 221 s, 14.8 and 20.4 slices/s in pre-training.
So the GPU waited on its worker's one CPU thread: an epoch of 384 slices took 17.5 s, of which
augmentation explains about 7 s and the GPU under 2 s; the rest is the worker's Ray Data
stream (Parquet reads through the split coordinator, the 256-row shuffle buffer) and
collation, not broken down further (streaming alone costs about 7 ms a 256 px slice on the
2-core CPU machine). Threads don't help (GIL).

Since then (same day) a worker augments each batch in one batched pass on its own device (GPU
workers on the GPU) and no longer collates items; stage 2 compares the two ways. Not yet
re-measured on a GPU: the numbers above are from before.
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

from augmentation import cached_dataset, item_by_item, slices_per_second
from sweep_common import trial_reports

from lrc_ray import api
from lrc_ray.distributed.runtime import ray_session, user_error_line
from lrc_ray.distributed.tune import TRIAL_SLOT
from lrc_ray.search_space import load_search_space, run_config_for

REPO = Path(__file__).resolve().parents[1]


class GpuSampler:
    """`nvidia-smi` every 0.5 s in a thread: utilisation (%) and memory used (MiB) while a stage runs."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
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
                self.samples.append((utilisation, memory))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                pass
            self._stop.wait(0.5)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_busy_share": None, "gpu_mem_max_mib": None}
        utilisation = [sample[0] for sample in self.samples]
        return {
            "gpu_util_mean": round(sum(utilisation) / len(utilisation), 1),
            "gpu_util_busy_share": round(sum(value > 0 for value in utilisation) / len(utilisation), 2),
            "gpu_mem_max_mib": max(sample[1] for sample in self.samples),
        }


@contextmanager
def stage(name: str, report: dict):
    """Time a stage, sample the GPU, and keep going if it fails (one lease, as much as it can tell)."""
    print(f"\n=== {name}", flush=True)
    started = time.perf_counter()
    entry = report.setdefault(name, {})
    with GpuSampler() as sampler:
        try:
            yield entry
            entry["ok"] = True
        except Exception as exc:  # noqa: BLE001 - a failed stage is reported, the next one still runs
            entry["ok"] = False
            entry["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    entry["wall_seconds"] = round(time.perf_counter() - started, 1)
    entry |= sampler.summary()
    print(f"=== {name}: {json.dumps(entry)}", flush=True)


@contextmanager
def one_ray():
    """One local Ray for every stage, with the trial slots `lrc-ray tune` gives its own. Without
    the dashboard's packages (a hand-carried Ray), Ray starts without its dashboard."""
    import ray
    from ray._private.utils import get_dashboard_dependency_error

    resources = {TRIAL_SLOT: os.cpu_count() or 1}
    missing = get_dashboard_dependency_error()
    if missing is None:
        with ray_session(resources=resources):
            yield
        return
    print(f"Ray's dashboard packages are missing ({missing}): starting Ray without its dashboard", flush=True)
    ray.init(resources=resources, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="lrc_ray_"))
    try:
        yield
    finally:
        ray.shutdown()


def pretrain_config(args, workdir: Path):
    space = load_search_space(REPO / "search_spaces" / "full.yaml")
    return run_config_for(space, {"pretrain.method": "global+lrc"}).replace(
        data={"data_dir": str(workdir / "data"), "cache_root": str(workdir / "cache"), "size": args.size,
              "validation_cases": 2, "test_cases": 0},
        pretrain={"epochs": args.epochs, "batch_size": args.batch_size},
    )


def model_step_rate(config, device: torch.device, dtype: torch.dtype | None, steps: int) -> float:
    """Slices/s of pre-training steps on one batch already on the device (after 3 warm-up steps)."""
    from lrc_ray.engine.pretrain import LrcPretrainer, build_optimizer, pretrain_one_epoch

    pretrainer = LrcPretrainer(config.pretrain, config.network, seed=0).to(device)
    optimizer = build_optimizer(pretrainer, config.pretrain)
    dataset = cached_dataset(config, rows=config.pretrain.batch_size)
    batch = dataset.augmented_batch(range(len(dataset)), device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    run = dict(generator=generator, progress=False, device=device, autocast_dtype=dtype)
    pretrain_one_epoch(pretrainer, [batch] * 3, optimizer, epoch=0, **run)
    metrics = pretrain_one_epoch(pretrainer, [batch] * steps, optimizer, epoch=1, **run)
    return metrics["steps"] * config.pretrain.batch_size / metrics["seconds"]


def augment_rates(config, device: torch.device, batches: int) -> dict:
    """Slices/s of the two-view augmentation alone at one torch thread: item by item on the CPU
    (as a Train worker augmented before the batched pass) and batched on `device` (as it does now)."""
    dataset = cached_dataset(config)
    size = config.pretrain.batch_size
    indices = [list(range(start, start + size)) for start in range(0, len(dataset) - size + 1, size)][:batches]
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        items = slices_per_second(lambda batch: item_by_item(dataset, batch), indices)
        batched = slices_per_second(lambda batch: dataset.augmented_batch(batch, device=device), indices)
    finally:
        torch.set_num_threads(torch_threads)
    return {"images_per_s_items_cpu": round(items, 1), f"images_per_s_batched_{device.type}": round(batched, 1)}


def sweep_space(args, workdir: Path) -> Path:
    """full.yaml's space, 2 trials, one GPU worker each, a few epochs of each stage, no finalists."""
    raw = yaml.safe_load((REPO / "search_spaces" / "full.yaml").read_text())
    raw["sweep"] |= {"num_samples": 2, "max_concurrent_trials": 1, "workers_per_trial": 1, "use_gpu": not args.cpu,
                     "grace_period": 1}
    raw["base"]["data"] |= {"size": args.size, "validation_cases": 2, "test_cases": 0}
    raw.pop("finalists")  # the search's trials alone: their speed on the GPU is what is checked
    raw["base"]["pretrain"] |= {"epochs": args.sweep_epochs, "batch_size": args.batch_size}
    raw["base"]["finetune"] |= {"epochs": 4, "head_epochs": 1, "steps_per_epoch": 20}
    path = workdir / "gpu_sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def pretrain_rates(history: list[dict], batch_size: int) -> dict:
    later = history[1:] or history
    seconds = sum(entry["seconds"] for entry in later)
    return {"epochs": len(history), "steps_per_epoch": history[0]["steps"],
            "first_epoch_seconds": round(history[0]["seconds"], 2),
            "images_per_s_after_first_epoch": round(sum(entry["steps"] for entry in later) * batch_size / seconds, 1)}


def sweep_stage(args, workdir: Path, report: dict) -> None:
    with stage("sweep_2_trials", report) as entry:
        experiment = api.tune(space=sweep_space(args, workdir), data=workdir / "data", storage=workdir / "sweeps",
                              name="gpu_sweep")
        trials = []
        for lines in trial_reports(experiment).values():
            epochs = [line for line in lines if "steps" in line and not line.get("replayed")]
            trial = {"method": lines[0]["config"].get("pretrain.method"), "dice_mean": lines[-1].get("dice_mean")}
            if epochs:
                trial |= pretrain_rates(epochs, args.batch_size)
            trials.append(trial)
        entry["trials"] = trials
        errors = sorted(experiment.glob("run_trial_*/error.txt"))
        entry["errors"] = [user_error_line(path.read_text()) for path in errors]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3, help="stage 3 pre-training epochs (the first warms up)")
    parser.add_argument("--sweep-epochs", type=int, default=2)
    parser.add_argument("--volumes", type=int, default=12, help="synthetic volumes in all (6 labelled)")
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="stage 1 timed steps")
    parser.add_argument("--no-sweep", action="store_true", help="skip stage 4")
    parser.add_argument("--out", type=Path, default=None, help="where report.json goes")
    parser.add_argument("--cpu", action="store_true", help="run the same stages without a GPU (to try the script)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (torch.cuda.is_available() is False); --cpu tries it without")
    device = torch.device("cpu" if args.cpu else "cuda")
    workdir = Path(tempfile.mkdtemp(prefix="lrc_gpu_check_"))
    report: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if not args.cpu else "cpu",
                    "size": args.size, "batch_size": args.batch_size}
    print(json.dumps(report), flush=True)

    api.make_synthetic_data(out=workdir / "data", cases=6, unlabeled=args.volumes - 6, size=args.size,
                            slices=args.slices, seed=0)
    config = pretrain_config(args, workdir)
    with one_ray():
        with stage("superpixels", report) as entry:
            entry["slices"] = api.superpixels_for(config.data).entry.num_slices
        with stage("model_step", report) as entry:
            entry["images_per_s_bf16"] = round(model_step_rate(config, device, None if args.cpu else torch.bfloat16,
                                                                args.steps), 1)
            entry["images_per_s_fp32"] = round(model_step_rate(config, device, None, args.steps), 1)
        with stage("augment", report) as entry:
            entry |= augment_rates(config, device, batches=8)
        with stage("ray_train_pretrain", report) as entry:
            checkpoint = api.pretrain(config=config, out_dir=workdir / "pretrain", workers=1, use_gpu=not args.cpu,
                                      progress=False)
            from lrc_ray.engine.checkpoint import load_checkpoint

            entry |= pretrain_rates(load_checkpoint(checkpoint)["history"], args.batch_size)
        if not args.no_sweep:
            sweep_stage(args, workdir, report)

    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
