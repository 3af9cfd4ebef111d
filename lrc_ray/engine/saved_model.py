"""Fine-tuned segmentation models as one self-describing file (STYLE.md item 11).

`model.pt` is a dict that `torch.load(path, weights_only=True)` reads without lrc_ray:

    kind            "lrc_ray.segmentation.v1"
    state_dict      the SegmentationNetwork's weights (CPU tensors)
    config          the resolved run config it was fine-tuned with (network, data, finetune, ...)
    labels          {"0": "background", "1": "spleen", ...}: output channel -> organ name
    preprocessing   how its input slices are made from a CT volume: orientation, spacing_mm,
                    size, window_hu (as `lrc-ray export` states them)
    lrc_ray_version, torch_version

`lrc-ray predict` needs nothing else. The file is written to a temporary name and renamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from lrc_ray import __version__
from lrc_ray.config import RunConfig, config_from_dict
from lrc_ray.data.slices import SliceParams
from lrc_ray.engine.checkpoint import CHECKPOINT_KIND, read_torch_file, save_torch_file
from lrc_ray.engine.export import preprocessing
from lrc_ray.errors import UserInputError
from lrc_ray.models.networks import SegmentationNetwork
from lrc_ray.storage import Location, location

MODEL_KIND = "lrc_ray.segmentation.v1"


@dataclass(frozen=True)
class SavedModel:
    """A loaded fine-tuned model (in eval mode, on the CPU) and what it needs to segment a scan."""

    model: SegmentationNetwork
    config: RunConfig
    labels: dict[int, str]  # output channel -> organ name (0: background)
    slicing: SliceParams  # the slice preparation of its training (window, spacing, size)


def slicing_for(config: RunConfig) -> SliceParams:
    """The slice preparation of a run config's data section (as the super-pixel stage makes slices)."""
    data = config.data
    return SliceParams(window_hu=tuple(data.window_hu), size=data.size, spacing_mm=data.spacing_mm)


def save_model(path: str | Path | Location, model: SegmentationNetwork, *, config: RunConfig,
               labels: dict[int, str]) -> Path | Location:
    """Write `model` with its config, label names and preprocessing to `path` (a local path or a
    URI), whole; returns it (a Path when local)."""
    return save_torch_file(
        path, MODEL_KIND,
        state_dict={name: value.detach().cpu() for name, value in model.state_dict().items()},
        config=config.to_dict(),
        labels={str(value): name for value, name in sorted(labels.items())},
        preprocessing=preprocessing(config),
    )


def load_model(path: str | Path | Location) -> SavedModel:
    """Read a file written by `save_model` and rebuild its network.

    Raises:
        UserInputError: one line naming the file when it is missing, not a torch file, not an
            lrc_ray segmentation model (e.g. a pre-training checkpoint), or its weights do not fit
            the network its config describes (another architecture or version).
    """
    path = location(path)
    if not path.is_file():
        raise UserInputError(f"{path}: model not found; expected the model.pt that `lrc-ray finetune --out DIR` writes")
    payload = read_torch_file(path, what="lrc_ray model")
    kind = payload.get("kind") if isinstance(payload, dict) else None
    if kind != MODEL_KIND:
        hint = "; it is a pre-training checkpoint: fine-tune it with `lrc-ray finetune --checkpoint`" if kind == CHECKPOINT_KIND else ""
        raise UserInputError(f"{path}: not an lrc_ray segmentation model (expected kind {MODEL_KIND}, got {kind!r}){hint}")
    try:
        config = config_from_dict(payload["config"], source=f"{path}: saved config")
        labels = {int(value): str(name) for value, name in payload["labels"].items()}
        model = SegmentationNetwork(config.network, num_classes=max(labels) + 1)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: load_state_dict's mismatch
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"{path}: its weights, config or labels do not fit an lrc_ray {__version__} "
                             f"segmentation model ({reason})") from None
    model.eval()
    return SavedModel(model=model, config=config, labels=labels, slicing=slicing_for(config))
