"""Does the global (MoCo) branch see image content? `network.norm` choices side by side.

1. At initialisation, on 16 different synthetic CT slices at 128 px (4 volumes x 4 heights): the
   spread of the pooled bottleneck across the slices over its spread within a slice
   (`lrc_ray.models.pooled_spread_ratio`) for each norm, and for instance norm pooled before its
   last norm (the other remedy LRC_METHOD section 4 names); seeds 0-2. The slices' own pixels
   give the scale: a pooled feature of a convolutional network hardly differs between images
   more than their pixels' means do.
2. With --moco-epochs N: `global` pre-training (MoCo v2) for N epochs per norm on the built-in
   data at 64 px, as `bench/lrc_evidence.py` runs it. After each epoch, on 32 held two-view pairs:
   the MoCo loss; the spread ratio; the cosine of each query with its own key and with the other
   slices' keys (equal: every slice gets the same embedding, the branch has collapsed); how often
   a query's nearest key is its own (top-1; chance 1/32); the same over the epoch's training
   batches, as pre-training reports it (`global_top1`, chance 1/16); the linear-probe Dice.

    .venv/bin/python bench/global_embedding.py [--moco-epochs 4] [--norms group,instance] [--set pretrain.lr=1e-4]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from lrc_ray import api, stages
from lrc_ray.augment.two_views import TwoViewAugment
from lrc_ray.config import NORMS, RunConfig
from lrc_ray.data.phantom import generate_case
from lrc_ray.data.shard import compact_slices
from lrc_ray.data.slices import DEFAULT_WINDOW_HU, window_to_unit
from lrc_ray.engine.input_path import TwoViewBatches
from lrc_ray.engine.pretrain import LrcPretrainer
from lrc_ray.engine.pretrain_loop import LocalRun, run_pretraining
from lrc_ray.engine.probe import linear_probe_dice, probe_slices
from lrc_ray.losses import in_batch_top1
from lrc_ray.models import EncoderDecoder, NetworkParams, pooled_spread_ratio
from lrc_ray.search_space import config_with_values
from lrc_ray.superpixels.cache import read_entry_table

SEEDS = (0, 1, 2)


def distinct_slices(size: int = 128) -> torch.Tensor:
    """Shape (16, 1, size, size): 4 synthetic volumes, 4 heights each."""
    slices = []
    for case_seed in range(4):
        case = generate_case(np.random.default_rng(case_seed), size=size, slices=12)
        slices += [window_to_unit(case.hu[z], DEFAULT_WINDOW_HU) for z in (2, 5, 8, 10)]
    return torch.from_numpy(np.stack(slices))[:, None]


@torch.no_grad()
def bottleneck_before_last_norm(backbone: EncoderDecoder, images: torch.Tensor) -> torch.Tensor:
    """The bottleneck's last convolution's output, before its norm and activation (MONAI's
    Convolution = conv, then adn)."""
    x = images
    for stage in (backbone.conv_0, backbone.down_1, backbone.down_2, backbone.down_3):
        x = stage(x)
    down = backbone.down_4
    return down.convs.conv_1.conv(down.convs.conv_0(down.max_pooling(x)))


def spread_at_initialisation() -> None:
    images = distinct_slices()
    rows: dict[str, list[float]] = {}
    for norm in NORMS:
        name = f"network.norm {norm}" + (" (default)" if norm == NetworkParams().norm else "")
        for seed in SEEDS:
            torch.manual_seed(seed)
            backbone = EncoderDecoder(NetworkParams(norm=norm))  # train mode: batch norm uses batch statistics
            with torch.no_grad():
                rows.setdefault(name, []).append(pooled_spread_ratio(backbone(images).bottleneck))
            if norm == "instance":
                rows.setdefault("network.norm instance, pooled before its last norm", []).append(
                    pooled_spread_ratio(bottleneck_before_last_norm(backbone, images)))
    instance = statistics.mean(rows["network.norm instance"])
    print(f"1. pooled bottleneck at initialisation, {images.shape[0]} slices at {images.shape[-1]} px, "
          f"default widths {NetworkParams().features}, seeds {SEEDS}")
    print(f"   {'pooled feature':<52} {'spread ratio':>12} {'min-max':>12} {'/ instance':>10}")
    print(f"   {'(the slices pixels themselves)':<52} {pooled_spread_ratio(images):>12.3f}")
    for name, ratios in rows.items():
        print(f"   {name:<52} {statistics.mean(ratios):>12.3f} {min(ratios):>6.3f}-{max(ratios):.3f} "
              f"{statistics.mean(ratios) / instance:>10.1f}")


@torch.no_grad()
def moco_indicators(pretrainer: LrcPretrainer, views: dict[str, torch.Tensor]) -> dict[str, float]:
    online, momentum = pretrainer.online, pretrainer.momentum_network
    features = online.backbone(views["image1"]).bottleneck
    queries = F.normalize(online.global_head(features), dim=1)
    keys = F.normalize(momentum.global_head(momentum.backbone(views["image2"]).bottleneck), dim=1)
    similarity = queries @ keys.t()
    others = ~torch.eye(len(queries), dtype=torch.bool)
    return {
        "spread": pooled_spread_ratio(features),
        "own key": similarity.diag().mean().item(),
        "other keys": similarity[others].mean().item(),
        "top-1": in_batch_top1(queries, keys).item(),  # as pre-training's global_top1, over the held pairs
    }


class DiagnosedRun(LocalRun):
    """The in-process pre-training loop; after each epoch, instead of a checkpoint, a row of the
    global branch's indicators on held two-view pairs."""

    def __init__(self, config: RunConfig, arrays: dict[str, np.ndarray], held: dict[str, torch.Tensor]) -> None:
        super().__init__(config, arrays, checkpoint=Path("unused"), progress=False)
        self.held = held
        self.started = time.perf_counter()

    def pretrainer(self, state: dict | None) -> LrcPretrainer:
        torch.manual_seed(self.config.seed)  # as run_pretraining builds it: the same initial weights
        pretrainer = LrcPretrainer(self.config.pretrain, self.config.network, seed=self.config.seed)
        if state is not None:
            pretrainer.load_state_dict(state["pretrainer"])
        return pretrainer

    def show(self, epoch: int, metrics: dict, state: dict | None) -> None:
        shown = moco_indicators(self.pretrainer(state), self.held)
        print(f"   {self.config.network.norm:>8} {epoch:>5} {metrics.get('loss', float('nan')):>6.3f} "
              f"{shown['spread']:>7.3f} {shown['own key']:>8.3f} {shown['other keys']:>11.3f} {shown['top-1']:>6.2f} "
              f"{metrics.get('global_top1', float('nan')):>11.2f} "
              f"{metrics.get('probe_dice', float('nan')):>11.3f} {time.perf_counter() - self.started:>5.0f}", flush=True)

    def report(self, metrics: dict, state: dict | None) -> None:
        self.show(metrics["epoch"], metrics, state)


def moco_training(norms: list[str], epochs: int, workdir: Path, settings: dict[str, object]) -> None:
    data_dir = workdir / "data"
    if not (data_dir / "dataset.json").is_file():
        api.make_synthetic_data(out=data_dir, cases=8, unlabeled=8, size=64, slices=20, seed=0)
    base = config_with_values(RunConfig().replace(
        data={"data_dir": str(data_dir), "cache_root": str(workdir / "cache"), "size": 64, "validation_cases": 2},
        pretrain={"method": "global", "epochs": epochs, "batch_size": 16, "queue_size": 256},
    ).to_dict(), settings, source="--set")
    api.build_superpixels(data=data_dir, cache_root=base.data.cache_root, scale=base.data.scale, sigma=base.data.sigma,
                          min_size=base.data.min_size, size=base.data.size)
    print(f"\n2. `global` pre-training on the built-in data (64 px, batch 16, lr {base.pretrain.lr}, momentum "
          f"{base.pretrain.moco_momentum}, queue {base.pretrain.queue_size}{''.join(f', {k} {v}' for k, v in settings.items())}), "
          "seed 0; 32 held two-view pairs")
    print(f"   {'norm':>8} {'epoch':>5} {'loss':>6} {'spread':>7} {'own key':>8} {'other keys':>11} {'top-1':>6} "
          f"{'batch top-1':>11} {'probe Dice':>11} {'s':>5}")
    for norm in norms:
        config = base.replace(network={"norm": norm})
        data = api.pretraining_data(config)
        arrays = compact_slices(read_entry_table(data.entry), data.selection)
        rows = np.linspace(0, len(arrays["row_key"]) - 1, 32).astype(int)
        held = TwoViewBatches(TwoViewAugment(config.augment, output_size=config.data.size), seed=config.seed,
                              with_labels=False).make(
            {name: torch.from_numpy(arrays[name][rows]) for name in ("image", "regions")},
            arrays["row_key"][rows], arrays["n_regions"][rows], epoch=0)
        run = DiagnosedRun(config, arrays, held)
        probe = stages.probe_source(config, stages.run_data(config.data))
        run.show(0, {"probe_dice": linear_probe_dice(run.pretrainer(None).online.backbone, probe_slices(
            read_entry_table(data.entry), train_case=probe.train_case, validation_cases=probe.validation_cases,
            num_classes=probe.num_classes), seed=config.seed)}, None)
        run_pretraining(config, run, probe=probe)


def _value(text: str) -> object:
    """A YAML value; 1e-4 too (YAML 1.1 reads it as a string)."""
    value = yaml.safe_load(text)
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moco-epochs", type=int, default=0, help="0: only part 1")
    parser.add_argument("--norms", default="group,instance", help="comma-separated, for part 2")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config value for part 2, e.g. pretrain.lr=1e-4 (YAML value; repeatable)")
    args = parser.parse_args()
    settings = {key: _value(text) for key, _, text in (item.partition("=") for item in args.set)}
    logging.basicConfig(level=logging.WARNING)
    spread_at_initialisation()
    if args.moco_epochs:
        moco_training([n for n in args.norms.split(",") if n], args.moco_epochs,
                      args.workdir or Path(tempfile.mkdtemp(prefix="global_embedding_")), settings)


if __name__ == "__main__":
    main()
