"""Scenes of 2 to 4 flowers of different classes: which flower made the match?

A scene is a square canvas split into a 2x2 grid of cells of ``cell_size`` pixels; each
flower is drawn by :mod:`fam_core.data.flowers`'s renderer in its own cell, at the scale of a
single-flower image of ``cell_size`` pixels, and the flowers share one background (that of
the scene's first flower). A flower never leaves its cell (its disc lies in the cell, see
``flowers._draw_pose``), so the flowers' discriminative parts never overlap: each flower has
its own mask, exactly the visible pixels of its discriminative part, and its tight box.

Everything is a function of ``(seed, scene index)``: the number of flowers (uniform in
``[min_flowers, max_flowers]``), their classes (distinct, drawn from ``classes``), their cells
and every flower's class-blind nuisance parameters.

Example:
    >>> from fam_core.data.flowers import SPLITS
    >>> scenes = make_scenes(SPLITS["novel"], 3, seed=1)
    >>> scenes.images.shape, scenes.masks.shape, scenes.labels.shape
    (torch.Size([3, 3, 168, 168]), torch.Size([3, 4, 168, 168]), torch.Size([3, 4]))
    >>> bool(((scenes.labels >= 0).sum(dim=1) == scenes.counts).all())
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from fam_core.data import flowers as _f

__all__ = ["GRID", "MAX_SCENE_FLOWERS", "MIN_SCENE_FLOWERS", "SceneBatch", "make_scenes"]

GRID = 2  # the canvas is GRID x GRID cells
MIN_SCENE_FLOWERS = 2
MAX_SCENE_FLOWERS = GRID * GRID
_SCENE_DOMAIN = 0x5CE7E  # mixed into every scene seed: scenes never reuse single-flower draws


@dataclass(frozen=True)
class SceneBatch:
    """Scenes with one annotation per flower; rows past a scene's ``count`` are padding.

    Attributes:
        images: float32 ``[N, 3, S, S]`` in ``[0, 1]``, ``S = 2 * cell_size``.
        labels: int64 ``[N, 4]`` global class ids of the flowers, ``-1`` for padding.
        masks: bool ``[N, 4, S, S]``: the visible pixels of each flower's discriminative part
            (empty for padding).
        boxes: int64 ``[N, 4, 4]`` tight boxes ``(x0, y0, x1, y1)`` of ``masks`` (ends
            exclusive; zeros for padding).
        cells: int64 ``[N, 4]`` grid cell (``row * 2 + column``) of each flower, ``-1``
            for padding.
        counts: int64 ``[N]`` flowers per scene.

    Example:
        >>> batch = make_scenes([0, 9, 18, 27], 2, min_flowers=4, max_flowers=4, cell_size=32)
        >>> batch.counts.tolist(), sorted(batch.labels[0].tolist())
        ([4, 4], [0, 9, 18, 27])
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    cells: torch.Tensor
    counts: torch.Tensor

    def __len__(self) -> int:
        return int(self.counts.shape[0])


def make_scenes(
    classes: Sequence[int] | torch.Tensor,
    scenes: int,
    *,
    min_flowers: int = MIN_SCENE_FLOWERS,
    max_flowers: int = MAX_SCENE_FLOWERS,
    cell_size: int = 84,
    seed: int = 0,
    start_index: int = 0,
) -> SceneBatch:
    """Render ``scenes`` scenes (indices ``start_index ...``) of flowers of ``classes``.

    Args:
        classes: global class ids the flowers are drawn from (distinct within a scene), at
            least ``max_flowers`` different ones.
        scenes: number of scenes (>= 1).
        min_flowers, max_flowers: bounds of the number of flowers per scene, in ``[2, 4]``.
        cell_size: side of a grid cell in pixels (a flower's single-image size).
        seed: non-negative dataset seed.
        start_index: index of the first scene (>= 0); scene ``i`` under ``seed`` is the same
            whatever else is rendered.

    Example:
        >>> batch = make_scenes(range(10), 2, min_flowers=2, max_flowers=2, cell_size=32)
        >>> batch.counts.tolist(), batch.labels[:, 2:].tolist()
        ([2, 2], [[-1, -1], [-1, -1]])
    """
    pool = sorted(set(_f._check_ids(classes, "classes", _f.NUM_CLASSES)))
    scenes = _f._check_int(scenes, "scenes", low=1)
    min_flowers = _f._check_int(
        min_flowers, "min_flowers", low=MIN_SCENE_FLOWERS, high=MAX_SCENE_FLOWERS
    )
    max_flowers = _f._check_int(max_flowers, "max_flowers", low=min_flowers, high=MAX_SCENE_FLOWERS)
    if len(pool) < max_flowers:
        raise ValueError(
            f"classes must hold at least max_flowers = {max_flowers} different class ids "
            f"(a scene's flowers are of different classes), got {len(pool)}"
        )
    cell_size = _f._check_int(
        cell_size, "cell_size", low=_f.MIN_IMAGE_SIZE, high=_f.MAX_IMAGE_SIZE // GRID
    )
    seed = _f._check_int(seed, "seed", low=0)
    start_index = _f._check_int(start_index, "start_index", low=0)
    layouts = [
        _layout(seed, start_index + i, pool, min_flowers, max_flowers) for i in range(scenes)
    ]
    parts = [_render_scenes(layouts[s : s + 16], seed, cell_size) for s in range(0, scenes, 16)]
    return SceneBatch(*(torch.cat(column) for column in zip(*parts, strict=True)))


def _layout(
    seed: int, index: int, pool: list[int], low: int, high: int
) -> tuple[int, list[int], list[int]]:
    """``(scene index, classes, cells)`` of one scene, from the scene's own generator."""
    rng = np.random.default_rng([_f._SEED_DOMAIN, _SCENE_DOMAIN, seed, index])
    count = int(rng.integers(low, high + 1))
    labels = [pool[int(i)] for i in rng.choice(len(pool), size=count, replace=False)]
    cells = [int(c) for c in rng.permutation(MAX_SCENE_FLOWERS)[:count]]
    return index, labels, cells


def _render_scenes(
    layouts: list[tuple[int, list[int], list[int]]], seed: int, cell: int
) -> tuple[torch.Tensor, ...]:
    """Render a chunk of scenes: one renderer row per flower, composited per scene."""
    size = GRID * cell
    rows: list[dict[str, object]] = []
    labels: list[int] = []
    noise = np.empty((sum(len(lab) for _, lab, _ in layouts), 3, size, size), dtype=np.float32)
    for index, scene_labels, cells in layouts:
        for j, position in enumerate(cells):
            rng = np.random.default_rng([_f._SEED_DOMAIN, _SCENE_DOMAIN, seed, index, j + 1])
            row = _f._draw_scene(rng, cell, noise[len(rows)])
            row["centre_x"] += (position % GRID) * cell  # type: ignore[operator]
            row["centre_y"] += (position // GRID) * cell  # type: ignore[operator]
            rows.append(row)
        labels.extend(scene_labels)
    columns = {
        f.name: torch.from_numpy(np.stack([np.asarray(r[f.name]) for r in rows])).float()
        for f in fields(_f._Scene)
        if f.name != "noise"
    }
    scene = _f._Scene(**columns, noise=torch.from_numpy(noise))
    layer, colour = _f._discriminative_spec(labels)
    drawn, part_map = _f._render(scene, layer, colour)
    all_masks = part_map == layer[:, None, None]
    all_boxes = _f._tight_boxes(all_masks)

    count = len(layouts)
    images = torch.empty(count, 3, size, size)
    out_labels = torch.full((count, MAX_SCENE_FLOWERS), -1, dtype=torch.int64)
    out_cells = torch.full((count, MAX_SCENE_FLOWERS), -1, dtype=torch.int64)
    masks = torch.zeros(count, MAX_SCENE_FLOWERS, size, size, dtype=torch.bool)
    boxes = torch.zeros(count, MAX_SCENE_FLOWERS, 4, dtype=torch.int64)
    row = 0
    for s, (_, scene_labels, cells) in enumerate(layouts):
        n = len(scene_labels)
        canvas = drawn[row]  # the first flower with its background and noise
        for j in range(1, n):  # every other flower's drawn pixels on top (cells are disjoint)
            drawn_here = (part_map[row + j] != _f._Layer.BACKGROUND).unsqueeze(0)
            canvas = torch.where(drawn_here, drawn[row + j], canvas)
        images[s] = canvas
        out_labels[s, :n] = torch.tensor(scene_labels)
        out_cells[s, :n] = torch.tensor(cells)
        masks[s, :n] = all_masks[row : row + n]
        boxes[s, :n] = all_boxes[row : row + n]
        row += n
    counts = (out_labels >= 0).sum(dim=1)
    return images, out_labels, masks, boxes, out_cells, counts
