"""Tests for the multi-flower scenes (fam_core.data.scenes)."""

from __future__ import annotations

import pytest
import torch

from fam_core.data.flowers import COLOURS, SPLITS, class_attributes
from fam_core.data.scenes import GRID, MAX_SCENE_FLOWERS, SceneBatch, make_scenes

CELL = 40


@pytest.fixture(scope="module")
def scenes() -> SceneBatch:
    return make_scenes(SPLITS["novel"], 12, cell_size=CELL, seed=7)


def test_shapes_counts_and_padding(scenes: SceneBatch) -> None:
    size = GRID * CELL
    assert scenes.images.shape == (12, 3, size, size)
    assert scenes.masks.shape == (12, MAX_SCENE_FLOWERS, size, size)
    assert scenes.boxes.shape == (12, MAX_SCENE_FLOWERS, 4)
    assert ((scenes.counts >= 2) & (scenes.counts <= 4)).all()
    assert len(set(scenes.counts.tolist())) > 1  # 12 scenes draw more than one count
    for s in range(12):
        n = int(scenes.counts[s])
        assert (scenes.labels[s, :n] >= 0).all() and (scenes.labels[s, n:] == -1).all()
        assert (scenes.cells[s, :n] >= 0).all() and (scenes.cells[s, n:] == -1).all()
        assert scenes.masks[s, :n].flatten(1).any(dim=1).all()  # every flower's part shows
        assert not scenes.masks[s, n:].any() and (scenes.boxes[s, n:] == 0).all()
    assert scenes.images.min() >= 0 and scenes.images.max() <= 1


def test_classes_and_cells_distinct_and_novel(scenes: SceneBatch) -> None:
    for s in range(12):
        n = int(scenes.counts[s])
        labels, cells = scenes.labels[s, :n].tolist(), scenes.cells[s, :n].tolist()
        assert len(set(labels)) == n and len(set(cells)) == n
        assert set(labels) <= set(SPLITS["novel"])


def test_part_masks_are_disjoint_and_inside_their_cell(scenes: SceneBatch) -> None:
    assert (scenes.masks.sum(dim=1) <= 1).all()  # no pixel is in two flowers' parts
    for s in range(12):
        for j in range(int(scenes.counts[s])):
            row, col = divmod(int(scenes.cells[s, j]), GRID)
            x0, y0, x1, y1 = scenes.boxes[s, j].tolist()
            assert col * CELL <= x0 < x1 <= (col + 1) * CELL
            assert row * CELL <= y0 < y1 <= (row + 1) * CELL
            ys, xs = scenes.masks[s, j].nonzero(as_tuple=True)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)


def test_masked_pixels_carry_the_flower_class_colour(scenes: SceneBatch) -> None:
    # pixel noise is uniform with std 0.03 (half-width 0.052): the mean colour on a part
    # is its class colour within noise and clamping
    for s in range(12):
        for j in range(int(scenes.counts[s])):
            colour = torch.tensor(COLOURS[class_attributes(int(scenes.labels[s, j]))[1]])
            pixels = scenes.images[s][:, scenes.masks[s, j]]
            assert (pixels.mean(dim=1) - colour).abs().max() < 0.04


def test_deterministic_and_independent_of_the_batch(scenes: SceneBatch) -> None:
    again = make_scenes(SPLITS["novel"], 12, cell_size=CELL, seed=7)
    alone = make_scenes(SPLITS["novel"], 1, cell_size=CELL, seed=7, start_index=5)
    other = make_scenes(SPLITS["novel"], 1, cell_size=CELL, seed=8, start_index=5)
    assert torch.allclose(again.images, scenes.images, atol=1e-6)
    assert torch.equal(again.labels, scenes.labels) and torch.equal(again.masks, scenes.masks)
    assert torch.allclose(alone.images[0], scenes.images[5], atol=1e-6)
    assert torch.equal(alone.masks[0], scenes.masks[5])
    assert not torch.allclose(other.images[0], scenes.images[5], atol=1e-2)


def test_flower_count_bounds_are_honoured() -> None:
    pairs = make_scenes(range(6), 5, min_flowers=2, max_flowers=2, cell_size=32)
    fours = make_scenes(range(6), 5, min_flowers=4, max_flowers=4, cell_size=32)
    assert pairs.counts.tolist() == [2] * 5 and fours.counts.tolist() == [4] * 5
    assert (fours.cells.sort(dim=1).values == torch.arange(4)).all()  # every cell used


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": [0, 1, 2], "scenes": 1}, "at least max_flowers = 4"),
        ({"classes": [0, 1, 1, 2], "scenes": 1, "max_flowers": 4}, "at least max_flowers"),
        ({"classes": range(8), "scenes": 0}, "scenes must be"),
        ({"classes": range(8), "scenes": 1, "min_flowers": 1}, "min_flowers must be"),
        ({"classes": range(8), "scenes": 1, "min_flowers": 3, "max_flowers": 2}, "max_flowers"),
        ({"classes": range(8), "scenes": 1, "max_flowers": 5}, "max_flowers must be"),
        ({"classes": range(8), "scenes": 1, "cell_size": 300}, "cell_size must be"),
        ({"classes": [0, 1, 2, 99], "scenes": 1}, "classes must contain"),
        ({"classes": range(8), "scenes": 1, "seed": -1}, "seed must be"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_scenes(**kwargs)
