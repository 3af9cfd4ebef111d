"""The contrastive sampling loss of LRC (LRC_METHOD section 6).

Per image, with L2-normalised sampled embeddings z_1..z_K, region ids r_k and temperature t:

    P(i) = { p != i : r_p == r_i }
    l_i  = -(1/|P(i)|) * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t) )
    L    = mean of l_i over all anchors i (of all images) with non-empty P(i)

Samples with a negative region id (padding from `sample_region_pixels`) are ignored: they
are neither anchors, positives nor terms of any denominator.

Since log(exp(x_p) / sum_a exp(x_a)) = x_p - logsumexp_a(x_a), each anchor's loss is
computed from logits as

    l_i = logsumexp_{a != i} (z_i.z_a / t) - z_i.(sum_{p in P(i)} z_p) / (t |P(i)|)

- The log-sum-exp runs over a batched matmul of logits, with the diagonal and ignored
  samples filled with the dtype's most negative finite value (finite, not -inf, so an
  anchor with no valid partner at all still gets finite gradients), in a small autograd
  function whose backward is one multiply by the saved softmax.
- The positive term needs no K x K matrix: the samples of each image are grouped by region
  id (a sort), and sum_{p in P(i)} z_p = (sum of z over i's region) - z_i.
Cost: the (B, K, K) logits for negatives "image", (B*K, world*B*K) for "batch"; everything
else is O(B * K * D).
"""

from __future__ import annotations

import difflib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NEGATIVES", "ContrastiveSamplingLoss", "contrastive_sampling_loss"]

NEGATIVES = ("image", "batch")


def contrastive_sampling_loss(embeddings: Tensor, region_ids: Tensor, temperature: float) -> Tensor:
    """Contrastive sampling loss with the other regions of the same image as negatives.

    Shape: embeddings (B, K, D) float (L2-normalised here), region_ids (B, K) integer
    (negative ids are ignored) -> scalar. The mean runs over all anchors of all images that
    have at least one positive (not a mean of per-image means). When no anchor has a
    positive the result is a zero that is still connected to `embeddings` (zero gradient).

    Single-process: for data-parallel training use `ContrastiveSamplingLoss`, whose
    normalisation makes DDP's gradient averaging exact.

    Raises ValueError on bad shapes or dtypes (both shapes in the message) or a temperature
    that is not a finite number > 0.
    """
    _check_temperature(temperature)
    _check_inputs(embeddings, region_ids)
    losses, has_positive = _image_negatives(F.normalize(embeddings, dim=-1), region_ids, temperature)
    return _mean_over_anchors(losses, has_positive, distributed=False)


class ContrastiveSamplingLoss(nn.Module):
    """Contrastive sampling loss (LRC_METHOD section 6) as a module.

    Args:
        temperature: t > 0 in exp(z_i.z_a / t). Small values (0.05-0.2) sharpen the contrast.
        negatives: "image" (default): negatives are the other regions of the same image.
            "batch": the samples of every other image in the batch are negatives too,
            gathered across data-parallel ranks. Positives are always the same region of
            the same image.
        gather_distributed: when torch.distributed is initialised with world size W > 1
            (default True):
            - the loss on each rank is sum_local(l_i) * W / global_anchor_count, with the
              anchor count all-reduced. The mean of the W rank losses, and DDP's averaged
              gradient, then equal exactly the single-process loss and gradient on the whole
              global batch, even when ranks hold different numbers of anchors. A single
              rank's value is not the global loss: average it across ranks to log it.
            - with negatives "batch", embeddings and ids are all-gathered; the gather keeps
              gradients (they are summed back to the rank that owns each sample), which is
              what makes DDP's averaged gradient exact. Every rank must pass the same
              (B, K, D) shape.
            Every rank must call forward (and, for "batch", backward) the same number of
            times. With False, each rank computes its local loss only.

    Shape: forward(embeddings (B, K, D), region_ids (B, K)) -> scalar.

    Raises ValueError for a temperature that is not a finite number > 0, an unknown
    `negatives` (with a did-you-mean suggestion), and in forward for bad shapes or dtypes.
    """

    def __init__(self, temperature: float = 0.1, negatives: str = "image", gather_distributed: bool = True) -> None:
        super().__init__()
        _check_temperature(temperature)
        if negatives not in NEGATIVES:
            close = difflib.get_close_matches(str(negatives), NEGATIVES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"negatives must be one of {', '.join(map(repr, NEGATIVES))}, got {negatives!r}.{hint}")
        self.temperature = float(temperature)
        self.negatives = negatives
        self.gather_distributed = gather_distributed

    def forward(self, embeddings: Tensor, region_ids: Tensor) -> Tensor:
        """Shape: embeddings (B, K, D), region_ids (B, K) -> scalar. Raises ValueError on bad shapes."""
        _check_inputs(embeddings, region_ids)
        embeddings = F.normalize(embeddings, dim=-1)
        distributed = self.gather_distributed and _world_size() > 1
        if self.negatives == "image":
            losses, has_positive = _image_negatives(embeddings, region_ids, self.temperature)
        else:
            losses, has_positive = _batch_negatives(embeddings, region_ids, self.temperature, distributed)
        return _mean_over_anchors(losses, has_positive, distributed)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, negatives={self.negatives!r}, "
            f"gather_distributed={self.gather_distributed}"
        )


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _check_inputs(embeddings: Tensor, region_ids: Tensor) -> None:
    shapes = f"embeddings {tuple(embeddings.shape)}, region_ids {tuple(region_ids.shape)}"
    if embeddings.ndim != 3 or not embeddings.dtype.is_floating_point:
        raise ValueError(f"embeddings must be a float tensor of shape (B, K, D), got {embeddings.dtype}; {shapes}")
    if region_ids.ndim != 2 or region_ids.dtype.is_floating_point or region_ids.dtype == torch.bool:
        raise ValueError(f"region_ids must be an integer tensor of shape (B, K), got {region_ids.dtype}; {shapes}")
    if embeddings.shape[:2] != region_ids.shape:
        raise ValueError(f"embeddings (B, K, D) and region_ids (B, K) disagree on (B, K): {shapes}")


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllGatherWithGradient(torch.autograd.Function):
    """All-gather along dim 0 (rank order) whose backward sums every rank's gradient.

    Each rank's loss uses every rank's samples, so a sample's gradient is the sum of the
    gradients of all rank losses: backward all-reduces the gathered gradient and keeps
    this rank's slice (all-reduce rather than reduce-scatter, which gloo lacks). Not
    torch.distributed.nn.functional.all_gather: on gloo (torch 2.13) its backward returns
    wrong gradients when the incoming gradient is non-contiguous, as it is here.
    Shape: (B, ...) -> (world_size * B, ...).
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        gathered = [
            torch.empty_like(tensor, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size())
        ]
        dist.all_gather(gathered, tensor.contiguous())
        ctx.local_rows = slice(dist.get_rank() * tensor.shape[0], (dist.get_rank() + 1) * tensor.shape[0])
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad_gathered: Tensor) -> Tensor:
        grad_gathered = grad_gathered.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad_gathered)
        return grad_gathered[ctx.local_rows]


def _image_negatives(embeddings: Tensor, region_ids: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Per-anchor losses with each image's own samples as negatives. Shape: (B, K, D), (B, K) -> (B, K), (B, K)."""
    scaled = embeddings / temperature
    not_self = ~torch.eye(region_ids.shape[1], dtype=torch.bool, device=region_ids.device)
    in_denominator = (region_ids >= 0).unsqueeze(1) & not_self
    log_denominator = _MaskedLogSumExp.apply(torch.bmm(scaled, embeddings.transpose(1, 2)), in_denominator)
    return _anchor_losses(scaled, embeddings, region_ids, log_denominator)


def _batch_negatives(
    embeddings: Tensor, region_ids: Tensor, temperature: float, distributed: bool
) -> tuple[Tensor, Tensor]:
    """Per-anchor losses with every sample of the (global) batch as a negative.

    Shape: (B, K, D), (B, K) -> (B, K), (B, K). Positives stay within the anchor's own image,
    which is always local, so only the denominator sees other images and ranks.
    """
    batch, num_samples, dim = embeddings.shape
    if distributed:
        all_embeddings = _AllGatherWithGradient.apply(embeddings)
        gathered_ids = [torch.empty_like(region_ids) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered_ids, region_ids.contiguous())
        all_ids = torch.cat(gathered_ids, dim=0)
        first_anchor = dist.get_rank() * batch * num_samples
    else:
        all_embeddings, all_ids, first_anchor = embeddings, region_ids, 0
    scaled = embeddings / temperature
    device = region_ids.device
    anchor_position = torch.arange(batch * num_samples, device=device) + first_anchor
    not_self = anchor_position.unsqueeze(1) != torch.arange(all_ids.numel(), device=device).unsqueeze(0)
    in_denominator = (all_ids >= 0).reshape(1, -1) & not_self
    logits = scaled.reshape(-1, dim) @ all_embeddings.reshape(-1, dim).t()
    log_denominator = _MaskedLogSumExp.apply(logits, in_denominator).reshape(batch, num_samples)
    return _anchor_losses(scaled, embeddings, region_ids, log_denominator)


class _MaskedLogSumExp(torch.autograd.Function):
    """log sum_{a: keep[..., a]} exp(logits[..., a]) over the last dim, with a fused backward.

    Excluded entries are filled with the dtype's most negative finite value: their softmax
    weight is exactly 0 in any row that keeps something, and a row that keeps nothing gives
    a finite value (-inf would give NaN gradients) with uniform weights; callers must give
    such rows a zero gradient (here: anchors without a valid partner have no positive and
    are masked out of the mean). Forward computes the softmax in place
    and keeps it for backward (grad * softmax), which saves several passes over the large
    logits tensor compared with `where` + `torch.logsumexp` under autograd.
    Shape: logits (..., C), keep bool broadcastable to it -> (...), at least float32.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, keep: Tensor) -> Tensor:
        # Half-precision logits (autocast) are summed in float32.
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        ctx.logits_dtype = logits.dtype
        probabilities = torch.where(keep, logits.to(compute_dtype), torch.finfo(compute_dtype).min)
        row_max = probabilities.amax(dim=-1, keepdim=True)
        probabilities.sub_(row_max).exp_()
        row_sum = probabilities.sum(dim=-1, keepdim=True)
        probabilities.div_(row_sum)
        ctx.save_for_backward(probabilities)
        return (row_sum.log() + row_max).squeeze(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (probabilities,) = ctx.saved_tensors
        return (probabilities * grad.unsqueeze(-1)).to(ctx.logits_dtype), None


def _anchor_losses(
    scaled: Tensor, embeddings: Tensor, region_ids: Tensor, log_denominator: Tensor
) -> tuple[Tensor, Tensor]:
    """l_i = log_denominator_i - mean positive logit_i, and whether i has a positive.

    Shape: scaled = embeddings / t and embeddings (B, K, D), region_ids and log_denominator
    (B, K) -> (B, K), (B, K). Anchors without a positive get a finite, meaningless l_i;
    callers mask them out.
    """
    valid = region_ids >= 0
    # Region of each sample as a group index in [0, K) per image: sort, then number the runs
    # of equal ids. Ignored (negative) ids only ever share a group with each other.
    sorted_ids, order = region_ids.sort(dim=1)
    new_run = torch.ones_like(sorted_ids, dtype=torch.bool)
    new_run[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    group = torch.empty_like(order).scatter_(1, order, new_run.long().cumsum(dim=1) - 1)
    group_size = torch.zeros_like(group).scatter_add_(1, group, torch.ones_like(group))
    group_rows = group.unsqueeze(-1).expand_as(embeddings)
    group_sum = torch.zeros_like(embeddings).scatter_add(1, group_rows, embeddings)
    positive_sum = group_sum.gather(1, group_rows) - embeddings
    num_positive = torch.where(valid, group_size.gather(1, group) - 1, 0)
    mean_positive_logit = (scaled * positive_sum).sum(dim=-1) / num_positive.clamp(min=1)
    return log_denominator - mean_positive_logit, num_positive > 0


def _mean_over_anchors(losses: Tensor, has_positive: Tensor, distributed: bool) -> Tensor:
    """Mean of l_i over anchors with a positive; 0 (still in the graph) when there are none.

    Distributed: sum_local(l_i) * world_size / global_count, so that averaging over ranks
    (as DDP does with gradients) gives the global mean.
    """
    total = torch.where(has_positive, losses, torch.zeros_like(losses)).sum()
    count = has_positive.sum()
    if not distributed:
        return total / count.clamp(min=1)
    dist.all_reduce(count)
    return total * dist.get_world_size() / count.clamp(min=1)
