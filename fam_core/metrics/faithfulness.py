"""Faithfulness metrics: does the model's score follow what the map highlights?

- :func:`average_drop` / :func:`increase_in_confidence` -- FAM (Liao et al.) eq. 21-22,
  on the similarity to the target for embedding models and on the class score for classifiers,
  the masked image being :func:`masked_model_input` (``L ∘ X`` on the model's input);
- :func:`deletion_curve` / :func:`insertion_curve` and :func:`curve_auc` -- the score while the
  most relevant pixels are removed from (inserted into) the image, and its area;
- :func:`explanation_map_images` / :func:`explanation_map_average_precision` -- the explanation
  map metric of Grad-FAM / Score-FAM (Wu et al.), appendix A.

Scores come from a :data:`ScoreFunction`: it takes images ``[B, 3, H, W]`` in ``[0, 1]`` and
returns ``[B]`` scores, row ``i`` scored against item ``i``'s own target (see
:func:`fam_core.metrics.scoring.similarity_scorer` and ``class_probability_scorer``).
Images stay in ``[0, 1]`` pixel space; the scorer normalises them for the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from fam_core.metrics._checks import check_maps, check_scores
from fam_core.tasks.retrieval import average_precision

ScoreFunction = Callable[[torch.Tensor], torch.Tensor]
Baseline = Literal["zeros", "mean", "blur"] | torch.Tensor
BASELINES = ("zeros", "mean", "blur")
EXPLANATION_MAP_GRADES = (1 / 3, 2 / 3)
"""Default grade thresholds of the explanation map: ``[0, 1/3)`` low (blue in the jet colour
map, masked), ``[1/3, 2/3)`` medium (green, kept at 90 %), ``[2/3, 1]`` high (red, kept)."""
MEDIUM_KEPT = 0.9
"""Share of a medium-grade pixel's information that the explanation map keeps (appendix A)."""


def average_drop(scores: torch.Tensor, masked_scores: torch.Tensor) -> float:
    """Average Drop in percent, eq. 21: ``AD = 1/N sum_i max(0, s_i - s'_i) / s_i x 100``.

    ``s_i`` is the score of image ``i`` (its similarity to the support image / target, or its
    class score) and ``s'_i`` the score of the image masked by its map
    (:func:`masked_by_map`). Lower is better. Items with ``s_i <= 0`` have no relative drop
    and are left out; if none is left the result is ``nan``.

    Example:
        >>> average_drop(torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.6]))
        25.0
    """
    drops = relative_drops(scores, masked_scores)
    if drops.isnan().all():
        return float("nan")
    return float(drops.nanmean())


def relative_drops(scores: torch.Tensor, masked_scores: torch.Tensor) -> torch.Tensor:
    """Per-image terms of eq. 21 in percent, ``100 max(0, s_i - s'_i) / s_i``; ``nan`` where
    ``s_i <= 0`` (no relative drop). Their NaN-ignoring mean is :func:`average_drop`.

    Example:
        >>> relative_drops(torch.tensor([1.0, 0.5, -1.0]), torch.tensor([0.5, 0.6, 0.0]))
        tensor([50.,  0., nan])
    """
    scores, masked_scores = _check_pair(scores, masked_scores)
    drop = 100 * (scores - masked_scores).clamp_min(0) / scores.clamp_min(1e-12)
    return torch.where(scores > 0, drop, torch.full_like(drop, float("nan")))


def increase_in_confidence(scores: torch.Tensor, masked_scores: torch.Tensor) -> float:
    """Increase in Confidence in percent, eq. 22: ``IC = 1/N sum_i 1[s_i < s'_i] x 100``.

    Higher is better.

    Example:
        >>> increase_in_confidence(torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.6]))
        50.0
    """
    return float(confidence_increases(scores, masked_scores).mean())


def confidence_increases(scores: torch.Tensor, masked_scores: torch.Tensor) -> torch.Tensor:
    """Per-image terms of eq. 22 in percent, ``100 x 1[s_i < s'_i]``; their mean is
    :func:`increase_in_confidence`.

    Example:
        >>> confidence_increases(torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.6]))
        tensor([  0., 100.])
    """
    scores, masked_scores = _check_pair(scores, masked_scores)
    return 100 * (scores < masked_scores).to(scores.dtype)


def masked_by_map(
    images: torch.Tensor, maps: torch.Tensor, baseline: Baseline = "zeros"
) -> torch.Tensor:
    """The image masked by its saliency map: ``b + L * (X - b)``; with the ``"zeros"`` baseline
    this is ``L ∘ X``, the masking of eq. 21-22 (Grad-CAM++'s ``E = L ∘ X``).

    Example:
        >>> masked_by_map(torch.ones(1, 3, 2, 2), torch.full((1, 2, 2), 0.5))[0, 0]
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]])
    """
    images, maps = _check_images_maps(images, maps)
    return blend(images, maps, baseline)


def masked_model_input(
    images: torch.Tensor, maps: torch.Tensor, mean: tuple[float, ...] | torch.Tensor
) -> torch.Tensor:
    """Images in ``[0, 1]`` whose model input is ``L ∘ X``: the masking of eq. 21-22 applied
    to the model's own (normalised) input, as Grad-CAM++'s ``E = L ∘ X``.

    The model sees ``normalize(x) = (x - mean) / std``; blending towards the normalisation
    ``mean`` gives ``normalize(mean + L (X - mean)) = L ∘ normalize(X)``. Masking the
    ``[0, 1]`` image instead (baseline ``"zeros"``) paints the removed pixels black, which is
    a class colour of the embedded benchmark and far outside the training images: every
    class score collapses (Average Drop ~100 %, no Increase in Confidence ever).

    Example:
        >>> x = torch.ones(1, 3, 1, 1); half = torch.full((1, 1, 1), 0.5)
        >>> masked_model_input(x, half, (0.5, 0.5, 0.5)).flatten()
        tensor([0.7500, 0.7500, 0.7500])
    """
    images, maps = _check_images_maps(images, maps)
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device)
    if mean.numel() != images.shape[1]:
        raise ValueError(f"mean must have one value per channel ({images.shape[1]}), got {mean}")
    return blend(images, maps, mean.view(1, -1, 1, 1))


def blend(images: torch.Tensor, keep: torch.Tensor, baseline: Baseline) -> torch.Tensor:
    """``b + keep * (X - b)``: keep ``keep`` ``[B, H, W]`` of each pixel, the rest from ``b``."""
    base = baseline_images(images, baseline)
    return base + keep.unsqueeze(1).to(images.dtype) * (images - base)


def baseline_images(images: torch.Tensor, baseline: Baseline) -> torch.Tensor:
    """What a removed pixel becomes: ``"zeros"`` (black), ``"mean"`` (each image's mean
    colour), ``"blur"`` (a 11x11 box blur of the image) or a tensor broadcastable to images."""
    if isinstance(baseline, torch.Tensor):
        return baseline.to(images).expand_as(images)
    if baseline == "zeros":
        return torch.zeros_like(images)
    if baseline == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    if baseline == "blur":
        return F.avg_pool2d(images, 11, 1, 5, count_include_pad=False)
    raise ValueError(f"baseline must be one of {BASELINES} or a tensor, got {baseline!r}")


def relevance_order(maps: torch.Tensor) -> torch.Tensor:
    """Rank ``[B, H*W]`` of every pixel, 0 for the most relevant (stable: ties in row-major order)."""
    order = torch.sort(maps.flatten(1), dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


# deletion_curve and insertion_curve keep separate, identical signatures on purpose: two public
# metrics, each documented on its own; both run _pixel_curve.
@torch.no_grad()
def deletion_curve(
    score: ScoreFunction,
    images: torch.Tensor,
    maps: torch.Tensor,
    *,
    steps: int = 16,
    baseline: Baseline = "mean",
) -> torch.Tensor:
    """Score while the most relevant pixels are replaced by the baseline, ``[B, steps + 1]``.

    Point ``k`` removes the ``round(k / steps * H * W)`` most relevant pixels (RISE's deletion).
    A faithful map makes the score fall fast: a low :func:`curve_auc` is better. The default
    baseline is each image's mean colour, because black and white are class colours of the
    embedded benchmark.

    Example:
        >>> score = lambda x: x[:, 0].flatten(1).mean(dim=1)
        >>> image = torch.zeros(1, 3, 2, 2); image[0, 0, 0, 0] = 1.0
        >>> deletion_curve(score, image, image[:, 0], steps=4, baseline="zeros")
        tensor([[0.2500, 0.0000, 0.0000, 0.0000, 0.0000]])
    """
    return _pixel_curve(score, images, maps, steps, baseline, insert=False)


@torch.no_grad()
def insertion_curve(
    score: ScoreFunction,
    images: torch.Tensor,
    maps: torch.Tensor,
    *,
    steps: int = 16,
    baseline: Baseline = "mean",
) -> torch.Tensor:
    """Score while the most relevant pixels are put back into the baseline, ``[B, steps + 1]``.

    The mirror of :func:`deletion_curve`; a faithful map makes the score rise fast: a high
    :func:`curve_auc` is better.

    Example:
        >>> score = lambda x: x[:, 0].flatten(1).mean(dim=1)
        >>> image = torch.zeros(1, 3, 2, 2); image[0, 0, 0, 0] = 1.0
        >>> insertion_curve(score, image, image[:, 0], steps=4, baseline="zeros")
        tensor([[0.0000, 0.2500, 0.2500, 0.2500, 0.2500]])
    """
    return _pixel_curve(score, images, maps, steps, baseline, insert=True)


def curve_auc(curves: torch.Tensor) -> torch.Tensor:
    """Area under curves ``[B, K]`` sampled evenly on ``[0, 1]`` (trapezoid rule), ``[B]``.

    Example:
        >>> curve_auc(torch.tensor([[1.0, 0.0, 0.0]]))
        tensor([0.2500])
    """
    if not isinstance(curves, torch.Tensor) or curves.dim() != 2 or curves.shape[1] < 2:
        raise ValueError("curves must be a tensor [B, K] with K >= 2 points")
    return torch.trapezoid(curves, dx=1.0 / (curves.shape[1] - 1), dim=1)


def explanation_map_images(
    images: torch.Tensor,
    maps: torch.Tensor,
    *,
    grades: tuple[float, float] = EXPLANATION_MAP_GRADES,
    medium_kept: float = MEDIUM_KEPT,
    baseline: Baseline = "zeros",
) -> torch.Tensor:
    """The explanation-map images of Wu et al., appendix A.

    Pixels are graded by their map value ``L``: high (``L >= grades[1]``) are kept completely,
    low (``L < grades[0]``) are masked, medium ones keep ``medium_kept`` (90 %) of their
    information: ``E = b + r(L) (X - b)`` with ``r`` in ``{0, medium_kept, 1}`` and ``b`` the
    baseline (``"zeros"``: masking multiplies by ``r``).

    Example:
        >>> x = torch.ones(1, 3, 1, 3)
        >>> explanation_map_images(x, torch.tensor([[[0.1, 0.5, 0.9]]]))[0, 0]
        tensor([[0.0000, 0.9000, 1.0000]])
    """
    images, maps = _check_images_maps(images, maps)
    low, high = grades
    if not 0 <= low <= high <= 1:
        raise ValueError(f"grades must be (low, high) with 0 <= low <= high <= 1, got {grades!r}")
    if not 0 <= medium_kept <= 1:
        raise ValueError(f"medium_kept must be in [0, 1], got {medium_kept!r}")
    kept = torch.where(maps >= high, 1.0, torch.where(maps >= low, medium_kept, 0.0))
    return blend(images, kept, baseline)


@torch.no_grad()
def explanation_map_average_precision(
    embed: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    maps: torch.Tensor,
    labels: torch.Tensor,
    gallery_embeddings: torch.Tensor,
    gallery_labels: torch.Tensor,
    *,
    grades: tuple[float, float] = EXPLANATION_MAP_GRADES,
    medium_kept: float = MEDIUM_KEPT,
    similarity: str = "cosine",
) -> torch.Tensor:
    """Retrieval average precision of each explanation-map image against a gallery, ``[B]``.

    The explanation-map image (:func:`explanation_map_images`) is embedded with ``embed``
    (images in ``[0, 1]`` -> ``[B, D]``) and used as the query; a faithful map keeps what the
    model retrieves with, so its AP stays close to the original image's (Wu et al., app. A).
    """
    queries = explanation_map_images(images, maps, grades=grades, medium_kept=medium_kept)
    return average_precision(
        embed(queries), labels, gallery_embeddings, gallery_labels, similarity=similarity
    )


def _pixel_curve(
    score: ScoreFunction,
    images: torch.Tensor,
    maps: torch.Tensor,
    steps: int,
    baseline: Baseline,
    *,
    insert: bool,
) -> torch.Tensor:
    images, maps = _check_images_maps(images, maps)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    ranks = relevance_order(maps).view_as(maps)
    pixels = maps.shape[1] * maps.shape[2]
    base = baseline_images(images, baseline)
    points = []
    for k in range(steps + 1):
        count = round(k * pixels / steps)
        changed = (ranks < count).to(images.dtype)
        keep = changed if insert else 1.0 - changed
        points.append(score(base + keep.unsqueeze(1) * (images - base)))
    return torch.stack(points, dim=1)


def _check_pair(scores: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = check_scores(scores, "scores")
    masked = check_scores(masked, "masked_scores")
    if scores.shape != masked.shape:
        raise ValueError(
            f"scores and masked_scores must have the same length, got {scores.numel()} "
            f"and {masked.numel()}"
        )
    return scores, masked.to(scores)


def _check_images_maps(
    images: torch.Tensor, maps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    maps = check_maps(maps)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images must be a tensor [B, C, H, W]")
    if images.shape[0] != maps.shape[0] or images.shape[2:] != maps.shape[1:]:
        raise ValueError(
            f"maps {tuple(maps.shape)} must match the images {tuple(images.shape)} in batch "
            "size and resolution (use Explanation.maps, at input resolution)"
        )
    return images, maps.to(images.device)
