"""Pieces the CAM family shares: the explained score, the rectified sum, batched scoring.

FAM paper (Liao et al.), section III: every CAM method combines activation maps,
``L^c = ReLU(sum_n a_n A^n)`` (eq. 2), and differs in the weights ``a_n``. Here the score
``y^c`` they explain is the explainer's :meth:`~fam_core.explainers.base.Explainer.score`:
the class logit for class targets, the mean similarity to the references for embedding
targets (FAM eq. 11), which is how those methods are applied to embedding models.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fam_core.explainers.base import (
    Explainer,
    ForwardPass,
    ResolvedTarget,
    upsample,
)
from fam_core.explanation import Explanation

_EPS = 1e-12


def explained_score(
    explainer: Explainer, outputs: torch.Tensor, target: ResolvedTarget
) -> torch.Tensor:
    """The score ``y [B]`` a CAM method explains, differentiable in ``outputs``.

    With ``target.explains_self`` (no target on an embedding model) the references are
    the detached outputs themselves, where every similarity is flat (the gradient of
    ``cos(z, z)`` in ``z`` is zero). The score is then the projection of the embedding on
    its own direction with its norm held constant, ``<z, r> / (|z| |r|)``: its value is the
    cosine (1) and its gradient ``r / (|z| |r|)`` is the linear part of the cosine, the
    same decomposition FAM uses (FAM eq. 14).
    """
    if not target.explains_self:
        return explainer.score(outputs, target)
    references = target.references
    norms = outputs.detach().norm(dim=1, keepdim=True) * references.norm(dim=2)
    projections = (outputs.unsqueeze(1) * references).sum(dim=2) / norms.clamp_min(_EPS)
    return projections.mean(dim=1)


def rectified_sum(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """``ReLU(sum_n a_n A^n)`` (FAM paper eq. 2), ``[B, h, w]``."""
    return F.relu(torch.einsum("bn,bnhw->bhw", weights, activations))


class GradientCAM(Explainer):
    """Base of the gradient methods: ``dy/dA`` (FAM paper eq. 3, 5) and a rectified map."""

    needs_gradients = True

    def score_gradients(
        self, forward: ForwardPass, target: ResolvedTarget
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dy/dA [B, N, h, w], y [B])`` for the explained score ``y``."""
        scores = explained_score(self, forward.outputs, target)
        return self.gradients(forward, scores), scores

    def combine(self, weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        return rectified_sum(weights, activations)  # eq. 2


def select_references(target: ResolvedTarget, rows: torch.Tensor) -> ResolvedTarget:
    """The target of the images ``rows`` of the batch (for batched re-scoring)."""
    return ResolvedTarget(target.references[rows], target.similarity, target.explains_self)


def chunks(total: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``batch_size`` covering ``range(total)``."""
    for start in range(0, total, batch_size):
        yield slice(start, min(start + batch_size, total))


def check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


class BatchedExplainer(Explainer):
    """An explainer that scores perturbed copies of the input ``batch_size`` at a time."""

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        batch_size: int = 32,
        **options: object,
    ) -> None:
        super().__init__(model, target_layer, **options)  # type: ignore[arg-type]
        self.batch_size = check_batch_size(batch_size)


def build_explanation(
    explainer: Explainer,
    images: torch.Tensor,
    raw: torch.Tensor,
    weights: torch.Tensor,
    scores: torch.Tensor,
    extras: dict[str, torch.Tensor],
) -> Explanation:
    """Assemble an :class:`Explanation` as the base template does (upsample + min-max)."""
    return Explanation(
        maps=upsample(raw, images.shape[-2:]),
        raw=raw.detach(),
        weights=weights.detach(),
        scores=scores.detach(),
        method=explainer.method,
        target_layer=explainer.target_layer,
        extras={name: value.detach() for name, value in extras.items()},
    )
