"""A built-in synthetic abdominal CT: the default data set, since no real data ship with lrc_ray.

Each case is a contrast-enhanced abdominal CT series (bright aorta and renal cortex) in display order
(z: inferior -> superior, row: anterior -> posterior, col: patient right -> patient left).
Anatomy is drawn as implicit shapes on a coordinate grid in a "reference abdomen" (mm, x to
the patient's left, y posterior, origin at the centre of the abdominal wall), which each case
stretches, shifts and deforms. Organ cross-sections are smooth functions of a normalised
height t (0 = lowest slice, 1 = highest), so every case spans the same anatomy (from below
the kidneys up to the liver dome) whatever its slice count and spacing.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.ndimage import gaussian_filter

from lrc_ray.atomic import write_json_atomic
from lrc_ray.data.nifti import write_volume
from lrc_ray.errors import UserInputError

logger = logging.getLogger(__name__)

ORGAN_LABELS: dict[int, str] = {
    0: "background",
    1: "spleen",
    2: "right_kidney",
    3: "left_kidney",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    7: "aorta",
    8: "inferior_vena_cava",
    9: "pancreas",
}
_LABEL_ID = {name: label for label, name in ORGAN_LABELS.items()}

# Per-case HU ranges; one value per tissue and case is drawn uniformly from each.
_TISSUE_HU = {
    "fat": (-115.0, -85.0),
    "skin": (10.0, 40.0),
    "muscle": (40.0, 60.0),
    "bowel": (10.0, 35.0),
    "cortical_bone": (700.0, 1000.0),
    "trabecular_bone": (200.0, 300.0),
    "disc": (70.0, 100.0),
    "spinal_canal": (10.0, 30.0),
    "table": (50.0, 200.0),
    "liver": (55.0, 65.0),
    "spleen": (45.0, 50.0),
    "kidney_cortex": (140.0, 170.0),
    "stomach_wall": (35.0, 45.0),
    "stomach_fluid": (0.0, 15.0),
    "aorta": (150.0, 200.0),
    "inferior_vena_cava": (100.0, 140.0),
    "pancreas": (35.0, 45.0),
    "gallbladder": (0.0, 20.0),
}
_AIR_HU = -1000.0

# Reference abdomen (mm). Abdominal wall muscle: outer and inner semi-axes.
_WALL_OUTER = (142.0, 102.0)
_WALL_INNER = (130.0, 90.0)
# Organs drawn as deformed ellipses (the liver as two lobes); _PAINT_ORDER says which wins where they touch.
# t_extent = (centre, half-height) in normalised height; None: present in every slice.
# drift: how far (mm) the centre moves per unit of t, e.g. the liver tip runs antero-laterally.
_ORGAN_SHAPES = {
    "stomach": dict(center=(55, -35), semi_axes=(46, 38), t_extent=(0.85, 0.4), drift=(60, 30)),
    "spleen": dict(center=(78, 48), semi_axes=(52, 30), angle=-0.9, t_extent=(0.8, 0.35)),
    "liver_right_lobe": dict(center=(-70, -5), semi_axes=(80, 95), t_extent=(1.0, 0.78), drift=(30, 20)),
    "liver_left_lobe": dict(center=(10, -60), semi_axes=(55, 28), t_extent=(1.0, 0.45), drift=(40, 0)),
    "gallbladder": dict(center=(-50, -55), semi_axes=(16, 22), angle=0.5, t_extent=(0.42, 0.1)),
    "right_kidney": dict(center=(-68, 42), semi_axes=(30, 22), angle=0.6, t_extent=(0.36, 0.25)),
    "left_kidney": dict(center=(68, 42), semi_axes=(30, 22), angle=-0.6, t_extent=(0.42, 0.25)),
    "inferior_vena_cava": dict(center=(-22, 8), semi_axes=(13, 10), wobble=0.03, drift=(0, -15)),
    "aorta": dict(center=(12, 5), semi_axes=(12.5, 12.5), wobble=0.02, jitter=1.5),
}
_PAINT_ORDER = (
    "stomach", "spleen", "liver", "gallbladder", "right_kidney", "left_kidney", "pancreas",
    "inferior_vena_cava", "aorta",
)
# Rib cross-sections on the left wall (mirrored on the right): angle on the wall ellipse
# (radians, positive = posterior) and the lowest t where the rib shows; anterior ribs sit higher.
_RIBS = ((0.9, 0.3), (0.4, 0.45), (-0.1, 0.6), (-0.6, 0.75))


@dataclass(frozen=True)
class SyntheticCase:
    """One synthetic CT series in display order. Shapes: (Z, H, W); `spacing_mm` is (z, row, col)."""

    hu: np.ndarray
    labels: np.ndarray
    spacing_mm: tuple[float, float, float]


class _Grid(NamedTuple):
    """Reference-abdomen coordinates (mm) of every voxel, broadcastable to (Z, H, W)."""

    x: np.ndarray  # (Z, 1, W), toward the patient's left
    y: np.ndarray  # (Z, H, 1), posterior
    t: np.ndarray  # (Z, 1, 1), normalised height, 0 inferior .. 1 superior


class _Shape(NamedTuple):
    """A deformed ellipse's implicit function and its own coordinates, shaped like the volume."""

    radius: np.ndarray  # normalised: < 1 inside
    u: np.ndarray  # position along the first semi-axis, in units of the current cross-section
    v: np.ndarray  # same along the second semi-axis
    profile: np.ndarray  # (Z, 1, 1) cross-section scale along z, 0 where the organ is absent


def generate_case(
    rng: np.random.Generator, *, size: int = 96, slices: int = 24, field_of_view_mm: float | None = None
) -> SyntheticCase:
    """Draw one synthetic abdominal CT series of `slices` axial slices of `size` x `size` pixels.

    The field of view is fitted to the patient (358-512 mm, as scanners do) unless
    `field_of_view_mm` fixes it; the in-plane spacing is the field over `size`. Anatomy is drawn
    in mm, so organs keep their physical size at any spacing (the texture fields draw a number of
    random values that depends on the grid, so one seed gives other patients at other spacings).
    Raises UserInputError when size < 32, slices < 4 or the field is outside [150, 1000] mm.
    """
    _check_int("--size", size, 32)
    _check_int("--slices", slices, 4)
    _check_field_of_view(field_of_view_mm)
    tissue_hu = {name: rng.uniform(low, high) for name, (low, high) in _TISSUE_HU.items()}
    grid, spacing_mm, body = _draw_grid_and_body(rng, size, slices, field_of_view_mm)
    hu, cavity = _paint_body_wall_and_skeleton(rng, grid, body, tissue_hu)
    shape = hu.shape
    loops = _smooth_noise(rng, shape, _cells(grid, spacing_mm, in_plane_mm=18, height=0.12))
    mottle = _smooth_noise(rng, shape, _cells(grid, spacing_mm, in_plane_mm=5, height=0.05))
    texture = _smooth_noise(rng, shape, _cells(grid, spacing_mm, in_plane_mm=3, height=0.03))
    _paint_bowel(hu, cavity, loops, mottle, tissue_hu)
    labels = _paint_organs(rng, grid, hu, cavity, mottle, tissue_hu)
    hu = _add_scanner_effects(rng, hu, body, texture, spacing_mm)
    return SyntheticCase(hu=hu, labels=labels, spacing_mm=spacing_mm)


def write_synthetic_dataset(
    out_dir: str | Path,
    *,
    cases: int = 6,
    unlabeled: int = 4,
    size: int = 96,
    slices: int = 24,
    seed: int = 0,
    field_of_view_mm: float | None = None,
) -> Path:
    """Write a synthetic data set in Medical Segmentation Decathlon layout and return `out_dir`.

    Labelled cases go to imagesTr/ and labelsTr/, pre-training volumes to imagesUnlabeled/;
    dataset.json is written last, so its presence means the set is complete. Case i depends
    only on (seed, i), not on how many cases are made. Raises UserInputError for a bad count
    or size, or when `out_dir` exists and is not empty (nothing is ever overwritten).
    """
    for option, value, minimum in (
        ("--cases", cases, 1),
        ("--unlabeled", unlabeled, 0),
        ("--size", size, 32),
        ("--slices", slices, 4),
        ("--seed", seed, 0),
    ):
        _check_int(option, value, minimum)
    _check_field_of_view(field_of_view_mm)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserInputError(f"{out_dir} exists and is not empty; choose a new directory")
    labelled_seeds, unlabeled_seeds = np.random.SeedSequence(seed).spawn(2)
    for folder in ("imagesTr", "labelsTr", "imagesUnlabeled"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)

    training = []
    for index, case_seed in enumerate(labelled_seeds.spawn(cases)):
        case = generate_case(np.random.default_rng(case_seed), size=size, slices=slices,
                             field_of_view_mm=field_of_view_mm)
        name = f"case_{index:03d}.nii.gz"
        write_volume(out_dir / "imagesTr" / name, case.hu, case.spacing_mm)
        write_volume(out_dir / "labelsTr" / name, case.labels, case.spacing_mm)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    pretraining = []
    for index, case_seed in enumerate(unlabeled_seeds.spawn(unlabeled)):
        case = generate_case(np.random.default_rng(case_seed), size=size, slices=slices,
                             field_of_view_mm=field_of_view_mm)
        name = f"unlabeled_{index:03d}.nii.gz"
        write_volume(out_dir / "imagesUnlabeled" / name, case.hu, case.spacing_mm)
        pretraining.append({"image": f"./imagesUnlabeled/{name}"})

    manifest = {
        "name": "lrc_ray synthetic abdomen",
        "description": f"Synthetic abdominal CT made by lrc_ray (seed {seed}, {size}x{size}x{slices} voxels, "
        + (f"{field_of_view_mm:g} mm field)" if field_of_view_mm else "field fitted to each patient)"),
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(label): name for label, name in ORGAN_LABELS.items()},
        "numTraining": len(training),
        "training": training,
        "numUnlabeled": len(pretraining),
        "unlabeled": pretraining,
    }
    write_json_atomic(out_dir / "dataset.json", manifest)
    logger.info("wrote %d labelled and %d unlabelled synthetic cases to %s", cases, unlabeled, out_dir)
    return out_dir


def _check_int(option: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UserInputError(f"{option}: expected an integer >= {minimum}, got {value!r}")


def _check_field_of_view(field_of_view_mm: float | None) -> None:
    if field_of_view_mm is None:
        return
    if isinstance(field_of_view_mm, bool) or not isinstance(field_of_view_mm, numbers.Real) \
            or not 150 <= field_of_view_mm <= 1000:
        raise UserInputError(f"--field-of-view: expected a field of view in mm in [150, 1000], got {field_of_view_mm!r}")


def _draw_grid_and_body(rng: np.random.Generator, size: int, slices: int, field_of_view_mm: float | None):
    """Per-case geometry: the voxel grid in reference-abdomen mm, the spacing, and the body mask."""
    stretch = rng.uniform(0.9, 1.1, 2)  # abdomen width and depth relative to the reference
    fat_lateral, fat_anterior, fat_posterior = rng.uniform(8, 45), rng.uniform(8, 35), rng.uniform(5, 15)
    # Scanners fit the field of view to the patient: ~0.7-1.0 mm per pixel at 512, whatever `size` is.
    body_half_width = stretch[0] * (_WALL_OUTER[0] + 1.15 * fat_lateral)
    pixel_mm = np.clip(body_half_width / (256 * rng.uniform(0.66, 0.82)), 0.7, 1.0) * 512 / size
    if field_of_view_mm is not None:  # drawn above all the same, so the rest of the case is unchanged
        pixel_mm = field_of_view_mm / size
    spacing_mm = (round(rng.uniform(2.5, 5.0), 3), round(float(pixel_mm), 3), round(float(pixel_mm), 3))

    t = np.linspace(rng.uniform(0.0, 0.04), rng.uniform(0.96, 1.0), slices, dtype=np.float32)[:, None, None]
    # The abdomen's width and depth change slowly along z.
    z_scale = 1 + 0.03 * np.sin(2 * np.pi * t + rng.uniform(0, 2 * np.pi))
    offset = rng.normal(0, 6, 2)  # the patient is never exactly centred
    centred = (np.arange(size, dtype=np.float32) - (size - 1) / 2) * spacing_mm[1]
    x = (centred[None, None, :] - offset[0]) / (stretch[0] * z_scale)
    y = (centred[None, :, None] - offset[1]) / (stretch[1] * z_scale)
    grid = _Grid(x.astype(np.float32), y.astype(np.float32), t)

    fat_scale = 1 + 0.2 * (0.5 - t)  # more subcutaneous fat lower down
    semi_axes = (
        _WALL_OUTER[0] + fat_lateral * fat_scale,
        _WALL_OUTER[1] + 0.5 * (fat_anterior + fat_posterior) * fat_scale,
    )
    center = (0.0, 0.5 * (fat_posterior - fat_anterior) * fat_scale)
    body = _organ(rng, grid, center, semi_axes, wobble=0.03, jitter=0.0).radius
    return grid, spacing_mm, body


def _paint_body_wall_and_skeleton(rng, grid: _Grid, body: np.ndarray, tissue_hu: dict):
    """HU of skin, fat, wall and back muscles, spine, ribs and the CT table; and the visceral cavity mask."""
    hu = np.full(body.shape, tissue_hu["skin"], dtype=np.float32)
    hu[body < 1 - 2.5 / _WALL_OUTER[0]] = tissue_hu["fat"]
    hu[_ellipse(grid, (0, 0), _WALL_OUTER) < 1] = tissue_hu["muscle"]
    cavity = _ellipse(grid, (0, 0), _WALL_INNER) < 1
    hu[cavity] = tissue_hu["fat"] + 5  # visceral fat; bowel and organs are painted into it later

    # The psoas muscles start at the upper lumbar spine and thicken downwards.
    psoas_scale = np.maximum(1.2 - 1.5 * grid.t, 0.01)
    back_muscles = (((30, 80), (24, 18)), ((36 + 6 * psoas_scale, 36), (12 * psoas_scale, 14 * psoas_scale)))
    musculoskeletal = np.zeros(body.shape, dtype=bool)
    for side in (-1, 1):
        for (center_x, center_y), semi_axes in back_muscles:  # paraspinal, psoas
            muscle = _ellipse(grid, (side * center_x, center_y), semi_axes) < 1
            hu[muscle] = tissue_hu["muscle"]
            musculoskeletal |= muscle

    # Vertebrae with discs between them (about five levels over the abdomen).
    in_disc = (grid.t * 5 + rng.uniform(0, 1)) % 1 < 0.2
    vertebral_body = _ellipse(grid, (0, 38), (20, 17))
    arch = _ellipse(grid, (0, 66), (17, 15)) < 1
    transverse = (_ellipse(grid, (side * 26, 60), (12, 4), angle=side * 0.3) < 1 for side in (-1, 1))
    processes = (_ellipse(grid, (0, 86), (4.5, 13)) < 1) | (~in_disc & np.logical_or(*transverse))
    hu[arch | processes] = tissue_hu["cortical_bone"]
    hu[_ellipse(grid, (0, 64), (9, 8)) < 1] = tissue_hu["spinal_canal"]
    hu[vertebral_body < 1] = tissue_hu["cortical_bone"]
    hu[(vertebral_body < 0.83) & ~in_disc] = tissue_hu["trabecular_bone"]
    hu[(vertebral_body < 1) & in_disc] = tissue_hu["disc"]
    musculoskeletal |= (vertebral_body < 1) | arch | processes

    # Ribs run obliquely, so their cross-sections slide along the wall from slice to slice.
    wall_mid = np.add(_WALL_INNER, _WALL_OUTER) / 2
    for side in (-1, 1):
        for angle0, t_lowest in _RIBS:
            angle = angle0 + 0.4 * (grid.t - t_lowest)
            center = (side * wall_mid[0] * np.cos(angle), wall_mid[1] * np.sin(angle))
            tangent = side * np.arctan2(wall_mid[1] * np.cos(angle), -wall_mid[0] * np.sin(angle))
            rib = np.where(grid.t >= t_lowest, _ellipse(grid, center, (7, 4.5), angle=tangent), np.inf)
            hu[rib < 1] = tissue_hu["cortical_bone"]
            hu[rib < 0.55] = tissue_hu["trabecular_bone"]

    hu[body >= 1] = _AIR_HU
    # A curved table under the back; it makes "largest connected component" body masks matter.
    table_top = _WALL_OUTER[1] + 30 - grid.x**2 / 900
    table = (body >= 1) & (grid.y > table_top) & (grid.y < table_top + 6) & (np.abs(grid.x) < 190)
    hu[table] = tissue_hu["table"]
    return hu, cavity & ~musculoskeletal


def _paint_bowel(hu, cavity, loops, mottle, tissue_hu: dict) -> None:
    """Bowel loops (soft tissue with mottled content and gas pockets) in the visceral fat."""
    bowel = cavity & (loops > 0.35)
    hu[bowel] = tissue_hu["bowel"] + 12 * mottle[bowel]
    hu[bowel & (loops < 0.55)] = tissue_hu["bowel"] + 15  # the enhancing wall around each loop
    hu[bowel & (loops > 0.8) & (mottle > 1.4)] = -950.0  # gas


def _paint_organs(rng, grid: _Grid, hu, cavity, mottle, tissue_hu: dict) -> np.ndarray:
    """Paint the labelled organs into `hu` (in place) and return their label volume (uint8)."""
    shapes = {name: _organ(rng, grid, **spec) for name, spec in _ORGAN_SHAPES.items()}
    radius = {name: shape.radius for name, shape in shapes.items()}
    radius["liver"] = np.minimum(radius.pop("liver_right_lobe"), radius.pop("liver_left_lobe"))
    radius["pancreas"] = _pancreas_radius(rng, grid)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    for name in _PAINT_ORDER:
        mask = cavity & (radius[name] < 1)
        shape = shapes.get(name)
        if name.endswith("kidney"):
            # The renal hilum: a fat-filled notch facing antero-medially at mid-kidney levels.
            mask &= ~((shape.v < -0.2) & (np.abs(shape.u) < 0.6 * (-shape.v - 0.2)) & (shape.profile > 0.7))
            hu[mask] = tissue_hu["kidney_cortex"]
            hu[mask & (shape.radius < 0.6)] -= rng.uniform(20, 50)  # the medulla enhances less than cortex
        elif name == "stomach":
            hu[mask] = tissue_hu["stomach_wall"]
            # Contents: fluid with food, gas collecting anteriorly (the patient lies supine).
            lumen = mask & (shape.radius < 0.85)
            hu[lumen] = tissue_hu["stomach_fluid"] + 10 * mottle[lumen]
            hu[lumen & (shape.v < rng.uniform(-0.7, -0.3))] = _AIR_HU
        else:
            hu[mask] = tissue_hu[name]
        labels[mask] = _LABEL_ID[name]
    return labels


def _organ(
    rng, grid: _Grid, center, semi_axes, *, angle=0.0, t_extent=None, drift=(0.0, 0.0), wobble=0.08, jitter=5.0
) -> _Shape:
    """A randomly deformed ellipse whose centre and outline change smoothly along z.

    With `t_extent` = (centre, half-height) the cross-section follows an ellipsoid's profile and
    vanishes outside centre +- half-height; with None it is present in every slice. Per case the
    centre, size, angle and extent are jittered, and the outline gets low-frequency harmonics
    (k = 2..4) whose phases turn slowly with height.
    """
    t = grid.t
    t_center = (t_extent[0] + rng.normal(0, 0.03)) if t_extent else 0.5
    profile = np.ones_like(t)
    if t_extent:
        half_height = t_extent[1] * rng.uniform(0.9, 1.1)
        profile = np.sqrt(np.clip(1 - ((t - t_center) / half_height) ** 2, 0, None))
    shift = rng.normal(0, jitter, 2)
    moving_center = [c + s + d * (t - t_center) for c, s, d in zip(center, shift, drift)]
    semi_axes = [axis * factor for axis, factor in zip(semi_axes, rng.uniform(0.88, 1.12, 2))]
    u, v = _ellipse_coords(grid, moving_center, semi_axes, angle=angle + rng.normal(0, 0.1))
    radius = np.sqrt(u * u + v * v)
    outline = profile
    if wobble:
        phi = np.arctan2(v, u)
        outline = 1.0
        # Python floats keep the arithmetic in float32 (a NumPy float64 scalar would promote it).
        amplitudes = rng.uniform(0, wobble, 3).tolist()
        phases = rng.uniform(0, 2 * np.pi, 3).tolist()
        turns = rng.uniform(-2, 2, 3).tolist()  # radians of phase per unit of t
        for k, amplitude, phase, turn in zip((2, 3, 4), amplitudes, phases, turns):
            outline = outline + amplitude * np.cos(k * phi + (phase + turn * t))
        outline = outline * profile
    scale = np.maximum(profile, 1e-3)
    return _Shape(radius / np.maximum(outline, 1e-3), u / scale, v / scale, profile)


def _pancreas_radius(rng, grid: _Grid) -> np.ndarray:
    """The pancreas (< 1 inside): a band along a parabola from the head (right, low) to the tail (left, high).

    It curves across the aorta from the duodenal loop to the splenic hilum; its thickness tapers
    from head to tail, and each part shows over a short range of heights.
    """
    head_x, tail_x = -50 + rng.normal(0, 4), 85 + rng.normal(0, 4)
    apex_y, bend = -28 + rng.normal(0, 3), 0.007 * rng.uniform(0.85, 1.15)
    along = np.clip((grid.x - head_x) / (tail_x - head_x), 0, 1)  # 0 at the head, 1 at the tail
    t_center = 0.42 + 0.22 * along + rng.normal(0, 0.03)
    profile = np.sqrt(np.clip(1 - ((grid.t - t_center) / 0.13) ** 2, 0, None))
    ends = np.sqrt(np.clip(np.minimum(grid.x - head_x, tail_x - grid.x) / 12, 0, 1))  # rounded ends
    half_thickness = (13 - 6 * along) * profile * ends * rng.uniform(0.85, 1.15)
    offset = (grid.y - apex_y - bend * grid.x**2) / np.sqrt(1 + (2 * bend * grid.x) ** 2)  # ~normal distance
    return np.abs(offset) / np.maximum(half_thickness, 1e-3)


def _ellipse_coords(grid: _Grid, center, semi_axes, *, angle=0.0):
    """Coordinates along an ellipse's two semi-axes, in units of those semi-axes (float32)."""
    (cx, cy), (a, b) = ([np.float32(value) for value in pair] for pair in (center, semi_axes))
    dx, dy = grid.x - cx, grid.y - cy
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return (cos * dx + sin * dy) / a, (cos * dy - sin * dx) / b


def _ellipse(grid: _Grid, center, semi_axes, *, angle=0.0) -> np.ndarray:
    """Normalised elliptical radius: < 1 inside."""
    u, v = _ellipse_coords(grid, center, semi_axes, angle=angle)
    return np.sqrt(u * u + v * v)


def _smooth_noise(rng, shape, cells) -> np.ndarray:
    """A unit-variance Gaussian random field, smooth over about `cells` voxels along each axis.

    Random knots on a coarse lattice, each spread by a Gaussian kernel: three small matrix
    products instead of a large 3D convolution.
    """
    kernels = []
    for length, cell in zip(shape, cells):
        cell = max(float(cell), 1.0)
        knot_positions = np.arange(-1.5 * cell, length + 1.5 * cell, cell)
        offsets = (np.arange(length)[:, None] - knot_positions[None, :]) / (0.7 * cell)
        kernels.append(np.exp(-0.5 * offsets**2).astype(np.float32))
    knot_values = rng.standard_normal([kernel.shape[1] for kernel in kernels], dtype=np.float32)
    field = np.einsum("ai,bj,ck,ijk->abc", *kernels, knot_values, optimize=True)
    return field / field.std()


def _cells(grid: _Grid, spacing_mm, *, in_plane_mm: float, height: float):
    """Smoothing lengths in voxels for a field smooth over `in_plane_mm` and `height` (in t)."""
    slices = grid.t.shape[0]
    t_step = float(grid.t[-1, 0, 0] - grid.t[0, 0, 0]) / (slices - 1)
    return (height / t_step, in_plane_mm / spacing_mm[1], in_plane_mm / spacing_mm[2])


def _add_scanner_effects(rng, hu: np.ndarray, body: np.ndarray, texture: np.ndarray, spacing_mm) -> np.ndarray:
    """Tissue texture, partial-volume blur, a smooth intensity bias, Gaussian noise; int16 HU."""
    inside = body < 1
    hu[inside] += rng.uniform(3, 6) * texture[inside]
    hu = gaussian_filter(hu, sigma=(0, 0.5, 0.5))
    bias = _smooth_noise(rng, hu.shape, (hu.shape[0], 150 / spacing_mm[1], 150 / spacing_mm[2]))
    bias *= rng.uniform(0.002, 0.006) / np.abs(bias).max()  # at most ~6 HU in soft tissue
    hu = (hu - _AIR_HU) * (1 + bias) + _AIR_HU  # scales attenuation, so air stays air
    hu += rng.uniform(8, 20) * rng.standard_normal(hu.shape, dtype=np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
