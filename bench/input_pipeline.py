"""Pre-training's input path alone, the model replaced by nothing: slices/s a worker can be fed.

The path is the worker's own (`distributed.train`, as in a Tune trial's process): Ray Data reads
the cache's Parquet files and its map tasks decode the selected rows into compact arrays; then
- device mode: the arrays are read once and kept on the device; every step draws a batch there;
- stream mode: every epoch streams the arrays again, in windows that are permuted and cut
  into batches, each copied to the device (from pinned memory where there is a GPU); a reader
  thread reads the windows ahead, into the next epoch;
then each batch is augmented (two views, batched, on the device) or not (`augment off`: each
view is the slice itself), and the loss's region/pixel sampling runs on it
(`losses.sample_region_pixels`, as the loss calls it). Nothing else: no network.

Printed: slices/s over the epochs after the first (at least 5 s of them), for both modes, with and without
augmentation, at one torch thread (a worker's core; Ray Data's decode tasks run on the other
CPUs, as on a cluster node), plus the device mode's one-time read. Then the same path without
augmentation with a stand-in model step, a sleep (as the CPU thread waits on its GPU) of the
H200's bf16 step: whether the stream keeps up with a real step, side by side with the device
mode, and with the stream reading no epoch ahead (as before its reader thread). The target for the path
without augmentation is >= 1000 slices/s per worker core at 256 px; the last line gives the
better mode's figure for that path:

    input_slices_per_second=<N> mode=<mode> size=256 augment=off

    .venv/bin/python bench/input_pipeline.py [--size 256] [--volumes 8] [--slices 32] [--epochs 3]
                                             [--stand-in-step-ms 47]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from lrc_ray import api
from lrc_ray.augment.two_views import TwoViewAugment
from lrc_ray.config import RunConfig
from lrc_ray.distributed.runtime import ray_session
from lrc_ray.distributed.train import ray_dataset, slices_for
from lrc_ray.engine.input_path import TwoViewBatches
from lrc_ray.engine.pretrain_loop import Surroundings
from lrc_ray.losses import sample_region_pixels


def feed_rate(config: RunConfig, data, device: torch.device, *, mode: str, augment: bool, epochs: int,
              min_seconds: float = 5.0, step_seconds: float = 0.0, read_ahead: bool = True) -> dict:
    """Slices/s of the input path in `mode` over the epochs after the first (at least `epochs`,
    and as many more as `min_seconds` of measurement take: a device-mode epoch of the default
    data lasts a fifth of a second), and the seconds the slices took to come in (the device
    mode's one-time read; the stream mode's first epoch).

    `step_seconds`: a stand-in model step after each batch, a sleep, as a CPU thread waits on its
    GPU. `read_ahead=False` tells the stream the run has one epoch, so it reads no epoch ahead:
    each epoch's reads start when its first step needs them (as before the reader thread)."""
    chosen = config.replace(pretrain={"input_mode": mode, "epochs": 1000 if read_ahead else 1})
    settings = chosen.pretrain
    dataset = ray_dataset(str(data.entry.path), data.selection, config.data.size, data.num_slices)
    where = Surroundings()
    where.device = device
    started = time.perf_counter()
    slices = slices_for(chosen, where, data.num_slices, with_labels=False, dataset=lambda name: dataset)
    ready = time.perf_counter() - started
    maker = TwoViewBatches(TwoViewAugment(config.augment, output_size=config.data.size) if augment else None,
                           seed=config.seed, with_labels=False)
    first_rate, measured_slices, measured_seconds, epoch = None, 0, 0.0, 0
    while epoch < epochs or measured_seconds < min_seconds:
        started, count = time.perf_counter(), 0
        for batch in slices.batches(maker, epoch):
            sample_region_pixels(batch["regions1"], batch["regions2"], regions_per_image=settings.regions_per_image,
                                 pixels_per_region=settings.pixels_per_region, seeds=batch["sample_seeds"],
                                 num_ids=batch["region_ids_below"])
            count += len(batch["sample_seeds"])
            time.sleep(step_seconds)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        if first_rate is None:
            first_rate = count / seconds
        else:
            measured_slices, measured_seconds = measured_slices + count, measured_seconds + seconds
        epoch += 1
    slices.close()
    return {"rate": measured_slices / measured_seconds, "ready_seconds": ready, "first_epoch_rate": first_rate,
            "epochs": epoch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--stand-in-step-ms", type=float, default=47.0,
                        help="the stand-in model step, ms a batch of 16 (default: the H200's bf16 step, 2026-11-29)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workdir = Path(tempfile.mkdtemp(prefix="lrc_input_bench_"))
    data_dir = api.make_synthetic_data(out=workdir / "data", cases=2, unlabeled=args.volumes - 2, size=args.size,
                                       slices=args.slices, seed=0)
    config = RunConfig().replace(
        data={"data_dir": str(data_dir), "cache_root": str(workdir / "cache"), "size": args.size, "validation_cases": 1},
        pretrain={"batch_size": args.batch_size},
    )
    rows = {}
    with ray_session():
        api.superpixels_for(config.data)
        data = api.pretraining_data(config)
        print(f"{data.num_slices} slices of {args.size} x {args.size}, batch {args.batch_size}, device {device}, "
              f"1 torch thread; S={config.pretrain.regions_per_image} regions x M={config.pretrain.pixels_per_region} "
              "pixels sampled per slice", flush=True)
        for augment in (False, True):
            for mode in ("device", "stream"):
                result = feed_rate(config, data, device, mode=mode, augment=augment, epochs=args.epochs)
                rows[(mode, augment)] = result
                print(f"mode {mode:6} augment {'on ' if augment else 'off'}: {result['rate']:7.0f} slices/s "
                      f"(epochs 2-{result['epochs']}; first epoch {result['first_epoch_rate']:.0f}; slices ready after "
                      f"{result['ready_seconds']:.1f} s)", flush=True)
        step_seconds = args.stand_in_step_ms / 1000 * args.batch_size / 16
        print(f"with a stand-in model step of {1000 * step_seconds:.0f} ms a batch (a sleep; "
              f"{args.stand_in_step_ms:g} ms a batch of 16), augment off:", flush=True)
        fed = {}
        for mode, read_ahead in (("device", True), ("stream", True), ("stream", False)):
            fed[(mode, read_ahead)] = feed_rate(config, data, device, mode=mode, augment=False, epochs=args.epochs,
                                                step_seconds=step_seconds, read_ahead=read_ahead)["rate"]
            reader = "" if mode == "device" else (" (reads ahead)" if read_ahead else " (no epoch read ahead)")
            print(f"  mode {mode:6}{reader}: {fed[(mode, read_ahead)]:7.0f} slices/s", flush=True)
    for augment in (False, True):
        device_rate, stream_rate = rows[("device", augment)]["rate"], rows[("stream", augment)]["rate"]
        print(f"augment {'on ' if augment else 'off'}: device / stream = {device_rate / stream_rate:.2f}")
    print(f"stand-in step: stream / device = {fed[('stream', True)] / fed[('device', True)]:.2f}; "
          f"stream read ahead / no epoch read ahead = {fed[('stream', True)] / fed[('stream', False)]:.2f}")
    best = max(("device", "stream"), key=lambda mode: rows[(mode, False)]["rate"])
    print("target: >= 1000 slices/s per worker core at 256 px without augmentation")
    print(f"input_slices_per_second={rows[(best, False)]['rate']:.0f} mode={best} size={args.size} augment=off")


if __name__ == "__main__":
    main()
