"""Procedural an8Flower-style benchmark: flowers whose class lives in a single part.

Every image shows one flower (stem, two leaves, petals, a round centre and, for some classes,
small balls on the petals or thorns on the stem) on a textured background.  The class is
decided *only* by the discriminative element: which part carries one of eight saturated
"class colours" (petals, centre, stem, leaves, balls on the petals, thorns on the stem).
Everything else -- background, pose, size, position, number and shape of petals, and the
colours of the non-discriminative parts -- is drawn by one class-blind sampler, so it has the
same distribution for every class.  Non-discriminative parts take colours from muted
palettes that are disjoint from the class colours (the corners of the RGB cube).

Each image comes with the exact pixel mask of its discriminative element as drawn (after
occlusion by the parts drawn on top of it) and the tight box of that mask.  Shapes are
implicit (inside tests evaluated on a pixel grid with vectorised torch ops, hard edges), and
per-pixel arithmetic uses only operations that are exactly rounded, so an image is bitwise
identical whatever batch it is rendered in.

This follows the spirit of an8Flower (Oramas et al., "Visual explanation by interpretation",
ICLR 2019): "single" classes (a part's colour), "double" classes (colour x part) and "part"
classes (balls on the flower, thorns on the stem).

Example:
    >>> from fam_core.data.flowers import SPLITS, make_flowers
    >>> batch = make_flowers(SPLITS["novel"][:5], per_class=2, seed=1)
    >>> batch.images.shape, batch.masks.shape, batch.boxes.shape
    (torch.Size([10, 3, 84, 84]), torch.Size([10, 84, 84]), torch.Size([10, 4]))
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from enum import IntEnum

import numpy as np
import torch

__all__ = [
    "CLASS_NAMES",
    "COLOURS",
    "ELEMENTS",
    "NUM_CLASSES",
    "SPLITS",
    "FlowerBatch",
    "class_attributes",
    "make_flowers",
    "make_flowers_for",
    "split_of",
]

# --------------------------------------------------------------------------------------------
# Class design
# --------------------------------------------------------------------------------------------

ELEMENTS: tuple[str, ...] = ("petals", "centre", "stem", "leaves", "petal-balls", "stem-thorns")
"""Discriminative elements; the class colour is painted on exactly one of them."""

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "yellow": (1.0, 1.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "blue": (0.0, 0.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
}
"""Class colours: the corners of the RGB cube, maximally separated from each other and from
the muted palettes of the non-discriminative parts."""

_COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
NUM_CLASSES: int = len(ELEMENTS) * len(COLOURS)
CLASS_NAMES: tuple[str, ...] = tuple(f"{e}-{c}" for e in ELEMENTS for c in _COLOUR_NAMES)

# Split design.  For element e the class colours are visited cyclically from
# _BASE_WINDOW_START[e]: the first 4 are base classes, the next one validation, the last 3
# novel.  The starts make every colour appear in exactly 3 base classes and every element in 4,
# so each novel class recombines an element and a colour both seen during base training.
_BASE_WINDOW_START: tuple[int, ...] = (0, 4, 2, 6, 1, 5)
_BASE_PER_ELEMENT = 4
_VAL_PER_ELEMENT = 1


def _split_for_offset(offset: int) -> str:
    if offset < _BASE_PER_ELEMENT:
        return "base"
    if offset < _BASE_PER_ELEMENT + _VAL_PER_ELEMENT:
        return "val"
    return "novel"


def _build_splits() -> dict[str, tuple[int, ...]]:
    splits: dict[str, list[int]] = {"base": [], "val": [], "novel": []}
    for class_id in range(NUM_CLASSES):
        element, colour = divmod(class_id, len(_COLOUR_NAMES))
        offset = (colour - _BASE_WINDOW_START[element]) % len(_COLOUR_NAMES)
        splits[_split_for_offset(offset)].append(class_id)
    return {name: tuple(ids) for name, ids in splits.items()}


SPLITS: dict[str, tuple[int, ...]] = _build_splits()
"""Fixed few-shot split: 24 base, 6 validation and 18 novel classes (global class ids)."""


def _check_class_id(class_id: int) -> int:
    if isinstance(class_id, bool) or not isinstance(class_id, int | np.integer):
        raise ValueError(f"class_id must be an int in [0, {NUM_CLASSES}), got {class_id!r}")
    if not 0 <= int(class_id) < NUM_CLASSES:
        raise ValueError(f"class_id must be in [0, {NUM_CLASSES}), got {class_id}")
    return int(class_id)


def split_of(class_id: int) -> str:
    """Return the split ("base", "val" or "novel") that a class belongs to.

    Example:
        >>> split_of(0)
        'base'
    """
    class_id = _check_class_id(class_id)
    return next(name for name, ids in SPLITS.items() if class_id in ids)


def class_attributes(class_id: int) -> tuple[str, str]:
    """Return ``(element, colour)`` of a class, e.g. ``("stem-thorns", "blue")``.

    Example:
        >>> class_attributes(CLASS_NAMES.index("stem-thorns-blue"))
        ('stem-thorns', 'blue')
    """
    element, colour = divmod(_check_class_id(class_id), len(_COLOUR_NAMES))
    return ELEMENTS[element], _COLOUR_NAMES[colour]


# --------------------------------------------------------------------------------------------
# Scene constants (object units: the flower fits in a disc of radius _OBJECT_RADIUS)
# --------------------------------------------------------------------------------------------


class _Layer(IntEnum):
    """Drawing order; a later layer occludes earlier ones."""

    BACKGROUND = 0
    LEAVES = 1
    STEM = 2
    THORNS = 3
    PETALS = 4
    BALLS = 5
    CENTRE = 6


_ELEMENT_LAYER: dict[str, _Layer] = {
    "petals": _Layer.PETALS,
    "centre": _Layer.CENTRE,
    "stem": _Layer.STEM,
    "leaves": _Layer.LEAVES,
    "petal-balls": _Layer.BALLS,
    "stem-thorns": _Layer.THORNS,
}
_OPTIONAL_LAYERS = (_Layer.THORNS, _Layer.BALLS)  # drawn only when they are discriminative

_HEAD_Y = -0.45  # flower head centre (x = 0); y grows downwards
_STEM_BOTTOM_Y = 0.95
_STEM_LENGTH = _STEM_BOTTOM_Y - _HEAD_Y
_OBJECT_RADIUS = 1.08  # every part lies within this distance of the object origin
_MAX_PETALS = 8
_BALL_POSITION = 0.72  # ball centre along the petal axis, as a fraction of petal length
_BALL_RADIUS_FRACTION = 0.75  # ball radius as a fraction of petal half-width
_MIN_BALL_RADIUS = 0.08
_ABSENT_OFFSET = 1.0e6  # shifts an unused petal slot far away from every pixel
_LEAF_COUNT = 2
_THORN_COUNT = 8  # alternating sides, evenly spaced along the stem
_THORN_FIRST_Y, _THORN_LAST_Y = 0.16, 0.9
_THORN_SPACING = (_THORN_LAST_Y - _THORN_FIRST_Y) / (_THORN_COUNT - 1)
_THORN_OVERLAP = 0.02  # thorn bases reach this far into the stem, so they never float
_COLOUR_GRID = 4  # background colour field: bilinear upsampling of a 4x4 grid of colours
_COLOUR_JITTER = 0.35  # per-cell random shift of the gradient position (makes blobs)
_TEXTURE_GRID = 12  # background luminance texture: upsampled 12x12 grid of gaussian noise
_TEXTURE_AMPLITUDE = 0.05
_PIXEL_NOISE_STD = 0.03
_SEED_DOMAIN = 0xF10E5  # mixed into every per-image seed
_RENDER_CHUNK = 64
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 512

# Uniform ranges (low, high) of the class-independent scene parameters.
_RANGES: dict[str, tuple[float, float]] = {
    "size_fraction": (0.82, 1.0),  # object radius / half image size
    "rotation_deg": (-40.0, 40.0),
    "petal_count": (5, _MAX_PETALS + 1),  # integer, upper bound exclusive
    "petal_length": (0.48, 0.58),
    "petal_width": (0.8, 1.25),  # half-width relative to "petals just touching"
    "centre_radius": (0.21, 0.26),
    "stem_width": (0.14, 0.18),
    "stem_bend": (-0.2, 0.2),
    "leaf_upper_y": (0.25, 0.45),
    "leaf_lower_y": (0.55, 0.75),
    "leaf_length": (0.55, 0.72),
    "leaf_width": (0.14, 0.19),  # half-width
    "leaf_angle_deg": (10.0, 45.0),
    "thorn_jitter": (-0.02, 0.02),
    "thorn_height": (0.22, 0.3),
    "thorn_base": (0.14, 0.18),
    "thorn_tilt": (0.3, 0.7),
}

# Muted HSV palettes (hue, saturation, value ranges) for non-discriminative parts.  They stay
# at least ~0.35 (RGB Euclidean) away from every class colour.
_PALETTES: dict[str, tuple[tuple[float, float], ...]] = {
    "petals": ((0.0, 1.0), (0.1, 0.35), (0.5, 0.8)),
    "centre": ((0.04, 0.125), (0.35, 0.6), (0.3, 0.55)),
    "stem": ((0.19, 0.39), (0.25, 0.5), (0.3, 0.55)),
    "leaves": ((0.19, 0.39), (0.25, 0.5), (0.3, 0.55)),
    "background": ((0.0, 1.0), (0.1, 0.45), (0.35, 0.8)),
}
_NEUTRAL_PART_PALETTE: dict[_Layer, str] = {
    _Layer.LEAVES: "leaves",
    _Layer.STEM: "stem",
    _Layer.PETALS: "petals",
    _Layer.CENTRE: "centre",
}


# --------------------------------------------------------------------------------------------
# Public batch type
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowerBatch:
    """A batch of flower images with their discriminative-part annotations.

    Attributes:
        images: float32 ``[N, 3, H, W]`` in ``[0, 1]``.
        labels: int64 ``[N]`` global class ids (see ``CLASS_NAMES``).
        indices: int64 ``[N]`` per-class image indices; ``(label, index, seed)`` fixes an image.
        masks: bool ``[N, H, W]``, exactly the visible pixels of the discriminative element.
        boxes: int64 ``[N, 4]`` tight boxes of ``masks`` as ``(x0, y0, x1, y1)``, x1/y1 exclusive.

    Example:
        >>> batch = make_flowers([0, 1], per_class=1)
        >>> [batch.class_names[int(c)] for c in batch.labels]
        ['petals-red', 'petals-yellow']
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor

    @property
    def class_names(self) -> list[str]:
        """Names of all ``NUM_CLASSES`` classes, indexed by global class id."""
        return list(CLASS_NAMES)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------------------------
# Public generators
# --------------------------------------------------------------------------------------------


def make_flowers(
    classes: Sequence[int] | torch.Tensor,
    per_class: int,
    *,
    image_size: int = 84,
    seed: int = 0,
    start_index: int = 0,
) -> FlowerBatch:
    """Render ``per_class`` images for each class, class-major.

    Image ``i`` of class ``c`` under ``seed`` is the same whatever else is generated, so
    disjoint index ranges (``start_index``) give disjoint train / test sets.

    Args:
        classes: global class ids in ``[0, NUM_CLASSES)``.
        per_class: images per class (>= 1).
        image_size: side of the square images in pixels.
        seed: non-negative dataset seed.
        start_index: index of the first image of every class (>= 0).

    Example:
        >>> batch = make_flowers(SPLITS["base"], per_class=5, seed=0)
        >>> len(batch), batch.images.dtype
        (120, torch.float32)
    """
    class_ids = _check_ids(classes, "classes", NUM_CLASSES)
    per_class = _check_int(per_class, "per_class", low=1)
    start_index = _check_int(start_index, "start_index", low=0)
    labels = [c for c in class_ids for _ in range(per_class)]
    indices = [start_index + i for _ in class_ids for i in range(per_class)]
    return make_flowers_for(labels, indices, image_size=image_size, seed=seed)


def make_flowers_for(
    labels: Sequence[int] | torch.Tensor,
    indices: Sequence[int] | torch.Tensor,
    image_size: int = 84,
    seed: int = 0,
) -> FlowerBatch:
    """Render one image per explicit ``(label, index)`` pair.

    Example:
        >>> batch = make_flowers_for([3, 3, 40], [0, 7, 2], image_size=64, seed=5)
        >>> batch.images.shape
        torch.Size([3, 3, 64, 64])
    """
    label_list = _check_ids(labels, "labels", NUM_CLASSES)
    index_list = _check_ids(indices, "indices", None)
    if len(label_list) != len(index_list):
        raise ValueError(
            f"labels and indices must have the same length, got {len(label_list)} "
            f"and {len(index_list)}"
        )
    image_size = _check_int(image_size, "image_size", low=MIN_IMAGE_SIZE, high=MAX_IMAGE_SIZE)
    seed = _check_int(seed, "seed", low=0)

    images: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    for start in range(0, len(label_list), _RENDER_CHUNK):
        chunk_labels = label_list[start : start + _RENDER_CHUNK]
        chunk_indices = index_list[start : start + _RENDER_CHUNK]
        scene = _sample_scenes(chunk_labels, chunk_indices, seed, image_size)
        layer, colour = _discriminative_spec(chunk_labels)
        chunk_images, chunk_parts = _render(scene, layer, colour)
        images.append(chunk_images)
        masks.append(chunk_parts == layer[:, None, None])
    all_masks = torch.cat(masks)
    return FlowerBatch(
        images=torch.cat(images),
        labels=torch.tensor(label_list, dtype=torch.int64),
        indices=torch.tensor(index_list, dtype=torch.int64),
        masks=all_masks,
        boxes=_tight_boxes(all_masks),
    )


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def _check_int(value: object, name: str, low: int, high: int | None = None) -> int:
    expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return int(value)


def _check_ids(values: object, name: str, upper: int | None) -> list[int]:
    expected = "non-negative ints" if upper is None else f"ints in [0, {upper})"
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.is_floating_point() or values.is_complex():
            raise ValueError(f"{name} must be a 1-D integer tensor of {expected}")
        values = values.tolist()
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence of {expected}, got {type(values).__name__}")
    if len(values) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of {expected}")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must contain {expected}, got {value!r}")
        if value < 0 or (upper is not None and value >= upper):
            raise ValueError(f"{name} must contain {expected}, got {value}")
        out.append(int(value))
    return out


# --------------------------------------------------------------------------------------------
# Class-independent scene sampling (per image, plain Python/numpy: bitwise reproducible)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scene:
    """Batched, class-independent scene parameters (leading dimension = batch)."""

    centre_x: torch.Tensor  # object origin in pixels
    centre_y: torch.Tensor
    cos_rot: torch.Tensor
    sin_rot: torch.Tensor
    units_per_pixel: torch.Tensor
    petal_along: torch.Tensor  # [B, _MAX_PETALS, 2] axis direction / petal half-length
    petal_across: torch.Tensor  # [B, _MAX_PETALS, 2] axis direction / petal half-width
    petal_offset: torch.Tensor  # [B, _MAX_PETALS] 1, or _ABSENT_OFFSET for unused slots
    ball_axis: torch.Tensor  # [B, _MAX_PETALS, 2] axis direction / ball radius
    ball_offset: torch.Tensor  # [B, _MAX_PETALS] ball centre distance / ball radius
    centre_radius_sq: torch.Tensor
    stem_half_width: torch.Tensor
    stem_bend: torch.Tensor
    leaf_x: torch.Tensor  # [B, _LEAF_COUNT] leaf centres
    leaf_y: torch.Tensor
    leaf_cos: torch.Tensor  # [B, _LEAF_COUNT] leaf axis directions
    leaf_sin: torch.Tensor
    leaf_inv_half_length: torch.Tensor
    leaf_half_width: torch.Tensor
    thorn_start: torch.Tensor  # [B, 2] y of the first thorn on the +x / -x side
    thorn_height: torch.Tensor
    thorn_inv_height: torch.Tensor
    thorn_half_base: torch.Tensor
    thorn_tilt: torch.Tensor
    part_colours: torch.Tensor  # [B, len(_Layer), 3]; optional layers unused unless class
    bg_colours: torch.Tensor  # [B, 3, _COLOUR_GRID, _COLOUR_GRID]
    bg_texture: torch.Tensor  # [B, 1, _TEXTURE_GRID, _TEXTURE_GRID]
    noise: torch.Tensor  # [B, 3, H, W], zero-mean uniform pixel noise

    @property
    def image_size(self) -> int:
        return int(self.noise.shape[-1])


def _image_rng(seed: int, label: int, index: int) -> np.random.Generator:
    """Generator owned by one image: a function of (seed, class, index) only."""
    return np.random.default_rng([_SEED_DOMAIN, seed, label, index])


def _uniform(rng: np.random.Generator, name: str) -> float:
    low, high = _RANGES[name]
    return float(rng.uniform(low, high))


def _neutral_colour(rng: np.random.Generator, palette: str) -> tuple[float, float, float]:
    hsv = (low + (high - low) * float(rng.random()) for low, high in _PALETTES[palette])
    return colorsys.hsv_to_rgb(*hsv)


def _stem_x(y: float, bend: float) -> float:
    t = (y - _HEAD_Y) / _STEM_LENGTH
    return bend * t * t


def _draw_pose(rng: np.random.Generator, image_size: int) -> dict[str, object]:
    half = image_size / 2
    size_fraction = _uniform(rng, "size_fraction")
    angle = math.radians(_uniform(rng, "rotation_deg"))
    max_shift = (1.0 - size_fraction) * half
    shift = rng.uniform(-max_shift, max_shift, size=2)
    return {
        "centre_x": half + shift[0],
        "centre_y": half + shift[1],
        "cos_rot": math.cos(angle),
        "sin_rot": math.sin(angle),
        "units_per_pixel": _OBJECT_RADIUS / (size_fraction * half),
    }


def _draw_head(rng: np.random.Generator) -> dict[str, object]:
    low, high = _RANGES["petal_count"]
    count = int(rng.integers(low, high))
    phase = float(rng.uniform(0.0, 2 * math.pi))
    angles = phase + 2 * math.pi * np.arange(_MAX_PETALS) / count
    length = _uniform(rng, "petal_length")
    # Half-width at which neighbouring petals touch at half length, times a random factor.
    half_width = _uniform(rng, "petal_width") * (math.pi / count) * (length / 2)
    ball_radius = max(_BALL_RADIUS_FRACTION * half_width, _MIN_BALL_RADIUS)
    centre_radius = _uniform(rng, "centre_radius")
    # Unused petal slots get an offset that puts every pixel outside them.
    offset = np.where(np.arange(_MAX_PETALS) < count, 1.0, _ABSENT_OFFSET)
    cos, sin = np.cos(angles), np.sin(angles)
    return {
        "petal_along": np.stack([cos, sin], axis=-1) * (2.0 / length),
        "petal_across": np.stack([cos, sin], axis=-1) / half_width,
        "petal_offset": offset,
        "ball_axis": np.stack([cos, sin], axis=-1) / ball_radius,
        "ball_offset": np.where(offset == 1.0, _BALL_POSITION * length / ball_radius, offset),
        "centre_radius_sq": centre_radius**2,
    }


def _draw_stem_and_leaves(rng: np.random.Generator) -> dict[str, object]:
    bend = _uniform(rng, "stem_bend")
    stem_half_width = _uniform(rng, "stem_width") / 2
    first_side = 1.0 if rng.random() < 0.5 else -1.0
    attach_y = (_uniform(rng, "leaf_upper_y"), _uniform(rng, "leaf_lower_y"))
    leaf = {key: np.zeros(_LEAF_COUNT) for key in ("x", "y", "cos", "sin", "inv_hl", "hw")}
    for i, (y, side) in enumerate(zip(attach_y, (first_side, -first_side), strict=True)):
        half_length = _uniform(rng, "leaf_length") / 2
        angle = math.radians(_uniform(rng, "leaf_angle_deg"))
        direction = (side * math.cos(angle), -math.sin(angle))  # outwards and upwards
        leaf["x"][i] = _stem_x(y, bend) + direction[0] * half_length
        leaf["y"][i] = y + direction[1] * half_length
        leaf["cos"][i], leaf["sin"][i] = direction
        leaf["inv_hl"][i] = 1.0 / half_length
        leaf["hw"][i] = _uniform(rng, "leaf_width")
    return {
        "stem_half_width": stem_half_width,
        "stem_bend": bend,
        "leaf_x": leaf["x"],
        "leaf_y": leaf["y"],
        "leaf_cos": leaf["cos"],
        "leaf_sin": leaf["sin"],
        "leaf_inv_half_length": leaf["inv_hl"],
        "leaf_half_width": leaf["hw"],
    }


def _draw_thorns(rng: np.random.Generator) -> dict[str, object]:
    first = _THORN_FIRST_Y + _uniform(rng, "thorn_jitter")
    plus_side_first = rng.random() < 0.5  # thorn 0 sits on the +x side
    starts = (first, first + _THORN_SPACING)
    height = _uniform(rng, "thorn_height")
    return {
        "thorn_start": np.array(starts if plus_side_first else starts[::-1]),
        "thorn_height": height,
        "thorn_inv_height": 1.0 / height,
        "thorn_half_base": _uniform(rng, "thorn_base") / 2,
        "thorn_tilt": _uniform(rng, "thorn_tilt"),
    }


def _draw_part_colours(rng: np.random.Generator) -> dict[str, object]:
    colours = np.zeros((len(_Layer), 3))
    for layer, palette in _NEUTRAL_PART_PALETTE.items():
        colours[layer] = _neutral_colour(rng, palette)
    return {"part_colours": colours}


def _draw_background(rng: np.random.Generator) -> dict[str, object]:
    """A smooth random gradient between two muted colours, with blobs, plus a fine texture."""
    first = np.array(_neutral_colour(rng, "background"))
    second = np.array(_neutral_colour(rng, "background"))
    angle = float(rng.uniform(0.0, 2 * math.pi))
    cell = np.linspace(-1.0, 1.0, _COLOUR_GRID)
    ramp = (math.cos(angle) * cell[None, :] + math.sin(angle) * cell[:, None]) / math.sqrt(8.0)
    jitter = rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, size=(_COLOUR_GRID, _COLOUR_GRID))
    mix = np.clip(ramp + 0.5 + jitter, 0.0, 1.0)
    texture = rng.standard_normal((1, _TEXTURE_GRID, _TEXTURE_GRID))
    return {
        "bg_colours": first[:, None, None] + (second - first)[:, None, None] * mix,
        "bg_texture": _TEXTURE_AMPLITUDE * texture,
    }


def _draw_noise(rng: np.random.Generator, out: np.ndarray) -> None:
    """Fill ``out`` (float32 [3, H, W]) with zero-mean uniform noise of std _PIXEL_NOISE_STD."""
    rng.random(dtype=np.float32, out=out)
    out -= np.float32(0.5)
    out *= np.float32(_PIXEL_NOISE_STD * math.sqrt(12.0))


def _draw_scene(rng: np.random.Generator, image_size: int, noise: np.ndarray) -> dict[str, object]:
    """All nuisance parameters of one image.  Deliberately blind to the class."""
    row = {
        **_draw_pose(rng, image_size),
        **_draw_head(rng),
        **_draw_stem_and_leaves(rng),
        **_draw_thorns(rng),
        **_draw_part_colours(rng),
        **_draw_background(rng),
    }
    _draw_noise(rng, noise)
    return row


def _sample_scenes(labels: list[int], indices: list[int], seed: int, image_size: int) -> _Scene:
    noise = np.empty((len(labels), 3, image_size, image_size), dtype=np.float32)
    rows = [
        _draw_scene(_image_rng(seed, label, index), image_size, noise[i])
        for i, (label, index) in enumerate(zip(labels, indices, strict=True))
    ]
    columns = {
        f.name: torch.from_numpy(np.stack([row[f.name] for row in rows])).float()
        for f in fields(_Scene)
        if f.name != "noise"
    }
    return _Scene(**columns, noise=torch.from_numpy(noise))


def _subset(scene: _Scene, rows: torch.Tensor) -> _Scene:
    return _Scene(**{f.name: getattr(scene, f.name)[rows] for f in fields(_Scene)})


def _discriminative_spec(labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer id [B] and class colour [B, 3] of each label's discriminative element."""
    layers, colours = [], []
    for label in labels:
        element, colour = class_attributes(label)
        layers.append(int(_ELEMENT_LAYER[element]))
        colours.append(COLOURS[colour])
    return torch.tensor(layers, dtype=torch.int64), torch.tensor(colours, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Rendering (batched torch; per-pixel work uses only exactly-rounded arithmetic)
# --------------------------------------------------------------------------------------------


def _col(values: torch.Tensor) -> torch.Tensor:
    """Per-image values [B] -> [B, 1, 1], broadcastable against [B, H, W]."""
    return values[:, None, None]


def _pixel_centres(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    return xs, ys


def _object_coords(scene: _Scene) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = _pixel_centres(scene.image_size)
    dx = xs - _col(scene.centre_x)
    dy = ys - _col(scene.centre_y)
    cos, sin, scale = _col(scene.cos_rot), _col(scene.sin_rot), _col(scene.units_per_pixel)
    return (cos * dx + sin * dy) * scale, (cos * dy - sin * dx) * scale


def _stem_centre_x(y: torch.Tensor, scene: _Scene) -> torch.Tensor:
    t = (y - _HEAD_Y) * (1.0 / _STEM_LENGTH)
    return _col(scene.stem_bend) * t * t


def _stem(x: torch.Tensor, y: torch.Tensor, scene: _Scene) -> torch.Tensor:
    offset = (x - _stem_centre_x(y, scene)).abs()
    return (y >= _HEAD_Y) & (y <= _STEM_BOTTOM_Y) & (offset <= _col(scene.stem_half_width))


def _leaves(x: torch.Tensor, y: torch.Tensor, scene: _Scene) -> torch.Tensor:
    """Pointed lens-shaped leaves: |v| <= w * (1 - u^2) in leaf axis coordinates."""
    inside = torch.zeros_like(x, dtype=torch.bool)
    for i in range(_LEAF_COUNT):
        dx, dy = x - _col(scene.leaf_x[:, i]), y - _col(scene.leaf_y[:, i])
        cos, sin = _col(scene.leaf_cos[:, i]), _col(scene.leaf_sin[:, i])
        u = (dx * cos + dy * sin) * _col(scene.leaf_inv_half_length[:, i])
        v = (dy * cos - dx * sin).abs()
        width = _col(scene.leaf_half_width[:, i])
        inside |= v <= width - width * u * u
    return inside


def _thorns(x: torch.Tensor, y: torch.Tensor, scene: _Scene) -> torch.Tensor:
    """Upward-tilted triangles on alternating sides of the stem.

    Thorns on one side are ``2 * _THORN_SPACING`` apart, so each pixel only needs to be tested
    against the nearest thorn on each side.
    """
    inside = torch.zeros_like(x, dtype=torch.bool)
    centre_x = _stem_centre_x(y, scene)
    pitch = 2 * _THORN_SPACING
    last = _THORN_COUNT // 2 - 1
    height, inv_height = _col(scene.thorn_height), _col(scene.thorn_inv_height)
    half_base, tilt = _col(scene.thorn_half_base), _col(scene.thorn_tilt)
    for side_index, side in enumerate((1.0, -1.0)):
        out = side * (x - centre_x) - _col(scene.stem_half_width)  # distance from stem edge
        along = y + tilt * out - _col(scene.thorn_start[:, side_index])
        nearest = torch.round(along * (1.0 / pitch)).clamp(0, last)
        along = (along - nearest * pitch).abs()
        inside |= (
            (out >= -_THORN_OVERLAP)
            & (out <= height)
            & (along <= half_base - half_base * out * inv_height)
        )
    return inside


def _unit_discs(
    hx: torch.Tensor,
    hy: torch.Tensor,
    along: torch.Tensor,
    across: torch.Tensor,
    offset: torch.Tensor,
) -> torch.Tensor:
    """Union over slots j of ellipses ``(p.along_j - offset_j)^2 + (p x across_j)^2 <= 1``.

    ``along``/``across`` [B, S, 2] are the slot's axis direction scaled by the inverse
    semi-axes, so each ellipse is a unit disc in its own scaled frame.
    """
    inside = torch.zeros_like(hx, dtype=torch.bool)
    for j in range(along.shape[1]):
        u = hx * _col(along[:, j, 0]) + hy * _col(along[:, j, 1]) - _col(offset[:, j])
        v = hy * _col(across[:, j, 0]) - hx * _col(across[:, j, 1])
        inside |= u * u + v * v <= 1.0
    return inside


def _head_coords(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x, y - _HEAD_Y


def _petals(x: torch.Tensor, y: torch.Tensor, scene: _Scene) -> torch.Tensor:
    """Elliptic petals radiating from the head centre."""
    hx, hy = _head_coords(x, y)
    return _unit_discs(hx, hy, scene.petal_along, scene.petal_across, scene.petal_offset)


def _balls(x: torch.Tensor, y: torch.Tensor, scene: _Scene) -> torch.Tensor:
    """One round ball on every petal, near its tip."""
    hx, hy = _head_coords(x, y)
    return _unit_discs(hx, hy, scene.ball_axis, scene.ball_axis, scene.ball_offset)


def _centre(x: torch.Tensor, y: torch.Tensor, scene: _Scene) -> torch.Tensor:
    hx, hy = _head_coords(x, y)
    return hx * hx + hy * hy <= _col(scene.centre_radius_sq)


_SHAPES: dict[_Layer, Callable[[torch.Tensor, torch.Tensor, _Scene], torch.Tensor]] = {
    _Layer.LEAVES: _leaves,
    _Layer.STEM: _stem,
    _Layer.THORNS: _thorns,
    _Layer.PETALS: _petals,
    _Layer.BALLS: _balls,
    _Layer.CENTRE: _centre,
}


def _part_map(scene: _Scene, layer: torch.Tensor) -> torch.Tensor:
    """int64 [B, H, W]: the topmost layer drawn at each pixel.

    Optional layers (balls, thorns) are evaluated only for the images whose class has them.
    """
    x, y = _object_coords(scene)
    parts = torch.zeros(x.shape, dtype=torch.int64)
    for part_layer in sorted(_SHAPES):
        shape = _SHAPES[part_layer]
        if part_layer in _OPTIONAL_LAYERS:
            rows = torch.nonzero(layer == part_layer).flatten()
            inside = shape(x[rows], y[rows], _subset(scene, rows))
            parts[rows] = torch.where(inside, int(part_layer), parts[rows])
        else:
            parts = torch.where(shape(x, y, scene), int(part_layer), parts)
    return parts


def _bilinear_weights(size: int, grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower/upper grid index and weight of the upper one for each of ``size`` pixels."""
    position = (np.arange(size) + 0.5) / size * (grid - 1)
    low = np.floor(position).astype(np.int64).clip(0, grid - 2)
    weight = (position - low).astype(np.float32)
    return torch.from_numpy(low), torch.from_numpy(low + 1), torch.from_numpy(weight)


def _upsample(grid: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear upsampling [B, C, G, G] -> [B, C, size, size] with elementwise ops only."""
    low, high, weight = _bilinear_weights(size, grid.shape[-1])
    top, bottom = grid[:, :, low, :], grid[:, :, high, :]
    rows = top + (bottom - top) * weight[:, None]
    left, right = rows[..., low], rows[..., high]
    return left + (right - left) * weight


def _background(scene: _Scene) -> torch.Tensor:
    """float32 [B, 3, H, W]: smooth colour field plus luminance texture."""
    size = scene.image_size
    return _upsample(scene.bg_colours, size) + _upsample(scene.bg_texture, size)


def _render(
    scene: _Scene, layer: torch.Tensor, colour: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render images with ``colour`` [B, 3] painted on discriminative ``layer`` [B].

    Returns ``(images [B, 3, H, W] in [0, 1], part map [B, H, W])``.  Tests call this directly
    to re-render a scene with another colour or another discriminative element.
    """
    parts = _part_map(scene, layer)
    batch = torch.arange(len(layer))
    colours = scene.part_colours.clone()
    colours[batch, layer] = colour
    fill = colours[batch[:, None, None], parts].permute(0, 3, 1, 2)  # [B, 3, H, W]
    image = torch.where((parts == _Layer.BACKGROUND).unsqueeze(1), _background(scene), fill)
    return (image + scene.noise).clamp(0.0, 1.0), parts


def _tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """int64 [N, 4] ``(x0, y0, x1, y1)`` of each mask (exclusive ends; zeros if empty)."""
    height, width = masks.shape[-2:]
    rows, cols = masks.any(dim=2).to(torch.int8), masks.any(dim=1).to(torch.int8)
    y0, x0 = rows.argmax(dim=1), cols.argmax(dim=1)
    y1 = height - rows.flip(1).argmax(dim=1)
    x1 = width - cols.flip(1).argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    return torch.where(masks.flatten(1).any(dim=1, keepdim=True), boxes, 0)
