"""One typed, frozen run configuration, loaded from YAML and validated at load time.

Sections mirror the pipeline: `data` (where, which super-pixels), `augment`, `network`,
`pretrain` (method, losses), `finetune` (label fraction, evaluation). Unknown keys get a
"did you mean ...?" error; bad values name their dotted path (`pretrain.temperature`).
Derived values (e.g. the global batch) come from named functions, never silent rewrites.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from lrc_ray.atomic import atomic_write_path
from lrc_ray.errors import UserInputError

METHODS = ("scratch", "global", "lrc", "global+lrc", "supervised", "supervised+lrc")
NEGATIVES = ("image", "batch")  # where the contrastive sampling loss takes its negatives
LR_SCHEDULES = ("poly", "constant")  # fine-tuning learning-rate schedules
INPUT_MODES = ("auto", "device", "stream")  # where pre-training keeps its slices

# Normalisation layers of the network (`network.norm`; `NetworkParams.monai_norm` gives MONAI's spec).
# - group: GroupNorm, at most MAX_NORM_GROUPS groups (the largest count that divides every width).
#   Like instance norm it does not depend on the per-worker batch, which data-parallel training
#   makes small, and it leaks nothing between the images of a batch; unlike instance norm it keeps
#   each channel's per-image mean relative to its group, so a channel can say what a whole image
#   holds and the global (MoCo) branch's pooled feature can tell images apart.
# - instance: affine InstanceNorm, BasicUNet's own default. It removes every channel's per-image
#   mean, so the pooled bottleneck barely differs between images (bench/global_embedding.py).
# - batch: BatchNorm; refused by the MoCo methods (see RunConfig).
NORMS = ("group", "instance", "batch")
NORMS_WITHOUT_MOCO = ("batch",)
MAX_NORM_GROUPS = 8


@dataclass(frozen=True)
class AugmentParams:
    """Ranges from which each view draws its augmentation."""

    crop_scale: tuple[float, float] = (0.4, 1.0)  # area of the square crop, as a fraction of the slice
    rotate_degrees: float = 15.0  # angle drawn uniformly from [-rotate_degrees, rotate_degrees]
    flip_prob: float = 0.5  # per in-plane axis
    contrast_range: tuple[float, float] = (0.8, 1.2)  # factor on the distance to the view's mean
    gamma_range: tuple[float, float] = (0.7, 1.5)
    noise_std: float = 0.03  # Gaussian noise, in units of the [0, 1] window
    blur_prob: float = 0.3
    blur_sigma_range: tuple[float, float] = (0.5, 1.0)  # Gaussian blur sigma, output pixels

    def __post_init__(self) -> None:
        _check_range("crop_scale", self.crop_scale, low_open=0.0, high_closed=1.0)
        _check_number("rotate_degrees", self.rotate_degrees, 0.0, 180.0)
        _check_number("flip_prob", self.flip_prob, 0.0, 1.0)
        _check_range("contrast_range", self.contrast_range, low_open=0.0)
        _check_range("gamma_range", self.gamma_range, low_open=0.0)
        _check_number("noise_std", self.noise_std, 0.0, math.inf)
        _check_number("blur_prob", self.blur_prob, 0.0, 1.0)
        _check_range("blur_sigma_range", self.blur_sigma_range, low_open=0.0)
        # YAML gives lists; tuples keep the frozen config hashable.
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, list):
                object.__setattr__(self, spec.name, tuple(float(item) for item in value))


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(name: str, value: object, low: float, high: float) -> None:
    if not _is_finite_number(value) or not low <= value <= high:
        raise UserInputError(f"augment.{name}: expected a number in [{low}, {high}], got {value!r}")


def _check_range(name: str, value: object, *, low_open: float, high_closed: float = math.inf) -> None:
    """A (low, high) pair with low_open < low <= high <= high_closed."""
    is_pair = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
    if not is_pair or not all(_is_finite_number(v) for v in value):
        raise UserInputError(f"augment.{name}: expected a pair [low, high] of numbers, got {value!r}")
    low, high = value
    if not low_open < low <= high <= high_closed:
        upper = "" if math.isinf(high_closed) else f" <= {high_closed}"
        raise UserInputError(f"augment.{name}: expected {low_open} < low <= high{upper}, got [{low}, {high}]")


@dataclass(frozen=True)
class NetworkParams:
    """Sizes of the encoder-decoder and its projection heads (the `network` config section).

    Args:
        features: six BasicUNet widths: the five encoder levels (the fifth is the bottleneck
            width C5) and the last decoder level (C_last). A list is stored as a tuple.
            The small default suits CPU; BasicUNet's own is (32, 32, 64, 128, 256, 32).
        global_dim: size of the MoCo projection.
        global_hidden: hidden width of the MoCo projection MLP.
        local_dim: size D of the per-pixel embedding.
        norm: normalisation layer, one of `NORMS` (default group norm: see there).
        dropout: dropout probability in every BasicUNet convolution, in [0, 1).

    Raises UserInputError naming the field ("network.<field>") for a bad value.
    """

    features: tuple[int, int, int, int, int, int] = (16, 16, 32, 64, 128, 16)
    global_dim: int = 128
    global_hidden: int = 512
    local_dim: int = 128
    norm: str = "group"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        features = self.features
        if (
            isinstance(features, (str, bytes))
            or not isinstance(features, Sequence)
            or len(features) != 6
            or not all(_is_int(width) and width >= 1 for width in features)
        ):
            raise UserInputError(
                "network.features must be 6 integers >= 1 (five encoder widths, then the last "
                f"decoder width), got {features!r}"
            )
        if any(width < 2 for width in features[2:5]):
            raise UserInputError(
                f"network.features[2:5] must be >= 2 (the decoder halves them when upsampling), got {features!r}"
            )
        object.__setattr__(self, "features", tuple(features))
        for name in ("global_dim", "global_hidden", "local_dim"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise UserInputError(f"network.{name} must be an integer >= 1, got {value!r}")
        if self.norm not in NORMS:
            close = difflib.get_close_matches(str(self.norm), NORMS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserInputError(f"network.norm must be one of {list(NORMS)}, got {self.norm!r}{hint}")
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (0.0 <= dropout < 1.0):
            raise UserInputError(f"network.dropout must be a number in [0, 1), got {dropout!r}")

    @property
    def monai_norm(self) -> str | tuple[str, dict]:
        """MONAI's norm spec for `norm`, as `monai.networks.nets.BasicUNet(norm=...)` takes it."""
        if self.norm == "group":
            return ("group", {"num_groups": math.gcd(MAX_NORM_GROUPS, *self.features)})
        if self.norm == "instance":
            # Affine, as in BasicUNet's own default, so fine-tuning can rescale the pre-trained features.
            return ("instance", {"affine": True})
        return "batch"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = ".lrc_ray/data/synthetic_abdomen"
    cache_root: str = ".lrc_ray/superpixels"
    size: int = 96  # working slice size (pixels); must be divisible by 16 for the network
    # In-plane spacing (mm) every slice is resampled to before it is cropped or padded to `size`,
    # so an organ spans the same pixels on every scanner. None: 400 mm / size, a field that holds
    # an adult abdomen (1.5625 mm at size 256, 6.25 mm at the quick start's 64; see
    # lrc_ray.data.geometry). Set it when the data's spacing and the field to keep are known.
    spacing_mm: float | None = None
    window_hu: tuple[float, float] = (-175.0, 250.0)
    scale: float = 100.0
    sigma: float = 0.8
    min_size: int = 20
    validation_cases: int = 2  # labelled volumes held out for the probe, the search and the choice
    # Labelled volumes held out from everything but the finalists' report (their test Dice): the
    # number a chosen setting is reported with is then not the one it was chosen by.
    test_cases: int = 0
    split_seed: int = 0  # fixes the held-out volumes and label-fraction subsets across methods and seeds
    # A MONAI datalist (e.g. BTCV's dataset_0.json) to read the volumes from instead of data_dir's
    # dataset.json: the entries under `datalist_key`, paths relative to the datalist's directory.
    datalist: str | None = None
    datalist_key: str = "training"

    def __post_init__(self) -> None:
        require(self.size % 16 == 0 and self.size >= 32, "data.size", "a multiple of 16, at least 32", self.size)
        require(self.spacing_mm is None or self.spacing_mm > 0, "data.spacing_mm",
                "a positive number of mm, or null for 400 mm / data.size", self.spacing_mm)
        require(bool(self.datalist_key), "data.datalist_key", "a key of the datalist, e.g. training", self.datalist_key)
        require(self.validation_cases >= 1, "data.validation_cases", "at least 1", self.validation_cases)
        require(self.test_cases >= 0, "data.test_cases", "at least 0", self.test_cases)
        for name in ("scale", "sigma", "min_size"):
            require(getattr(self, name) > 0, f"data.{name}", "a positive number", getattr(self, name))


@dataclass(frozen=True)
class PretrainConfig:
    method: str = "global+lrc"
    epochs: int = 10
    batch_size: int = 16  # per worker
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.1  # contrastive sampling loss
    regions_per_image: int = 16  # S
    pixels_per_region: int = 8  # M
    negatives: str = "image"
    w_global: float = 1.0
    w_local: float = 1.0
    w_supervised: float = 1.0
    # The supervised methods pre-train on this labelled data set (MSD layout, super-pixels cached
    # with the run's `data` settings). It must not be the fine-tuning data: its labels would
    # leak past the label fraction.
    source_data_dir: str | None = None
    moco_momentum: float = 0.99
    moco_temperature: float = 0.2
    queue_size: int = 1024
    min_regions: int = 2  # slices with fewer regions are skipped
    # Where pre-training keeps its slices (engine/input_path.py): "device" holds them all on the
    # training device, "stream" reads each worker's split every epoch, "auto" holds them when they
    # take at most half of the device's free memory.
    input_mode: str = "auto"
    # Speed options of the model step (bench/gpu_check.py measures them; the loss is the same):
    # channels-last memory layout for the convolutions, and torch.compile of the encoder-decoders.
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        require_choice(self.method, METHODS, "pretrain.method")
        require_choice(self.negatives, NEGATIVES, "pretrain.negatives")
        require(self.epochs >= 0, "pretrain.epochs", "at least 0", self.epochs)
        require(self.batch_size >= 2, "pretrain.batch_size", "at least 2", self.batch_size)
        require(self.lr > 0, "pretrain.lr", "a positive number", self.lr)
        require(self.weight_decay >= 0, "pretrain.weight_decay", "at least 0", self.weight_decay)
        require(self.temperature > 0, "pretrain.temperature", "a positive number", self.temperature)
        require(self.moco_temperature > 0, "pretrain.moco_temperature", "a positive number", self.moco_temperature)
        require(self.regions_per_image >= 1, "pretrain.regions_per_image", "at least 1", self.regions_per_image)
        require(self.pixels_per_region >= 1, "pretrain.pixels_per_region", "at least 1", self.pixels_per_region)
        require(self.w_global >= 0, "pretrain.w_global", "a non-negative weight", self.w_global)
        require(self.w_local >= 0, "pretrain.w_local", "a non-negative weight", self.w_local)
        require(self.w_supervised >= 0, "pretrain.w_supervised", "a non-negative weight", self.w_supervised)
        require(
            not self.uses_supervised or bool(self.source_data_dir),
            "pretrain.source_data_dir",
            f"a labelled source data set for method '{self.method}' (e.g. one made by `lrc-ray data synth --seed 1`)",
            self.source_data_dir,
        )
        require(0 <= self.moco_momentum < 1, "pretrain.moco_momentum", "in [0, 1)", self.moco_momentum)
        require(self.queue_size >= 1, "pretrain.queue_size", "at least 1", self.queue_size)
        require(self.min_regions >= 1, "pretrain.min_regions", "at least 1", self.min_regions)
        require_choice(self.input_mode, INPUT_MODES, "pretrain.input_mode")

    @property
    def uses_global(self) -> bool:
        return self.method in ("global", "global+lrc") and self.w_global > 0

    @property
    def uses_local(self) -> bool:
        return self.method.endswith("lrc") and self.w_local > 0

    @property
    def uses_supervised(self) -> bool:
        return self.method.startswith("supervised")


@dataclass(frozen=True)
class FinetuneConfig:
    label_fraction: float = 0.5
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    # The backbone's learning rate is lr * backbone_lr_scale: below 1 keeps more of a
    # pre-trained start while the new head learns at the full rate.
    backbone_lr_scale: float = 1.0
    # Epochs that train only the new head on the frozen backbone, at head_lr, before the
    # `epochs` of full fine-tuning (linear probing, then fine-tuning).
    head_epochs: int = 0
    head_lr: float = 1e-2
    # "poly": nnU-Net's decay, lr * (1 - epoch / epochs) ** 0.9 over the full fine-tuning: a run
    # ends at small steps instead of wherever a constant-rate trajectory happens to be, so the
    # Dice of a setting moves less between seeds (it pairs with a higher lr for short runs).
    lr_schedule: str = "constant"
    # Optimizer steps per epoch, each a batch drawn at random (with replacement) from the training
    # volumes' slices: nnU-Net's fixed iteration budget, so a smaller label fraction trains as
    # long as a larger one instead of for fewer steps. None: one pass over the slices per epoch.
    steps_per_epoch: int | None = None
    weight_decay: float = 1e-4
    augment: bool = True  # a small rotation of each labelled slice (and the flips below, when on)
    # Flips of the labelled slices, each with probability 0.5 when on. Off by default: supine CT is
    # never seen upside down, and a left-right flip swaps left and right organs (the kidneys) while
    # their labels keep the side. Turn left-right on only when no label has a side.
    flip_anterior_posterior: bool = False
    flip_left_right: bool = False

    def __post_init__(self) -> None:
        require(0 < self.label_fraction <= 1, "finetune.label_fraction", "in (0, 1]", self.label_fraction)
        require(self.epochs >= 1, "finetune.epochs", "at least 1", self.epochs)
        require(self.batch_size >= 1, "finetune.batch_size", "at least 1", self.batch_size)
        require(self.lr > 0, "finetune.lr", "a positive number", self.lr)
        require(self.head_epochs >= 0, "finetune.head_epochs", "at least 0", self.head_epochs)
        require(self.head_lr > 0, "finetune.head_lr", "a positive number", self.head_lr)
        require(0 < self.backbone_lr_scale <= 1, "finetune.backbone_lr_scale", "in (0, 1]", self.backbone_lr_scale)
        require_choice(self.lr_schedule, LR_SCHEDULES, "finetune.lr_schedule")
        require(self.steps_per_epoch is None or self.steps_per_epoch >= 1, "finetune.steps_per_epoch",
                "at least 1, or null for one pass over the slices", self.steps_per_epoch)
        require(self.weight_decay >= 0, "finetune.weight_decay", "at least 0", self.weight_decay)
        for name in ("flip_anterior_posterior", "flip_left_right"):
            require(isinstance(getattr(self, name), bool), f"finetune.{name}", "true or false", getattr(self, name))
            require(self.augment or not getattr(self, name), f"finetune.{name}",
                    "false when finetune.augment is false (flips are part of the augmentation)", getattr(self, name))


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentParams = field(default_factory=AugmentParams)
    network: NetworkParams = field(default_factory=NetworkParams)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        # MoCo with BatchNorm needs shuffle-BN (or SyncBN plus a per-rank shuffle), which this
        # project does not implement: without it a query and its positive key are normalised with
        # statistics of the same batch, a signature the queue's older keys lack, and MoCo learns
        # that signature instead of the images (He et al. 2020, section 3.3).
        if self.pretrain.uses_global and self.network.norm in NORMS_WITHOUT_MOCO:
            allowed = ", ".join(repr(norm) for norm in NORMS if norm not in NORMS_WITHOUT_MOCO)
            raise UserInputError(
                f"network.norm: {self.network.norm!r} cannot be used with pretrain.method {self.pretrain.method!r} "
                f"(MoCo without shuffle-BN: batch statistics leak from each query to its key); use one of {allowed}"
            )

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def replace(self, **sections: dict) -> "RunConfig":
        """A copy with some fields changed: `config.replace(pretrain={"epochs": 3})`."""
        merged = self.to_dict()
        for section, values in sections.items():
            if isinstance(merged.get(section), dict):
                merged[section] = {**merged[section], **values}
            else:
                merged[section] = values
        return config_from_dict(merged)


def global_batch_size(per_worker_batch: int, workers: int) -> int:
    """Samples per optimiser step across data-parallel workers."""
    return per_worker_batch * max(1, workers)


def config_from_dict(raw: dict[str, Any] | None, *, source: str = "config") -> RunConfig:
    """Build and validate a RunConfig from nested plain values (as parsed from YAML)."""
    try:
        return build_dataclass(RunConfig, raw or {}, prefix="")
    except UserInputError as exc:
        raise UserInputError(f"{source}: {exc}") from None


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserInputError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise UserInputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if raw is not None and not isinstance(raw, dict):
        raise UserInputError(f"{path}: expected a mapping of sections (data, pretrain, ...) at the top level")
    return config_from_dict(raw, source=str(path))


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write a config as YAML that `load_config` reads back unchanged (temp file, then rename)."""
    with atomic_write_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def build_dataclass(cls: type, raw: Any, *, prefix: str) -> Any:
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise UserInputError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; expected one of {', '.join(names)}"
            raise UserInputError(f"unknown key '{prefix}{key}'{hint}")
        values[key] = _convert(hints[key], value, f"{prefix}{key}")
    return cls(**values)


def _convert(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, prefix=f"{path}.")
    origin, args = get_origin(hint), get_args(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise UserInputError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        item_types = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        return tuple(_convert(t, v, path) for t, v in zip(item_types, value))
    if args and type(None) in args:  # Optional[X]
        return None if value is None else _convert(next(a for a in args if a is not type(None)), value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise UserInputError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise UserInputError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserInputError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserInputError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def require(ok: bool, path: str, expected: str, value: Any) -> None:
    if not ok:
        raise UserInputError(f"{path}: expected {expected}, got {value!r}")


def require_choice(value: str, choices: tuple[str, ...], path: str) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserInputError(f"{path}: '{value}' is not one of {', '.join(choices)}{hint}")


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively, so YAML holds plain lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
