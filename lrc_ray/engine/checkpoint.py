"""Pre-trained checkpoints that carry their context (STYLE.md item 11).

A checkpoint holds the weights of the online pre-training network and what fine-tuning
needs to rebuild it: the resolved config (with the network parameters), the epoch, the
loss history, and the code and torch versions. Files are written to a temporary name
and renamed; loading uses `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lrc_ray import __version__
from lrc_ray.errors import UserInputError
from lrc_ray.storage import Location, local_input, local_output, location

CHECKPOINT_KIND = "lrc_ray.pretrained.v1"


def save_checkpoint(path: str | Path | Location, *, state_dict: dict, config: dict, epoch: int,
                    history: list[dict]) -> Path | Location:
    """Write the checkpoint whole at `path` (a local path or a URI); returns it (a Path when local)."""
    return save_torch_file(path, CHECKPOINT_KIND, state_dict=state_dict, config=config, epoch=epoch, history=history)


def save_torch_file(path: str | Path | Location, kind: str, **fields) -> Path | Location:
    """`torch.save` of `fields` tagged with `kind` and the code and torch versions, published whole
    at `path` (a local path or a URI); returns it (a Path when local)."""
    place = location(path)
    payload = {"kind": kind, **fields, "lrc_ray_version": __version__, "torch_version": str(torch.__version__)}
    with local_output(place) as tmp:
        torch.save(payload, tmp)
    return place.local_path if place.is_local else place


def load_checkpoint(path: str | Path | Location) -> dict:
    """Read a checkpoint written by `save_checkpoint` (a local path or a URI); a clear error for anything else."""
    place = location(path)
    if not place.is_file():
        raise UserInputError(f"{place}: checkpoint not found; make one with `lrc-ray pretrain`")
    payload = read_torch_file(place, what="lrc_ray checkpoint")
    if not isinstance(payload, dict) or payload.get("kind") != CHECKPOINT_KIND:
        raise UserInputError(f"{place}: not an lrc_ray pre-training checkpoint (expected kind {CHECKPOINT_KIND})")
    return payload


def read_torch_file(path: str | Path | Location, *, what: str) -> object:
    """`torch.load(path, weights_only=True)` on the CPU (a local path or a URI); a damaged or foreign
    file is one line naming it and `what` was expected (UserInputError)."""
    try:
        with local_input(location(path)) as local:
            return torch.load(local, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged or foreign files
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        # torch's unpickler puts the actual cause on an "... error: ..." line after its advice.
        reason = next((line for line in lines if "error:" in line.lower()), lines[0])
        raise UserInputError(f"{path}: not a readable {what} ({reason[:200]})") from None
