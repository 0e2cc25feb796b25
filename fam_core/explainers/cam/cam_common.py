"""Pieces the CAM family shares: the explained score, the rectified sum, batched scoring.

FAM paper (Liao et al.), section III: every CAM method combines activation maps,
``L^c = ReLU(sum_n a_n A^n)`` (eq. 2), and differs in the weights ``a_n``. Here the score
``y^c`` they explain is the explainer's :meth:`~fam_core.explainers.base.Explainer.score`:
the class logit for class targets, the mean similarity to the references for embedding
targets (FAM eq. 11), which is how those methods are applied to embedding models.

Score-CAM and Score-FAM weight channel ``n`` of image ``i`` by the score of the input masked
with that channel's map (FAM paper eq. 7):

    M^n_i = norm(up(A^n_i))      bilinear upsampling to the input size, then min-max
    X'    = X_i o M^n_i          Hadamard product

:func:`masked_inputs` builds ``X'`` and :meth:`BatchedExplainer.masked_scores` scores them,
``batch_size`` at a time.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fam_core.explainers.base import ChannelExplainer, Explainer, ForwardPass
from fam_core.explainers.postprocess import min_max
from fam_core.explainers.targets import ResolvedTarget, Target
from fam_core.maths.fam import rectified_sum

_EPS = 1e-12

PairScorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(activations [B, N, h, w], image_index [M], channel_index [M]) -> scores [M]``."""


def linear_coefficients(outputs: torch.Tensor, target: ResolvedTarget, method: str) -> torch.Tensor:
    """``c [B, D]`` with the explained score ``y = <z, c>`` linear in the output ``z``.

    A class target is the one-hot reference ``e_c`` (``c = e_c``, ``y`` the logit); a dot
    product with references ``r`` gives their mean; the cosine holds ``|z|`` constant,
    ``c = mean_k r_k / (|z| |r_k|)`` (the linear part FAM eq. 14 uses). CAM, Relevance-CAM
    and LIFT-CAM propagate this last linear layer like the classifier's; ``method`` names
    the caller in the error for the Euclidean similarity, which is not linear in ``z``.

    Example:
        >>> target = ResolvedTarget(torch.tensor([[[3.0, 4.0]]]), "cosine")
        >>> linear_coefficients(torch.tensor([[0.0, 2.0]]), target, "CAM")
        tensor([[0.3000, 0.4000]])
    """
    if target.similarity == "euclidean":
        raise ValueError(
            f"{method} needs a score linear in the model output: use a class target or "
            "similarity='dot' / 'cosine', not 'euclidean'"
        )
    outputs, references = outputs.detach(), target.references
    coefficients = references  # d<z, r>/dz
    if target.similarity == "cosine":
        norms = outputs.norm(dim=1, keepdim=True) * references.norm(dim=2)
        coefficients = references / norms.clamp_min(_EPS).unsqueeze(2)
    return coefficients.mean(dim=1)


def explained_score(
    explainer: Explainer, outputs: torch.Tensor, target: ResolvedTarget
) -> torch.Tensor:
    """The score ``y [B]`` a CAM method explains, differentiable in ``outputs``.

    With ``target.explains_self`` (no target on an embedding model) the references are
    the detached outputs themselves. The dot product ``<z, r>`` at ``r = z`` is explained
    as any target (its value ``|z|^2``, its gradient ``r``); the cosine and the Euclidean
    similarity are flat there (the gradient of ``cos(z, z)`` in ``z`` is zero). Their
    score is the projection of the embedding on its own direction with its norm held
    constant, ``<z, r> / (|z| |r|)``: its value is the cosine (1) and its gradient
    ``r / (|z| |r|)`` is the linear part of the cosine, the same decomposition FAM uses
    (FAM eq. 14).
    """
    if not target.explains_self or target.similarity == "dot":
        return explainer.score(outputs, target)
    references = target.references
    norms = outputs.detach().norm(dim=1, keepdim=True) * references.norm(dim=2)
    projections = (outputs.unsqueeze(1) * references).sum(dim=2) / norms.clamp_min(_EPS)
    return projections.mean(dim=1)


class GradientCAM(ChannelExplainer):
    """Base of the gradient methods: ``dy/dA`` (FAM paper eq. 3, 5) and a rectified map.

    A method implements :meth:`gradient_weights`, the one step in which they differ.
    """

    needs_gradients = True

    def channel_weights(
        self, forward: ForwardPass, target: ResolvedTarget, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        grads, scores = self.score_gradients(forward, target)
        weights, extras = self.gradient_weights(grads, forward.activations.detach())
        return weights, scores, extras

    @abstractmethod
    def gradient_weights(
        self, grads: torch.Tensor, activations: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(weights [B, N], extras)`` from ``dy/dA`` and ``A`` ``[B, N, h, w]`` (detached)."""

    def target_gradients(
        self, forward: ForwardPass, target: Target
    ) -> tuple[ResolvedTarget, torch.Tensor, torch.Tensor]:
        """``(resolved target, dy/dA, y)`` for methods whose map needs more than the
        channel weights (they override ``explain_forward``)."""
        resolved = self.resolve_target(target, forward.outputs)
        with torch.enable_grad():
            grads, scores = self.score_gradients(forward, resolved)
        return resolved, grads, scores

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


def all_pairs(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image_index, channel_index)`` ``[B * N]`` each: every (image, channel) pair of
    ``activations`` ``[B, N, h, w]``, image-major."""
    batch, channels = activations.shape[:2]
    every = torch.ones(batch, channels, dtype=torch.bool, device=activations.device)
    return every.nonzero().unbind(1)


def chunks(total: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``batch_size`` covering ``range(total)``."""
    for start in range(0, total, batch_size):
        yield slice(start, min(start + batch_size, total))


def check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def masked_inputs(
    images: torch.Tensor,
    activations: torch.Tensor,
    image_index: torch.Tensor,
    channel_index: torch.Tensor,
) -> torch.Tensor:
    """``X_i o norm(up(A^n_i))`` ``[M, C, H, W]`` for the pairs ``(i, n)`` (eq. 7).

    ``image_index`` and ``channel_index`` (``[M]`` each) name the pairs; ``activations`` is
    ``[B, N, h, w]``, ``images`` ``[B, C, H, W]``. A constant map gives an all-zero mask.

    Example:
        >>> images = torch.ones(1, 1, 4, 4)
        >>> activations = torch.tensor([[[[0.0, 2.0], [0.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]]])
        >>> masked = masked_inputs(images, activations, torch.tensor([0, 0]), torch.tensor([0, 1]))
        >>> masked[0, 0, 0], masked[1].abs().sum()
        (tensor([0.0000, 0.2500, 0.7500, 1.0000]), tensor(0.))
    """
    maps = activations[image_index, channel_index].unsqueeze(1)  # A^n_i, [M, 1, h, w]
    upsampled = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return images[image_index] * min_max(upsampled, dim=(2, 3))  # X_i o M^n_i


class BatchedExplainer(ChannelExplainer):
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

    @torch.no_grad()
    def masked_scores(
        self,
        images: torch.Tensor,
        activations: torch.Tensor,
        target: ResolvedTarget,
        image_index: torch.Tensor,
        channel_index: torch.Tensor,
    ) -> torch.Tensor:
        """The score ``[M]`` of each masked input :func:`masked_inputs` builds (eq. 7).

        Pair ``m`` is scored against the references of image ``image_index[m]``; the masked
        inputs run through the model ``batch_size`` at a time.
        """
        scores = []
        for part in chunks(image_index.shape[0], self.batch_size):
            rows = image_index[part]
            masked = masked_inputs(images, activations, rows, channel_index[part])
            outputs = self._as_vectors(self.model(masked))
            scores.append(self.score(outputs, select_references(target, rows)))  # F(X')
        return torch.cat(scores) if scores else activations.new_zeros(0)

    @torch.no_grad()
    def channel_scores(
        self, forward: ForwardPass, target: ResolvedTarget, rescore: PairScorer
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y [B], y_n [B, N])``: the explained score, and the score of the input perturbed
        through each channel ``n`` (``rescore(activations, image_index, channel_index)`` for
        every (image, channel) pair, :func:`all_pairs`; what the perturbation is, masking or
        ablation, is the method's)."""
        activations = forward.activations.detach()
        batch, channels = activations.shape[:2]
        scores = self.score(forward.outputs.detach(), target)  # y
        image_index, channel_index = all_pairs(activations)
        perturbed = rescore(activations, image_index, channel_index)
        return scores, perturbed.view(batch, channels)
