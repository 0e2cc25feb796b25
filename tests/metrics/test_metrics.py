"""Metrics on hand-made maps, masks and toy models with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fam_core.metrics.faithfulness import (
    average_drop,
    curve_auc,
    deletion_curve,
    explanation_map_average_precision,
    explanation_map_images,
    increase_in_confidence,
    insertion_curve,
    masked_by_map,
    masked_model_input,
)
from fam_core.metrics.localisation import (
    area_under_iou_curve,
    box_iou,
    boxes_to_masks,
    connected_components,
    energy_pointing_proportion,
    estimated_boxes,
    mask_iou_curve,
    pointing_game,
)
from fam_core.metrics.sanity import cascading_randomisation, rank, spearman
from fam_core.metrics.scoring import class_probability_scorer, similarity_scorer
from fam_core.models.backbones import conv4


def square_mask(size: int = 16, lo: int = 4, hi: int = 10) -> torch.Tensor:
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, lo:hi, lo:hi] = True
    return mask


# -- localisation -----------------------------------------------------------------------------


def test_map_equal_to_mask_gives_proportion_one_and_iou_one() -> None:
    mask = square_mask()
    box = torch.tensor([[4, 4, 10, 10]])
    maps = mask.float()
    assert energy_pointing_proportion(maps, box).item() == 1.0
    assert energy_pointing_proportion(maps, mask).item() == 1.0
    assert box_iou(maps, box).item() == 1.0
    assert pointing_game(maps, mask).item() == 1.0
    # IoU is 1 for every threshold above 0; at t = 0 every pixel is in: 36 / 256
    curve = mask_iou_curve(maps, mask, (0.0, 0.5, 1.0))
    assert torch.allclose(curve, torch.tensor([[36 / 256, 1.0, 1.0]]))


def test_map_outside_the_mask_gives_zero() -> None:
    mask = square_mask()
    outside = (~mask).float()
    box = torch.tensor([[4, 4, 10, 10]])
    assert energy_pointing_proportion(outside, box).item() == 0.0
    assert pointing_game(outside, mask).item() == 0.0
    corner = torch.zeros(1, 16, 16)
    corner[0, 12:, 12:] = 1.0
    assert box_iou(corner, box).item() == 0.0
    assert mask_iou_curve(corner, mask, (0.5, 1.0)).sum().item() == 0.0


def test_energy_proportion_by_hand() -> None:
    maps = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])
    box = torch.tensor([[1, 0, 2, 2]])  # the right column
    assert energy_pointing_proportion(maps, box).item() == pytest.approx(7 / 8)
    assert energy_pointing_proportion(torch.zeros(1, 2, 2), box).item() == 0.0


def test_box_iou_boxes_only_the_largest_component_above_a_fifth_of_the_max() -> None:
    maps = torch.zeros(1, 12, 12)
    maps[0, 1:5, 1:5] = 1.0  # 16 pixels
    maps[0, 8:11, 8:10] = 0.5  # 6 pixels, above 0.2 max but smaller
    maps[0, 6, 0:12] = 0.1  # below 0.2 * max: background
    assert estimated_boxes(maps).tolist() == [[1, 1, 5, 5]]
    # ground truth box (1, 1, 7, 5): intersection 16, union 24
    assert box_iou(maps, torch.tensor([[1, 1, 7, 5]])).item() == pytest.approx(16 / 24)


def test_connected_components_use_8_connectivity_and_separate_blobs() -> None:
    x = torch.zeros(1, 5, 5, dtype=torch.bool)
    x[0, 0, 0] = x[0, 1, 1] = x[0, 2, 2] = True  # diagonal: one component
    x[0, 4, 0] = True  # alone
    labels = connected_components(x)
    assert len({labels[0, 0, 0].item(), labels[0, 1, 1].item(), labels[0, 2, 2].item()}) == 1
    assert labels[0, 4, 0] != labels[0, 0, 0]
    assert (labels[~x] == 0).all()


def test_pointing_game_tolerance() -> None:
    maps = torch.zeros(1, 9, 9)
    maps[0, 0, 0] = 1.0
    mask = torch.zeros(1, 9, 9, dtype=torch.bool)
    mask[0, 2, 2] = True
    assert pointing_game(maps, mask).item() == 0.0
    assert pointing_game(maps, mask, tolerance=2).item() == 1.0


def test_iou_curve_area_by_hand() -> None:
    mask = torch.zeros(1, 1, 4, dtype=torch.bool)
    mask[0, 0, :2] = True
    maps = torch.tensor([[[1.0, 0.5, 0.0, 0.0]]])
    curve = mask_iou_curve(maps, mask, (0.0, 0.5, 1.0))
    assert curve.tolist() == [[0.5, 1.0, 0.5]]
    area = area_under_iou_curve(maps, mask, (0.0, 0.5, 1.0)).item()
    assert area == pytest.approx(0.5 * (0.75 + 0.75))


def test_boxes_to_masks_and_bad_inputs() -> None:
    assert boxes_to_masks(torch.tensor([[0, 0, 2, 1]]), 2, 3).sum().item() == 2
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        energy_pointing_proportion(torch.zeros(4, 4), torch.zeros(1, 4))
    with pytest.raises(TypeError, match="integer"):
        box_iou(torch.zeros(1, 4, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="increasing"):
        mask_iou_curve(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool), (0.5, 0.1))


# -- faithfulness -----------------------------------------------------------------------------


def test_average_drop_and_increase_by_hand() -> None:
    s = torch.tensor([1.0, 0.5, 0.8, -0.2])
    masked = torch.tensor([0.25, 0.75, 0.8, 0.1])
    # eq. 21 over items with s > 0: (0.75 + 0 + 0) / 3 * 100
    assert average_drop(s, masked) == pytest.approx(25.0)
    # eq. 22: s < s' for items 1 and 3
    assert increase_in_confidence(s, masked) == pytest.approx(50.0)
    assert math.isnan(average_drop(torch.tensor([-1.0]), torch.tensor([0.0])))


def test_masked_by_map_is_the_elementwise_product() -> None:
    images = torch.rand(2, 3, 5, 5)
    maps = torch.rand(2, 5, 5)
    assert torch.allclose(masked_by_map(images, maps), images * maps.unsqueeze(1))


def test_eq21_masking_acts_on_the_models_normalised_input_by_hand() -> None:
    # normalize(x) = (x - 0.5) / 0.25; image 0.8 -> model input 1.2; L = 0.5 -> L ∘ X = 0.6
    images = torch.full((1, 3, 2, 2), 0.8)
    maps = torch.full((1, 2, 2), 0.5)
    masked = masked_model_input(images, maps, (0.5, 0.5, 0.5))
    assert torch.allclose((masked - 0.5) / 0.25, torch.full_like(images, 0.6))
    # the bug this replaced: masking the [0, 1] image gives (0.4 - 0.5) / 0.25 = -0.4
    assert torch.allclose((masked_by_map(images, maps) - 0.5) / 0.25, torch.full_like(images, -0.4))
    # a score linear in the model input (no bias) then falls exactly by the factor L
    score = lambda x: ((x - 0.5) / 0.25).mean(dim=(1, 2, 3))  # noqa: E731
    assert score(masked).item() == pytest.approx(0.5 * score(images).item())
    with pytest.raises(ValueError, match="one value per channel"):
        masked_model_input(images, maps, (0.5, 0.5))


def test_increase_in_confidence_counts_strict_increases_only() -> None:
    s = torch.tensor([0.5, 0.5, 0.5, 0.5])
    assert increase_in_confidence(s, torch.tensor([0.5, 0.6, 0.4, 0.5])) == pytest.approx(25.0)
    assert average_drop(s, torch.tensor([0.5, 0.6, 0.4, 0.5])) == pytest.approx(5.0)


class RedPixel(nn.Module):
    """Toy model: its score is the red channel at pixel (0, 0) plus a tenth at (0, 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, 0] + 0.1 * x[:, 0, 0, 1]


def test_deletion_auc_of_the_perfect_ranking_is_lower_than_the_reversed() -> None:
    model = RedPixel()
    images = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(0)) + 0.5
    perfect = torch.zeros(3, 6, 6)
    perfect[:, 0, 0], perfect[:, 0, 1] = 1.0, 0.5
    reversed_ranking = 1.0 - perfect
    for score_name in ("zeros", "mean"):
        good = curve_auc(deletion_curve(model, images, perfect, steps=12, baseline=score_name))
        bad = curve_auc(deletion_curve(model, images, reversed_ranking, steps=12, baseline="zeros"))
        if score_name == "zeros":
            assert (good < bad).all()
    ins_good = curve_auc(insertion_curve(model, images, perfect, steps=12, baseline="zeros"))
    ins_bad = curve_auc(
        insertion_curve(model, images, reversed_ranking, steps=12, baseline="zeros")
    )
    assert (ins_good > ins_bad).all()


def test_deletion_curve_end_points() -> None:
    model = RedPixel()
    images = torch.rand(2, 3, 4, 4) + 0.1
    maps = torch.rand(2, 4, 4)
    curve = deletion_curve(model, images, maps, steps=4, baseline="zeros")
    assert torch.allclose(curve[:, 0], model(images))
    assert torch.allclose(curve[:, -1], torch.zeros(2))
    insertion = insertion_curve(model, images, maps, steps=4, baseline="zeros")
    assert torch.allclose(insertion[:, 0], torch.zeros(2))
    assert torch.allclose(insertion[:, -1], model(images))
    assert curve_auc(torch.tensor([[0.0, 1.0]])).item() == 0.5


def test_explanation_map_grades_and_ap() -> None:
    images = torch.ones(1, 3, 1, 4)
    maps = torch.tensor([[[0.0, 0.4, 0.7, 1.0]]])
    kept = explanation_map_images(images, maps)[0, 0, 0]
    assert kept.tolist() == pytest.approx([0.0, 0.9, 1.0, 1.0])
    custom = explanation_map_images(images, maps, grades=(0.5, 0.9), medium_kept=0.5)[0, 0, 0]
    assert custom.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0])

    def embed(x: torch.Tensor) -> torch.Tensor:  # the embedding is the mean of the 2 halves
        return torch.stack([x[:, 0, :, :2].mean(dim=(1, 2)), x[:, 0, :, 2:].mean(dim=(1, 2))], 1)

    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    image = torch.zeros(1, 3, 1, 4)
    image[0, 0, 0, :2] = 1.0  # mostly class 0, a little of class 1
    image[0, 0, 0, 2:] = 0.3
    right = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])  # keeps the left half
    wrong = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    ap_right = explanation_map_average_precision(
        embed, image, right, torch.tensor([0]), gallery, labels
    )
    ap_wrong = explanation_map_average_precision(
        embed, image, wrong, torch.tensor([0]), gallery, labels
    )
    assert ap_right.item() == 1.0 and ap_wrong.item() == 0.5


def test_scorers() -> None:
    model = conv4(width=0.25).eval()
    x = torch.rand(2, 3, 32, 32)
    refs = model(x).detach().unsqueeze(1)
    assert torch.allclose(similarity_scorer(model, lambda v: v, refs)(x), torch.ones(2), atol=1e-5)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    inputs = torch.rand(2, 3, 2, 2)
    expected = torch.softmax(linear(inputs), dim=1)[[0, 1], [2, 0]]
    got = class_probability_scorer(linear, lambda v: v, torch.tensor([2, 0]))(inputs)
    assert torch.allclose(got, expected)


# -- sanity -----------------------------------------------------------------------------------


def test_rank_and_spearman_by_hand() -> None:
    assert rank(torch.tensor([[3.0, 1.0, 2.0, 1.0]])).tolist() == [[4.0, 1.5, 3.0, 1.5]]
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    b = torch.tensor([[5.0, 6.0, 7.0, 8.0, 7.0]])
    # ranks 1..5 vs 1, 2, 3.5, 5, 3.5 -> Pearson of ranks
    ra, rb = torch.tensor([1, 2, 3, 4, 5.0]), torch.tensor([1, 2, 3.5, 5, 3.5])
    expected = torch.corrcoef(torch.stack([ra, rb]))[0, 1]
    assert spearman(a, b).item() == pytest.approx(expected.item(), abs=1e-6)
    const = torch.ones(1, 5)
    assert spearman(const, const).item() == 1.0 and spearman(const, a).item() == 0.0


def test_randomisation_fails_for_a_map_that_ignores_the_model() -> None:
    torch.manual_seed(0)
    model = conv4(width=0.25).eval()
    x = torch.rand(2, 3, 32, 32)
    result = cascading_randomisation(model, lambda _m: x.mean(dim=1))
    assert result.layers == ("block4", "block3", "block2", "block1")
    assert result.correlations == (1.0, 1.0, 1.0, 1.0) and not result.passed


def test_randomisation_passes_for_a_map_made_of_the_model_and_leaves_it_unchanged() -> None:
    torch.manual_seed(0)
    model = conv4(width=0.25).eval()
    x = torch.rand(2, 3, 32, 32)
    before = [p.clone() for p in model.parameters()]

    def input_gradient(m: nn.Module) -> torch.Tensor:
        inputs = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(m(inputs).square().sum(), inputs)
        return grad.abs().sum(dim=1)

    result = cascading_randomisation(model, input_gradient, seed=1)
    assert result.passed and result.final_correlation < 0.5
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
