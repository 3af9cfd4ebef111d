"""The pre-trained encoder-decoder as a plain MONAI `BasicUNet`, usable without lrc_ray.

`export_basic_unet` writes into a directory:

    basic_unet.pt     a `state_dict` of `monai.networks.nets.BasicUNet(**constructor)`; it loads
                      with `strict=True`
    basic_unet.yaml   `constructor` (BasicUNet's keyword arguments), `preprocessing` (how slices
                      were made for pre-training) and `source` (the checkpoint it came from);
                      written last, so its presence means the export is complete

lrc_ray's backbone is BasicUNet without `final_conv`. The export keeps BasicUNet's shape by
setting `out_channels` to the last decoder width C_last and `final_conv` to the identity
(weight I, bias 0): the exported network outputs the pre-trained decoder features
(B, C_last, H, W) themselves. For a segmentation task replace it, e.g.
`net.final_conv = torch.nn.Conv2d(C_last, num_classes, kernel_size=1)`.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import yaml
from monai.networks.nets import BasicUNet

from lrc_ray import __version__
from lrc_ray.atomic import atomic_write_path
from lrc_ray.config import RunConfig, config_from_dict
from lrc_ray.config import _plain as plain_values
from lrc_ray.data.slices import SliceParams
from lrc_ray.engine.checkpoint import load_checkpoint
from lrc_ray.errors import UserInputError
from lrc_ray.models.networks import SegmentationNetwork

WEIGHTS_FILE = "basic_unet.pt"
SPEC_FILE = "basic_unet.yaml"
_BACKBONE = "backbone."
# How lrc_ray's slices are laid out (lrc_ray.data.nifti), for users who prepare their own.
ORIENTATION = (
    "axial slices; rows run anterior -> posterior, columns patient right -> left (radiological display): "
    "for a volume in nibabel's closest canonical (RAS+) orientation, slice k is volume[::-1, ::-1, k].T"
)


def export_basic_unet(checkpoint: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write a pre-training checkpoint's encoder-decoder as a MONAI BasicUNet; returns the two paths.

    Raises:
        UserInputError: one line naming the checkpoint when it is missing, corrupt, not an lrc_ray
            pre-training checkpoint, from another version, or its weights do not fit its network;
            naming `out_dir` when it is a file. Nothing is written then.
    """
    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir)
    payload = load_checkpoint(checkpoint)
    config = _saved_config(payload, checkpoint)
    constructor = basic_unet_arguments(config)
    state = _basic_unet_state(payload.get("state_dict"), config, constructor, checkpoint)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"--out {out_dir}: exists and is not a directory")
    spec = {
        "constructor": constructor,
        "preprocessing": preprocessing(config),
        "source": {
            "checkpoint": str(checkpoint.resolve()),
            "method": config.pretrain.method,
            "epoch": payload.get("epoch"),
            "lrc_ray_version": payload.get("lrc_ray_version"),
            "exported_by": f"lrc_ray {__version__}",
        },
        "final_conv": (
            f"identity ({constructor['out_channels']} -> {constructor['out_channels']} channels): the output is the "
            "pre-trained decoder feature map; replace final_conv for a task"
        ),
    }
    weights, spec_path = out_dir / WEIGHTS_FILE, out_dir / SPEC_FILE
    with atomic_write_path(weights) as tmp:
        torch.save(state, tmp)
    with atomic_write_path(spec_path) as tmp:
        tmp.write_text(yaml.safe_dump(spec, sort_keys=False))
    return {"weights": weights, "spec": spec_path}


def basic_unet_arguments(config: RunConfig) -> dict:
    """BasicUNet's keyword arguments for the encoder-decoder of `config` (plain YAML values).

    Those lrc_ray leaves at BasicUNet's defaults (act, bias, upsample) are read from BasicUNet
    itself, so the file states what the pre-trained network was built with.
    """
    defaults = {name: value.default for name, value in inspect.signature(BasicUNet).parameters.items()}
    network = config.network
    return plain_values({
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": network.features[5],
        "features": network.features,
        "act": defaults["act"],
        "norm": network.monai_norm,
        "bias": defaults["bias"],
        "dropout": network.dropout,
        "upsample": defaults["upsample"],
    })


def preprocessing(config: RunConfig) -> dict:
    """How pre-training made its input slices from CT volumes (the same for any later use)."""
    data = config.data
    spacing = SliceParams(window_hu=data.window_hu, size=data.size, spacing_mm=data.spacing_mm).working_spacing_mm
    return {
        "orientation": ORIENTATION,
        "spacing_mm": float(spacing),
        "size": data.size,
        "fit": "resample to spacing_mm (linear, anti-aliased), then centre-crop or pad with air to size x size",
        "window_hu": [float(value) for value in data.window_hu],
        "intensity": "(clip(HU, low, high) - low) / (high - low), in [0, 1]",
        "input_shape": "(B, 1, H, W), H and W multiples of 16",
    }


def _saved_config(payload: dict, checkpoint: Path) -> RunConfig:
    raw = payload.get("config")
    if not isinstance(raw, dict):
        raise UserInputError(f"{checkpoint}: holds no run config; expected a checkpoint written by `lrc-ray pretrain`")
    try:
        return config_from_dict(raw, source=f"{checkpoint}: saved config")
    except UserInputError as exc:
        raise UserInputError(f"{exc} (a checkpoint of another lrc_ray version?)") from None


def _basic_unet_state(state_dict: object, config: RunConfig, constructor: dict, checkpoint: Path) -> dict:
    """The checkpoint's backbone weights under BasicUNet's names, plus the identity final_conv,
    checked by loading them into a BasicUNet with strict=True."""
    if not isinstance(state_dict, dict):
        raise UserInputError(f"{checkpoint}: holds no state_dict; expected a checkpoint written by `lrc-ray pretrain`")
    model = SegmentationNetwork(config.network, num_classes=1)
    try:
        model.load_backbone_state(state_dict)
    except UserInputError as exc:
        reason = str(exc).removeprefix("checkpoint: ")
        raise UserInputError(f"{checkpoint}: {reason} (expected the encoder-decoder of its own saved config)") from None
    state = dict(model.backbone.state_dict())
    channels = constructor["out_channels"]
    state["final_conv.weight"] = torch.eye(channels).reshape(channels, channels, 1, 1)
    state["final_conv.bias"] = torch.zeros(channels)
    network = BasicUNet(**constructor)
    network.load_state_dict(state, strict=True)  # the backbone is BasicUNet's own modules, so the names match
    return network.state_dict()
