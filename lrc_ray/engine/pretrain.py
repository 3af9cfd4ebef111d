"""LRC pre-training in plain PyTorch: the model, the loss of one batch, one epoch.

Methods (LRC_METHOD.md section 7): `global` = MoCo v2 on the encoder bottleneck, `lrc` =
the contrastive sampling loss on the last decoder map, `global+lrc` = their weighted sum,
`supervised` = Dice + cross-entropy of a segmentation head on a labelled source set,
`supervised+lrc` = that plus LRC, `scratch` = no pre-training (the checkpoint holds the
random initialisation).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from monai.losses import DiceCELoss
from torch import Tensor, nn
from tqdm import tqdm

from lrc_ray.config import PretrainConfig
from lrc_ray.errors import TrainingError
from lrc_ray.losses import ContrastiveSamplingLoss, MoCoV2Loss, in_batch_top1, momentum_update, sample_region_pixels
from lrc_ray.models.heads import SegmentationHead
from lrc_ray.models.networks import LrcNetwork, NetworkParams


# The watched figure of the global branch (see BatchLosses), also in the sweeps' tables.
GLOBAL_TOP1 = "global_top1"


@dataclass(frozen=True)
class BatchLosses:
    total: Tensor
    terms: dict[str, Tensor]  # the unweighted parts: "global", "local"
    # Figures to watch, not optimised: GLOBAL_TOP1, how often a view's query finds its partner's
    # key among the batch's (chance 1 / batch): near chance, the global branch has collapsed.
    watched: dict[str, Tensor] = field(default_factory=dict)


class LrcPretrainer(nn.Module):
    """Everything pre-training updates: the online network, its momentum copy, the MoCo queue."""

    def __init__(
        self, config: PretrainConfig, network: NetworkParams, *, seed: int = 0, num_classes: int | None = None
    ) -> None:
        super().__init__()
        if config.uses_supervised and (num_classes is None or num_classes < 2):
            raise ValueError(f"method '{config.method}' needs num_classes >= 2 (background + organs), got {num_classes}")
        self.config = config
        self.online = LrcNetwork(network)
        self.momentum_network: LrcNetwork | None = None
        self.moco: MoCoV2Loss | None = None
        self.local_loss: ContrastiveSamplingLoss | None = None
        self._pending_keys: Tensor | None = None
        self.segmentation_head: SegmentationHead | None = None
        if config.uses_supervised:
            self.segmentation_head = SegmentationHead(self.online.backbone.decoder_channels, num_classes)
            self.supervised_loss = DiceCELoss(to_onehot_y=True, softmax=True)
        if config.uses_global:
            self.momentum_network = copy.deepcopy(self.online).requires_grad_(False)
            self.moco = MoCoV2Loss(network.global_dim, config.queue_size, config.moco_temperature, seed=seed)
        if config.uses_local:
            self.local_loss = ContrastiveSamplingLoss(config.temperature, config.negatives)

    @property
    def trains(self) -> bool:
        """False for `scratch`: nothing to optimise."""
        return self.moco is not None or self.local_loss is not None or self.segmentation_head is not None

    def forward(self, batch: dict) -> BatchLosses:
        """Loss of one batch of two-view pairs: image1/image2 (B, 1, S, S), regions1/regions2 (B, S, S),
        sample_seeds (B,) (each slice's seed for the pixels the local loss samples), optionally
        region_ids_below (an int above every region id), and label1/label2 (B, S, S) for the
        supervised methods (`engine.input_path.TwoViewBatches.make` makes such batches).

        Both views go through the online network in one call: one forward per step is what
        DistributedDataParallel expects, and a per-image norm (group, instance) makes it equal to two
        calls. Batch norm would normalise the two views together: the MoCo methods refuse it (config).
        """
        return self.batch_losses(batch)

    def batch_losses(self, batch: dict) -> BatchLosses:
        features = self.online.backbone(self._network_input(torch.cat([batch["image1"], batch["image2"]])))
        global_embedding = self.online.global_head(features.bottleneck) if self.moco is not None else None
        local = None
        if self.local_loss is not None:
            samples = sample_region_pixels(
                batch["regions1"],
                batch["regions2"],
                regions_per_image=self.config.regions_per_image,
                pixels_per_region=self.config.pixels_per_region,
                seeds=batch["sample_seeds"],
                num_ids=batch.get("region_ids_below"),
            )
            # The local head is per pixel (1x1 convolutions), so embedding only the sampled pixels
            # gives their embeddings exactly, without a (B, D, H, W) map: at 256 px and batch 64
            # that map alone was 2 GB a view, most of the step's memory traffic.
            local = (self.online.local_head.embed_points(samples.gather(*features.decoder.chunk(2))), samples.region_ids)
        # Under mixed precision only the network runs in low precision: the contrastive logits
        # (divided by small temperatures) and their log-sum-exps stay in float32.
        with torch.autocast(features.decoder.device.type, enabled=False):
            return self._losses(features.decoder, global_embedding, local, batch)

    def _network_input(self, images: Tensor) -> Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.config.channels_last else images

    def _losses(self, decoder: Tensor, global_embedding: Tensor | None, local: tuple[Tensor, Tensor] | None,
                batch: dict) -> BatchLosses:
        """The loss terms from the network's outputs for both views (concatenated along the batch):
        the last decoder map, the global embeddings, and the sampled pixels' local embeddings with
        their region ids."""
        terms: dict[str, Tensor] = {}
        watched: dict[str, Tensor] = {}
        if self.moco is not None:
            queries1, queries2 = global_embedding.float().chunk(2)
            keys1, keys2 = self._momentum_keys(torch.cat([batch["image1"], batch["image2"]])).float().chunk(2)
            # Symmetric: each view's query against the other view's key.
            terms["global"] = 0.5 * (self.moco(queries1, keys2) + self.moco(queries2, keys1))
            watched[GLOBAL_TOP1] = 0.5 * (in_batch_top1(queries1, keys2) + in_batch_top1(queries2, keys1))
            self._pending_keys = torch.cat([keys1, keys2])
        if local is not None:
            embeddings, region_ids = local
            terms["local"] = self.local_loss(embeddings.float(), region_ids)
        if self.segmentation_head is not None:
            terms["supervised"] = 0.5 * sum(
                self.supervised_loss(self.segmentation_head(view_decoder), batch[label][:, None])
                for view_decoder, label in zip(decoder.float().chunk(2), ("label1", "label2"))
            )
        weights = {"global": self.config.w_global, "local": self.config.w_local, "supervised": self.config.w_supervised}
        total = sum(weights[name] * value for name, value in terms.items())
        return BatchLosses(total=total, terms=terms, watched=watched)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """MoCo bookkeeping: EMA of the online weights, this step's keys into the queue."""
        if self.moco is None:
            return
        momentum_update(self.online, self.momentum_network, self.config.moco_momentum)
        self.moco.dequeue_and_enqueue(self._pending_keys)

    @torch.no_grad()
    def _momentum_keys(self, images: Tensor) -> Tensor:
        """Keys of both views in one pass (a per-image norm: the same as one pass per view)."""
        network = self.momentum_network
        return network.global_head(network.backbone(self._network_input(images)).bottleneck)


def build_optimizer(pretrainer: LrcPretrainer, config: PretrainConfig) -> torch.optim.Optimizer:
    # The online network and, for the supervised methods, the segmentation head; not the
    # momentum encoder, which follows the online one by EMA.
    parameters = [p for p in pretrainer.parameters() if p.requires_grad]
    # On a GPU the fused kernel updates every tensor in one launch instead of a few per tensor.
    fused = all(p.is_cuda for p in parameters)
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)


# Reading a loss back waits for the device's queue to empty; the losses are checked for a
# non-finite value every this many steps (and at the end of the epoch) instead of every step.
FINITE_CHECK_STEPS = 20


def pretrain_one_epoch(
    pretrainer: LrcPretrainer,
    batches,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    progress: bool = True,
    step_model: nn.Module | None = None,
    autocast_dtype: torch.dtype | None = None,
    total: int | None = None,
) -> dict[str, float]:
    """One pass over `batches` (already on the model's device); returns the mean total loss, of
    each term and of each watched figure, the steps and the seconds.

    `step_model` is what computes the loss (default: `pretrainer`; a DistributedDataParallel
    wrapper of it under Ray Train). `autocast_dtype` (e.g. bfloat16 on GPU) runs the network in
    mixed precision. The losses are summed on the device and read once at the end.

    Raises:
        TrainingError: on a non-finite loss (the run stops; lower lr or raise temperature).
    """
    pretrainer.train()
    started = time.perf_counter()
    sums: dict[str, Tensor] = {}
    steps = 0
    step_model = step_model if step_model is not None else pretrainer
    device_type = next(pretrainer.parameters()).device.type
    for batch in tqdm(batches, desc=f"pretrain epoch {epoch}", disable=not progress, leave=False, total=total):
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            losses = step_model(batch)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        optimizer.step()
        pretrainer.after_optimizer_step()
        for name, value in {"loss": losses.total, **{f"loss_{k}": v for k, v in losses.terms.items()},
                            **losses.watched}.items():
            sums[name] = sums[name] + value.detach() if name in sums else value.detach().clone()
        steps += 1
        if steps % FINITE_CHECK_STEPS == 0:
            _check_finite(sums["loss"], epoch, steps)
    if steps:
        _check_finite(sums["loss"], epoch, steps)
    seconds = time.perf_counter() - started
    means = {name: float(total_loss) / steps for name, total_loss in sums.items()}
    return means | {"steps": steps, "seconds": seconds}


def _check_finite(loss_sum: Tensor, epoch: int, steps: int) -> None:
    if not torch.isfinite(loss_sum):
        first = steps - (steps - 1) % FINITE_CHECK_STEPS - 1
        raise TrainingError(
            f"pre-training epoch {epoch} steps {first}-{steps - 1}: loss is {float(loss_sum)}; "
            "lower pretrain.lr or raise pretrain.temperature"
        )
