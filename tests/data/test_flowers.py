"""Tests for the procedural an8Flower-style benchmark (fam_core.data.flowers)."""

from __future__ import annotations

import inspect

import pytest
import torch

from fam_core.data import flowers as F
from fam_core.data.flowers import (
    CLASS_NAMES,
    COLOURS,
    ELEMENTS,
    NUM_CLASSES,
    SPLITS,
    FlowerBatch,
    class_attributes,
    make_flowers,
    make_flowers_for,
    split_of,
)

GREY = (0.5, 0.5, 0.5)  # differs from every class colour by 0.5 in every channel


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Rendering is many small elementwise ops; on a busy 2-core machine intra-op threads
    contend badly, so this module renders single-threaded (and restores the setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def every_class() -> FlowerBatch:
    return make_flowers(range(NUM_CLASSES), per_class=3, seed=11)


def _scene_and_spec(labels: list[int], indices: list[int], seed: int = 0, size: int = 84):
    scene = F._sample_scenes(labels, indices, seed, size)
    layer, colour = F._discriminative_spec(labels)
    return scene, layer, colour


def _tight_box(mask: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _colour_distance_to_palette(rgb: torch.Tensor) -> torch.Tensor:
    """Distance of each colour [..., 3] to the nearest class colour."""
    palette = torch.tensor(list(COLOURS.values()))
    return torch.cdist(rgb.reshape(-1, 3).double(), palette.double()).min(dim=1).values


# ------------------------------------------------------------------------- class design


def test_class_table() -> None:
    assert NUM_CLASSES == 48 == len(CLASS_NAMES) == len(ELEMENTS) * len(COLOURS)
    assert len(set(CLASS_NAMES)) == NUM_CLASSES
    assert CLASS_NAMES[0] == "petals-red"
    assert CLASS_NAMES[-1] == "stem-thorns-black"
    for class_id, name in enumerate(CLASS_NAMES):
        element, colour = class_attributes(class_id)
        assert name == f"{element}-{colour}"


def test_splits_disjoint_and_covering() -> None:
    assert set(SPLITS) == {"base", "val", "novel"}
    assert [len(SPLITS[k]) for k in ("base", "val", "novel")] == [24, 6, 18]
    union = [c for ids in SPLITS.values() for c in ids]
    assert sorted(union) == list(range(NUM_CLASSES))
    for name, ids in SPLITS.items():
        assert all(split_of(c) == name for c in ids)


def test_novel_classes_recombine_base_elements_and_colours() -> None:
    base = [class_attributes(c) for c in SPLITS["base"]]
    for element in ELEMENTS:
        assert sum(e == element for e, _ in base) == 4
    for colour in COLOURS:
        assert sum(c == colour for _, c in base) == 3
    for class_id in SPLITS["val"] + SPLITS["novel"]:
        element, colour = class_attributes(class_id)
        assert any(e == element for e, _ in base) and any(c == colour for _, c in base)


# ---------------------------------------------------------------- shapes and determinism


def test_shapes_dtypes_and_ranges(every_class: FlowerBatch) -> None:
    b = every_class
    n = 3 * NUM_CLASSES
    assert len(b) == n
    assert b.images.shape == (n, 3, 84, 84) and b.images.dtype == torch.float32
    assert b.labels.shape == (n,) and b.labels.dtype == torch.int64
    assert b.indices.shape == (n,) and b.indices.dtype == torch.int64
    assert b.masks.shape == (n, 84, 84) and b.masks.dtype == torch.bool
    assert b.boxes.shape == (n, 4) and b.boxes.dtype == torch.int64
    assert float(b.images.min()) >= 0.0 and float(b.images.max()) <= 1.0
    assert b.class_names == list(CLASS_NAMES)


def test_label_and_index_order() -> None:
    b = make_flowers(torch.tensor([5, 2]), per_class=3, start_index=4, image_size=32)
    assert b.labels.tolist() == [5, 5, 5, 2, 2, 2]
    assert b.indices.tolist() == [4, 5, 6, 4, 5, 6]


def test_same_seed_gives_identical_batches() -> None:
    a = make_flowers([0, 20, 45], per_class=4, seed=3)
    b = make_flowers([0, 20, 45], per_class=4, seed=3)
    for name in ("images", "labels", "indices", "masks", "boxes"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_image_does_not_depend_on_batch_composition() -> None:
    big = make_flowers(range(NUM_CLASSES), per_class=5, seed=2)  # several render chunks
    pairs = [(17, 3), (40, 4), (0, 0), (47, 1)]
    alone = make_flowers_for([c for c, _ in pairs], [i for _, i in pairs], seed=2)
    rows = [5 * c + i for c, i in pairs]
    assert torch.equal(alone.images, big.images[rows])
    assert torch.equal(alone.masks, big.masks[rows])
    shifted = make_flowers([17], per_class=2, seed=2, start_index=3)
    assert torch.equal(shifted.images, big.images[[5 * 17 + 3, 5 * 17 + 4]])


def test_different_seed_or_index_gives_different_images() -> None:
    a = make_flowers([1, 30], per_class=3, seed=0)
    b = make_flowers([1, 30], per_class=3, seed=1)
    assert all(not torch.equal(x, y) for x, y in zip(a.images, b.images, strict=True))
    assert not torch.equal(a.images[0], a.images[1])


@pytest.mark.parametrize("size", [32, 48, 128])
def test_other_image_sizes(size: int) -> None:
    b = make_flowers([0, 13, 38, 47], per_class=2, image_size=size, seed=4)
    assert b.images.shape == (8, 3, size, size) and b.masks.shape == (8, size, size)
    assert bool(b.masks.flatten(1).any(dim=1).all())


# ---------------------------------------------------------------------- masks and boxes


def test_masks_nonempty_and_boxes_tight(every_class: FlowerBatch) -> None:
    for mask, box in zip(every_class.masks, every_class.boxes, strict=True):
        assert bool(mask.any())
        assert box.tolist() == _tight_box(mask)


def test_mask_area_is_a_reasonable_fraction(every_class: FlowerBatch) -> None:
    area = every_class.masks.float().mean(dim=(1, 2))
    assert float(area.min()) > 0.012
    for element in range(len(ELEMENTS)):
        mean = float(area[every_class.labels // len(COLOURS) == element].mean())
        assert 0.02 < mean < 0.15, (ELEMENTS[element], mean)


def test_mask_is_exactly_the_pixels_changed_by_recolouring() -> None:
    labels = [c for c in range(NUM_CLASSES) for _ in range(2)]
    indices = [0, 1] * NUM_CLASSES
    scene, layer, colour = _scene_and_spec(labels, indices, seed=5)
    image, parts = F._render(scene, layer, colour)
    grey = torch.tensor(GREY).expand_as(colour)
    recoloured, parts_again = F._render(scene, layer, grey)
    assert torch.equal(parts, parts_again)
    changed = (image != recoloured).any(dim=1)
    public = make_flowers_for(labels, indices, seed=5)
    assert torch.equal(public.images, image)  # the hook renders exactly the public images
    assert torch.equal(changed, public.masks)


def test_class_only_changes_its_own_element() -> None:
    """Same scene, two classes: pixels outside both discriminative masks are identical."""
    labels = list(range(NUM_CLASSES))
    scene, layer, colour = _scene_and_spec(labels, [7] * NUM_CLASSES, seed=6)
    other = [(c + 13) % NUM_CLASSES for c in labels]
    other_layer, other_colour = F._discriminative_spec(other)
    image_a, parts_a = F._render(scene, layer, colour)
    image_b, parts_b = F._render(scene, other_layer, other_colour)
    mask_a = parts_a == layer[:, None, None]
    mask_b = parts_b == other_layer[:, None, None]
    outside = ~(mask_a | mask_b)
    assert torch.equal(image_a.permute(0, 2, 3, 1)[outside], image_b.permute(0, 2, 3, 1)[outside])
    assert bool((image_a != image_b).any(dim=1)[mask_a].all())


# ----------------------------------------------------------------------- class independence


def test_scene_sampler_never_sees_the_class() -> None:
    assert list(inspect.signature(F._draw_scene).parameters) == ["rng", "image_size", "noise"]


def test_nuisance_statistics_match_across_classes() -> None:
    n = 200
    stats = {}
    for label in (0, 47):
        scene = F._sample_scenes([label] * n, list(range(n)), 9, 84)
        stats[label] = torch.stack(
            [
                scene.units_per_pixel,
                scene.cos_rot,
                scene.centre_x,
                (scene.petal_offset == 1.0).sum(dim=1).float(),
                scene.stem_bend,
                scene.bg_colours.mean(dim=(1, 2, 3)),
                scene.part_colours[:, F._Layer.PETALS].mean(dim=1),
            ],
            dim=1,
        )
    a, b = stats[0], stats[47]
    standard_error = ((a.var(dim=0) + b.var(dim=0)) / n).sqrt()
    assert bool(((a.mean(dim=0) - b.mean(dim=0)).abs() < 4 * standard_error).all())


def test_neutral_palettes_are_disjoint_from_class_colours() -> None:
    scene = F._sample_scenes([0] * 300, list(range(300)), 1, 84)
    neutral = [int(layer) for layer in F._NEUTRAL_PART_PALETTE]
    assert float(_colour_distance_to_palette(scene.part_colours[:, neutral]).min()) > 0.3
    bg = scene.bg_colours.permute(0, 2, 3, 1)
    assert float(_colour_distance_to_palette(bg).min()) > 0.3


def _mean_colour(images: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    weights = region.unsqueeze(1).float()
    return (images * weights).sum(dim=(2, 3)) / weights.sum(dim=(2, 3))


def _nearest_mean_accuracy(features: torch.Tensor, labels: torch.Tensor, train: torch.Tensor):
    classes = labels.unique()
    means = torch.stack([features[train & (labels == c)].mean(dim=0) for c in classes])
    predicted = classes[torch.cdist(features[~train], means).argmin(dim=1)]
    return float((predicted == labels[~train]).float().mean())


def test_class_signal_lives_only_inside_the_mask() -> None:
    """Same element, 8 colours: the masked colour identifies the class, the rest is chance."""
    b = make_flowers(range(len(COLOURS)), per_class=40, seed=12)  # all "petals-*" classes
    train = b.indices < 20
    inside = _mean_colour(b.images, b.masks)
    outside = _mean_colour(b.images, ~b.masks)
    assert _nearest_mean_accuracy(inside, b.labels, train) == 1.0
    assert _nearest_mean_accuracy(outside, b.labels, train) < 0.3  # chance is 0.125


def test_masked_colour_is_the_class_colour(every_class: FlowerBatch) -> None:
    inside = _mean_colour(every_class.images, every_class.masks)
    expected = torch.tensor([COLOURS[class_attributes(int(c))[1]] for c in every_class.labels])
    assert torch.allclose(inside, expected, atol=0.06)


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": [48], "per_class": 1}, r"classes must contain ints in \[0, 48\)"),
        ({"classes": [-1], "per_class": 1}, r"classes must contain"),
        ({"classes": [], "per_class": 1}, r"non-empty"),
        ({"classes": "ab", "per_class": 1}, r"classes must be a sequence"),
        ({"classes": [1.5], "per_class": 1}, r"classes must contain"),
        ({"classes": torch.tensor([0.0]), "per_class": 1}, r"1-D integer tensor"),
        ({"classes": [0], "per_class": 0}, r"per_class must be an int >= 1"),
        ({"classes": [0], "per_class": 1, "image_size": 16}, r"image_size must be an int in"),
        ({"classes": [0], "per_class": 1, "seed": -1}, r"seed must be an int >= 0"),
        ({"classes": [0], "per_class": 1, "start_index": -2}, r"start_index must be"),
        ({"classes": [True], "per_class": 1}, r"classes must contain"),
    ],
)
def test_make_flowers_rejects_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_flowers(**kwargs)


def test_make_flowers_for_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="same length"):
        make_flowers_for([0, 1], [0])


@pytest.mark.parametrize("bad", [48, -1, 2.0, True])
def test_class_helpers_reject_bad_ids(bad: object) -> None:
    with pytest.raises(ValueError, match="class_id"):
        split_of(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="class_id"):
        class_attributes(bad)  # type: ignore[arg-type]
