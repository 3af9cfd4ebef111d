"""MoCo v2 global loss: InfoNCE against a momentum encoder's key and a queue of negatives.

LRC_METHOD section 4, global branch. Per query q_b with positive key k_b (from the momentum
encoder) and the queue of negatives n_1..n_Q, all L2-normalised:

    logits_b = [q_b.k_b, q_b.n_1, ..., q_b.n_Q] / t      (positive at index 0)
    L        = mean_b cross_entropy(logits_b, 0)

One training step, as in MoCo: momentum_update(online, momentum_model, m) first; keys
k = momentum_model(view2) without grad; loss = moco_loss(q, k); moco_loss.dequeue_and_enqueue(k)
(before or after backward: forward works on a copy of the queue).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lrc_ray.losses.contrastive_sampling import _check_temperature

__all__ = ["MoCoV2Loss", "in_batch_top1", "moco_infonce_loss", "moco_logits", "momentum_update"]


def moco_logits(query: Tensor, key: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo logits, positive first.

    Shape: query (B, D), key (B, D), queue (Q, D) -> (B, 1 + Q). Query and key are
    L2-normalised here; the key is detached (it comes from the momentum encoder); the queue
    is used as given (`MoCoV2Loss` keeps it normalised).
    Raises ValueError on mismatched shapes (all shapes in the message) or a temperature that
    is not a finite number > 0.
    """
    _check_temperature(temperature)
    shapes = f"query {tuple(query.shape)}, key {tuple(key.shape)}, queue {tuple(queue.shape)}"
    if query.ndim != 2 or key.shape != query.shape or queue.ndim != 2 or queue.shape[1] != query.shape[1]:
        raise ValueError(f"expected query (B, D), key (B, D) and queue (Q, D) with one D; got {shapes}")
    query = F.normalize(query, dim=1)
    key = F.normalize(key.detach(), dim=1)
    positive = (query * key).sum(dim=1, keepdim=True)
    negative = query @ queue.detach().t()
    return torch.cat([positive, negative], dim=1) / temperature


def moco_infonce_loss(query: Tensor, key: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """InfoNCE of MoCo v2: cross-entropy of `moco_logits` with target 0.

    Shape: query (B, D), key (B, D), queue (Q, D) -> scalar. Raises as `moco_logits`.
    """
    logits = moco_logits(query, key, queue, temperature)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)


@torch.no_grad()
def in_batch_top1(query: Tensor, key: Tensor) -> Tensor:
    """How often a query's own key is strictly its most similar among the batch's keys.

    MoCo's training accuracy without the queue: a query can tell the queue's older keys apart by
    their age alone, so a collapsed branch (every slice the same embedding) still beats chance
    against the queue, not here. Chance is 1/B; a collapsed branch scores about that or less.
    Shape: query (B, D), key (B, D) -> scalar tensor.
    """
    similarity = F.normalize(query.detach(), dim=1) @ F.normalize(key.detach(), dim=1).t()
    own = similarity.diagonal()
    others = similarity.masked_fill(torch.eye(len(own), dtype=torch.bool, device=own.device), float("-inf"))
    return (own > others.amax(dim=1)).float().mean()


class MoCoV2Loss(nn.Module):
    """MoCo v2 loss holding the queue of negatives as buffers (`queue`, `queue_pointer`).

    Args:
        dim: embedding dimension D >= 1.
        queue_size: number of negatives Q >= 1. The default 4096 is smaller than MoCo's
            65536 because CT pre-training sets are a few thousand slices: a queue larger than
            the data set would hold stale copies of the current images as negatives.
        temperature: t_g > 0 (MoCo v2: 0.2).
        initial_queue: optional (Q, D) tensor to start the queue from (L2-normalised here);
            otherwise random normal vectors, normalised, from `torch.Generator` seeded
            with `seed`, so every rank starts from the same queue.
        seed: seed for the random initial queue.
        gather_distributed: when torch.distributed is initialised, `dequeue_and_enqueue`
            all-gathers the keys of every rank (rank order), so the queue stays identical
            on all ranks. Every rank must then pass the same number of keys.

    Shape: forward(query (B, D), key (B, D)) -> scalar.

    The queue is a ring buffer: the n (global) keys of a step go to rows
    (pointer + j) % Q, j = 0..n-1, and the pointer moves to (pointer + n) % Q, so Q need not
    be a multiple of the global batch. When n > Q only the last Q keys are kept.

    Raises ValueError for dim or queue_size < 1, a temperature that is not a finite number
    > 0, an initial_queue whose shape is not (queue_size, dim), and in forward /
    dequeue_and_enqueue for bad shapes.
    """

    queue: Tensor
    queue_pointer: Tensor

    def __init__(
        self,
        dim: int,
        queue_size: int = 4096,
        temperature: float = 0.2,
        initial_queue: Tensor | None = None,
        seed: int = 0,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("queue_size", queue_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        _check_temperature(temperature)
        if initial_queue is None:
            generator = torch.Generator().manual_seed(seed)
            initial_queue = torch.randn(queue_size, dim, generator=generator)
        elif tuple(initial_queue.shape) != (queue_size, dim):
            raise ValueError(
                f"initial_queue must have shape (queue_size, dim) = {(queue_size, dim)}, "
                f"got {tuple(initial_queue.shape)}"
            )
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed
        self.register_buffer("queue", F.normalize(initial_queue.detach().float(), dim=1).clone())
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        """Shape: query (B, D), key (B, D) -> scalar. Raises ValueError on bad shapes.

        Uses a copy of the queue, so `dequeue_and_enqueue` may run before `backward`.
        """
        return moco_infonce_loss(query, key, self.queue.clone().to(query.dtype), self.temperature)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: Tensor) -> None:
        """Write this step's keys (of all ranks, when distributed) into the ring buffer.

        Shape: keys (B, D), L2-normalised here. Raises ValueError when keys is not (B, D).
        """
        if keys.ndim != 2 or keys.shape[1] != self.queue.shape[1]:
            raise ValueError(f"keys must have shape (B, {self.queue.shape[1]}), got {tuple(keys.shape)}")
        keys = F.normalize(keys.detach().to(self.queue.dtype), dim=1)
        if self.gather_distributed and dist.is_available() and dist.is_initialized():
            gathered = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, keys.contiguous())
            keys = torch.cat(gathered, dim=0)
        queue_size, num_keys = self.queue.shape[0], keys.shape[0]
        rows = (self.queue_pointer + torch.arange(num_keys, device=keys.device)) % queue_size
        kept = slice(max(num_keys - queue_size, 0), num_keys)
        self.queue[rows[kept]] = keys[kept]
        self.queue_pointer.copy_((self.queue_pointer + num_keys) % queue_size)

    def extra_repr(self) -> str:
        return f"dim={self.queue.shape[1]}, queue_size={self.queue.shape[0]}, temperature={self.temperature}"


@torch.no_grad()
def momentum_update(online: nn.Module, momentum_model: nn.Module, momentum: float) -> None:
    """EMA of `online` into `momentum_model`: theta_m <- m * theta_m + (1 - m) * theta.

    Applies to all parameters and floating-point buffers (e.g. BatchNorm running
    statistics); integer buffers (e.g. `num_batches_tracked`) are copied. m = 0 copies.

    Raises ValueError when momentum is not in [0, 1) or the two modules' parameter or
    buffer names and shapes differ.
    """
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    pairs = []
    for kind, online_tensors, momentum_tensors in (
        ("parameters", dict(online.named_parameters()), dict(momentum_model.named_parameters())),
        ("buffers", dict(online.named_buffers()), dict(momentum_model.named_buffers())),
    ):
        if online_tensors.keys() != momentum_tensors.keys() or any(
            online_tensors[name].shape != momentum_tensors[name].shape for name in online_tensors
        ):
            raise ValueError(
                f"online and momentum models have different {kind}: "
                f"{[(n, tuple(t.shape)) for n, t in online_tensors.items()]} vs "
                f"{[(n, tuple(t.shape)) for n, t in momentum_tensors.items()]}"
            )
        pairs += [(online_tensors[name], momentum_tensors[name]) for name in online_tensors]
    floating = [(o, m) for o, m in pairs if m.dtype.is_floating_point and o.dtype == m.dtype]
    if floating:  # one multi-tensor kernel for all of them, not a launch per tensor
        torch._foreach_lerp_([m for _, m in floating], [o for o, _ in floating], 1.0 - momentum)
    for online_tensor, momentum_tensor in pairs:
        if not momentum_tensor.dtype.is_floating_point:
            momentum_tensor.copy_(online_tensor)
        elif online_tensor.dtype != momentum_tensor.dtype:
            momentum_tensor.lerp_(online_tensor.to(momentum_tensor.dtype), 1.0 - momentum)

