"""Super-pixel throughput: plain loop vs multiprocessing Pool vs the Ray Data stage.

All three run the same per-slice function on the same prepared slices, side by side in
one run (machines here are noisy), and print images/s and the ratios Ray/loop and
Ray/Pool. Target: Ray Data >= 0.9 x Pool. Ray's start-up is excluded (a running cluster);
each rate is the best of `--repeats` interleaved rounds. Pool and Ray get the same task size.

    .venv/bin/python bench/superpixels.py [--sizes 256 512] [--megapixels 24] [--workers N]
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import os
import tempfile
import time

import numpy as np
import pyarrow as pa

from lrc_ray.data.phantom import generate_case
from lrc_ray.data.slices import SliceParams, dequantise, prepare_slices
from lrc_ray.superpixels.cache import ExtractionParams
from lrc_ray.superpixels.felzenszwalb import FelzenszwalbParams, superpixels_for_slice
from lrc_ray.superpixels.table import slices_table

PARAMS = FelzenszwalbParams(scale=100, sigma=0.8, min_size=20)


def make_slices(size: int, count: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], pa.Table]:
    """`count` prepared slices of size x size from synthetic volumes, as arrays and as a table."""
    rng = np.random.default_rng(0)
    tables, pairs = [], []
    while len(pairs) < count:
        case = generate_case(rng, size=size, slices=32)
        prepared = prepare_slices(case.hu.astype(np.float32), case.labels, SliceParams(),
                                  native_spacing_mm=case.spacing_mm[1:])
        tables.append(slices_table(f"case_{len(tables)}", prepared))
        pairs += [(dequantise(image), mask) for image, mask in zip(prepared.image_u8, prepared.body_mask)]
    return pairs[:count], pa.concat_tables(tables).slice(0, count)


def _one(pair: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return superpixels_for_slice(pair[0], pair[1], PARAMS)


def interleaved_best_rates(runs: dict, count: int, repeats: int) -> dict[str, float]:
    """Items per second of each run, best of `repeats` rounds; rounds alternate the runs so
    that slow phases of a noisy machine hit all of them alike."""
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: count / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--megapixels", type=float, default=24.0,
                        help="work per size: slices = megapixels / slice size (96 of 512 x 512, 384 of 256 x 256)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import ray

    from lrc_ray.distributed.superpixels import batch_size_for, map_superpixels, pipeline_data_context

    ray.init(num_cpus=args.workers, include_dashboard=False, logging_level=logging.WARNING,
             _temp_dir=tempfile.mkdtemp(prefix="lrb_"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    params = ExtractionParams(felzenszwalb=PARAMS, slicing=SliceParams())
    rows = []
    try:
        with multiprocessing.get_context("forkserver").Pool(args.workers) as pool:
            pool.map(_one, [(np.zeros((8, 8)), np.ones((8, 8), bool))] * args.workers)  # warm up
            for size in args.sizes:
                pairs, table = make_slices(size, max(1, round(args.megapixels * 2**20 / (size * size))))
                # Both parallel runs get the pipeline's own task size.
                per_batch = batch_size_for(len(pairs), size * size, args.workers)
                blocks = ray.data.from_arrow(table).repartition(math.ceil(len(pairs) / per_batch)).materialize()

                def run_ray():
                    with pipeline_data_context():
                        stage = map_superpixels(blocks, params, workers=args.workers, slices_per_batch=per_batch)
                        assert stage.materialize().count() == len(pairs)

                run_ray()  # warm up workers and imports
                runs = {
                    "loop": lambda: [_one(pair) for pair in pairs],
                    "pool": lambda: pool.map(_one, pairs, chunksize=per_batch),
                    "ray": run_ray,
                }
                rates = interleaved_best_rates(runs, len(pairs), args.repeats)
                rows.append((size, len(pairs), rates["loop"], rates["pool"], rates["ray"]))
    finally:
        ray.shutdown()

    print(f"\nsuper-pixels per second, {args.workers} workers, scale={PARAMS.scale:g} sigma={PARAMS.sigma:g} "
          f"min_size={PARAMS.min_size}")
    print(f"{'size':>6} {'slices':>7} {'(a) loop':>10} {'(b) Pool':>10} {'(c) Ray':>10} {'c/a':>6} {'c/b':>6}")
    for size, count, loop, pool_rate, ray_rate in rows:
        print(f"{size:>6} {count:>7} {loop:>10.1f} {pool_rate:>10.1f} {ray_rate:>10.1f} "
              f"{ray_rate / loop:>6.2f} {ray_rate / pool_rate:>6.2f}")
    print("target: c/b >= 0.90")


if __name__ == "__main__":
    main()
