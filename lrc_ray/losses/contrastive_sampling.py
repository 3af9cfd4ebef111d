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

- Negatives "image" (t >= 1/32): one autograd function, `_ImageNegativesLoss`, with a
  hand-written backward. For L2-normalised z the logits lie in [-1/t, 1/t], so exp needs no
  max shift; exp(logits) with zeroed diagonal and ignored rows/columns is symmetric, which
  makes the gradient of all the log-sum-exps one matmul with pair weights that forward
  prepares in place of exp(logits). Below t = 1/32, and for negatives "batch", the
  log-sum-exp runs over a batched matmul of logits with the diagonal and ignored samples
  filled with the dtype's most negative finite value (finite, not -inf, so an anchor with
  no valid partner at all still gets finite gradients), in a small autograd function whose
  backward is one multiply by the saved softmax.
- The positive term needs no K x K matrix: the samples of each image are grouped by region
  id (a sort), and sum_{p in P(i)} z_p = (sum of z over i's region) - z_i.
Cost: one (B, K, K) tensor for negatives "image", (B*K, world*B*K) for "batch"; everything
else is O(B * K * D).
"""

from __future__ import annotations

import difflib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lrc_ray.config import NEGATIVES

__all__ = ["NEGATIVES", "ContrastiveSamplingLoss", "contrastive_sampling_loss"]



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
    return _image_negatives_loss(embeddings, region_ids, temperature, distributed=False)


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
        distributed = self.gather_distributed and _world_size() > 1
        if self.negatives == "image":
            return _image_negatives_loss(embeddings, region_ids, self.temperature, distributed)
        normalised = F.normalize(embeddings, dim=-1)
        losses, has_positive = _batch_negatives(normalised, region_ids, self.temperature, distributed)
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


def _image_negatives_loss(embeddings: Tensor, region_ids: Tensor, temperature: float, distributed: bool) -> Tensor:
    """The loss with each image's own samples as negatives. Shape: (B, K, D) (not yet normalised), (B, K) -> ()."""
    groups = _region_groups(region_ids)
    has_positive = groups[2] > 0
    if temperature >= _MIN_UNSHIFTED_TEMPERATURE:
        weight = _anchor_weights(has_positive, distributed, torch.promote_types(embeddings.dtype, torch.float32))
        return _ImageNegativesLoss.apply(embeddings, region_ids >= 0, groups, weight, temperature)
    # Very low temperatures: autograd path with a row-max shift, which cannot overflow.
    embeddings = F.normalize(embeddings, dim=-1)
    scaled = embeddings / temperature
    not_self = ~torch.eye(region_ids.shape[1], dtype=torch.bool, device=region_ids.device)
    in_denominator = (region_ids >= 0).unsqueeze(1) & not_self
    log_denominator = _MaskedLogSumExp.apply(torch.bmm(scaled, embeddings.transpose(1, 2)), in_denominator)
    losses = _anchor_losses(scaled, embeddings, groups, log_denominator)
    return _mean_over_anchors(losses, has_positive, distributed)


# exp(z_i.z_a / t) of L2-normalised z lies in [exp(-1/t), exp(1/t)]: down to this temperature
# (exp(32) ~ 8e13) neither it, its row sums (K < 1e20) nor their inverses leave float32's
# normal range, so no max shift is needed.
_MIN_UNSHIFTED_TEMPERATURE = 1 / 32
_NORMALIZE_EPS = 1e-12  # as F.normalize
# Images per chunk of the (B, K, K) work: about this many elements (16 MiB in float32).
_CHUNK_ELEMENTS = 1 << 22


class _ImageNegativesLoss(torch.autograd.Function):
    """sum_i a_i l_i for negatives "image", L2 normalisation included, with a hand-written backward.

    Why: at K ~ 1000 the (B, K, K) logits dominate, and autograd of normalize + bmm + masked
    log-sum-exp makes two matmuls and several passes over fresh (B, K, K) tensors (whose page
    faults cost as much as the passes themselves). Since the output is a scalar whose anchor
    weights a_i are known in forward, its gradient is fixed up to the incoming scalar, so:
    - Logits x_ia = z_i.z_a / t of L2-normalised z lie in [-1/t, 1/t]: for t >=
      _MIN_UNSHIFTED_TEMPERATURE, E_ia = exp(x_ia) needs no max shift. The diagonal and the
      rows and columns of ignored samples are zeroed (ignored samples are no anchors), which
      keeps E symmetric, and lse_i = log(sum_a E_ia).
    - x_ja is in lse_j and, as x_aj, in lse_a, so d(sum_i a_i lse_i)/dz_j = sum_a (w_j + w_a)
      E_ja z_a with w_i = a_i / (t sum_a E_ia). Forward turns E into these pair weights in
      place, chunk by chunk while the chunk is still in cache; backward is one bmm on them
      (autograd of z z^T would make two). This is the one (B, K, K) tensor kept.
    - Positive term from per-region sums S (index_add): l_i -= z_i.(S_r(i) - z_i) / (t n_i)
      with n_i = |P(i)|; its gradient is written out in backward, as is F.normalize's.
    Shape: embeddings (B, K, D), valid (B, K), groups (group, num_groups, num_positive) from
    `_region_groups`, anchor_weight (B, K) -> scalar, at least float32. anchor_weight must be
    0 wherever num_positive is (those l_i are finite but meaningless).
    """

    @staticmethod
    def forward(ctx, embeddings, valid, groups, anchor_weight, temperature):
        group, num_groups, num_positive = groups
        x = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
        inv_t = 1.0 / temperature
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        inv_norm = norm.clamp(min=_NORMALIZE_EPS).reciprocal_()
        z = x * inv_norm
        # v_i = a_i / (t n_i), the weight of anchor i's positive logits
        positive_weight = anchor_weight * inv_t / num_positive.clamp(min=1)

        pair_weight = z.new_empty(z.shape[:-1] + z.shape[-2:-1])  # holds E first
        row_sum = z.new_empty(z.shape[:-1])
        all_valid = bool(valid.all())
        for chunk in _image_chunks(*valid.shape):
            chunk_pairs = pair_weight[chunk]
            # exp(z_i.z_a / t), the 1/t applied by the matmul itself (beta=0 ignores `input`)
            torch.baddbmm(chunk_pairs, z[chunk], z[chunk].mT, beta=0, alpha=inv_t, out=chunk_pairs).exp_()
            chunk_pairs.diagonal(dim1=1, dim2=2).zero_()
            if not all_valid:
                chunk_pairs.mul_(valid[chunk].unsqueeze(2) & valid[chunk].unsqueeze(1))
            chunk_sum = torch.sum(chunk_pairs, dim=2, out=row_sum[chunk])
            weight = torch.where(chunk_sum > 0, anchor_weight[chunk] * inv_t / chunk_sum, 0)
            chunk_pairs.mul_(weight.unsqueeze(2) + weight.unsqueeze(1))
            # + v_j z_j, one term of the positive gradient, rides on the zero diagonal
            chunk_pairs.diagonal(dim1=1, dim2=2).copy_(positive_weight[chunk])
        log_denominator = row_sum.clamp(min=torch.finfo(z.dtype).tiny).log_()

        flat_z, flat_group = z.view(-1, z.shape[-1]), group.flatten()
        region_sum = flat_z.new_zeros(num_groups, flat_z.shape[1]).index_add_(0, flat_group, flat_z)
        positive_sum = region_sum.index_select(0, flat_group).sub_(flat_z)  # sum_{p in P(i)} z_p
        positive_logits = torch.linalg.vecdot(positive_sum, flat_z).view_as(row_sum) * inv_t
        losses = log_denominator - positive_logits / num_positive.clamp(min=1)

        unclamped = norm > _NORMALIZE_EPS
        ctx.save_for_backward(z, inv_norm, unclamped, pair_weight, positive_sum, flat_group, positive_weight)
        ctx.embeddings_dtype, ctx.num_groups = embeddings.dtype, num_groups
        return (anchor_weight * losses).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        z, inv_norm, unclamped, pair_weight, positive_sum, flat_group, positive_weight = ctx.saved_tensors
        grad_z = torch.bmm(pair_weight, z)
        # Positive term -sum_i v_i z_i.(S_r(i) - z_i): its gradient for z_j is
        # -v_j (S_r(j) - z_j) - sum_{i in r(j)} v_i z_i + v_j z_j (the last one came with the bmm).
        flat_grad, flat_z = grad_z.view(-1, z.shape[-1]), z.view(-1, z.shape[-1])
        positive_weight = positive_weight.view(-1, 1)
        weighted_sum = flat_z.new_zeros(ctx.num_groups, flat_z.shape[1])
        weighted_sum.index_add_(0, flat_group, positive_weight * flat_z)
        flat_grad.addcmul_(positive_sum, positive_weight, value=-1).sub_(weighted_sum.index_select(0, flat_group))
        # F.normalize: dz/dx = (I - z z^T) / |x| (just 1 / eps for the clamped, tiny |x|)
        projection = torch.linalg.vecdot(flat_grad, flat_z).view_as(unclamped) * unclamped
        grad_z.addcmul_(z, projection, value=-1).mul_(inv_norm * grad.to(z.dtype))
        return grad_z.to(ctx.embeddings_dtype), None, None, None, None


def _image_chunks(batch: int, num_samples: int) -> list[slice]:
    """Slices of whole images with about _CHUNK_ELEMENTS (K, K) elements each (at least one image).

    Passes right after a chunk's matmul find it in cache, and a chunk-sized temporary is
    reused by the allocator without new page faults; chunks stay large enough for few, long,
    multi-threaded ops (many short ones stall whenever another process holds a core).
    """
    size = max(1, _CHUNK_ELEMENTS // max(1, num_samples * num_samples))
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]


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
    groups = _region_groups(region_ids)
    return _anchor_losses(scaled, embeddings, groups, log_denominator), groups[2] > 0


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


def _region_groups(region_ids: Tensor) -> tuple[Tensor, int, Tensor]:
    """Each sample's region as a group index numbered over the batch, the group count, and |P(i)|.

    Samples of one image with the same id share a group (ignored ids only ever share one
    with each other); ignored samples have 0 positives. Shape: (B, K) -> (B, K) long, int, (B, K).
    """
    # Sort each image, then number the runs of equal ids (a run never spans two images).
    sorted_ids, order = region_ids.sort(dim=1)
    new_run = torch.ones_like(sorted_ids, dtype=torch.bool)
    new_run[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    run = (new_run.flatten().cumsum(dim=0) - 1).view_as(order)
    group = torch.empty_like(order).scatter_(1, order, run)
    group_size = torch.bincount(group.flatten())
    return group, len(group_size), torch.where(region_ids >= 0, group_size[group] - 1, 0)


def _anchor_losses(
    scaled: Tensor, embeddings: Tensor, groups: tuple[Tensor, int, Tensor], log_denominator: Tensor
) -> Tensor:
    """l_i = log_denominator_i - mean positive logit_i.

    Shape: scaled = embeddings / t and embeddings (B, K, D), groups (from `_region_groups`),
    log_denominator (B, K) -> (B, K). Anchors without a
    positive get a finite, meaningless l_i; callers mask them out.
    """
    group, num_groups, num_positive = groups
    # sum_{p in P(i)} z_p = (sum of z over i's region) - z_i
    flat, flat_group = embeddings.reshape(-1, embeddings.shape[-1]), group.flatten()
    region_sum = flat.new_zeros(num_groups, flat.shape[1]).index_add(0, flat_group, flat)
    positive_sum = region_sum.index_select(0, flat_group).view_as(embeddings) - embeddings
    mean_positive_logit = (scaled * positive_sum).sum(dim=-1) / num_positive.clamp(min=1)
    return log_denominator - mean_positive_logit


def _anchor_weights(has_positive: Tensor, distributed: bool, dtype: torch.dtype) -> Tensor:
    """a_i such that sum_i a_i l_i is the mean of l_i over anchors with a positive (0 if none).

    Distributed: world_size / global_count, so that averaging over ranks (as DDP does with
    gradients) gives the global mean. Shape: (B, K) bool -> (B, K) of `dtype`.
    """
    count = has_positive.sum()
    scale = 1
    if distributed:
        dist.all_reduce(count)
        scale = dist.get_world_size()
    return has_positive.to(dtype) * (scale / count.clamp(min=1).to(dtype))


def _mean_over_anchors(losses: Tensor, has_positive: Tensor, distributed: bool) -> Tensor:
    """sum_i a_i l_i (`_anchor_weights`); a zero still in the graph when no anchor has a positive."""
    return (torch.where(has_positive, losses, 0) * _anchor_weights(has_positive, distributed, losses.dtype)).sum()
