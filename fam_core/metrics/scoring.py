"""Score functions for the faithfulness metrics: what "the model's confidence" means.

- embedding models: the mean similarity of the image's embedding to its target references
  (FAM eq. 11; the ``s_i`` of eq. 21-22 is the similarity to the support image);
- classifiers: the softmax probability of the target class (Grad-CAM++'s ``Y^c``).

Each scorer takes images ``[B, 3, H, W]`` in ``[0, 1]``, normalises them for the model and
returns ``[B]``; row ``i`` is scored against target ``i``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fam_core.maths.similarity import SIMILARITIES, similarity

Normalize = Callable[[torch.Tensor], torch.Tensor]


def similarity_scorer(
    model: nn.Module,
    normalize: Normalize,
    references: torch.Tensor,
    kind: str = "cosine",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Score = mean similarity of ``model(normalize(x_i))`` to ``references[i]`` ``[B, K, D]``.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> model = conv4().eval()
        >>> x = torch.rand(2, 3, 84, 84)
        >>> refs = model(x).detach().unsqueeze(1)
        >>> similarity_scorer(model, lambda v: v, refs)(x).round(decimals=4)
        tensor([1., 1.])
    """
    if not isinstance(references, torch.Tensor) or references.dim() != 3:
        raise ValueError("references must be a tensor [B, K, D]")
    if kind not in SIMILARITIES:
        raise ValueError(f"unknown similarity {kind!r}; expected one of {SIMILARITIES}")

    @torch.no_grad()
    def score(images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] != references.shape[0]:
            raise ValueError(
                f"got {images.shape[0]} images for {references.shape[0]} reference sets"
            )
        outputs = model(normalize(images))
        return similarity(outputs, references.to(outputs), kind).mean(dim=1)  # type: ignore[arg-type]

    return score


def class_probability_scorer(
    model: nn.Module, normalize: Normalize, classes: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Score = softmax probability of ``classes[i]`` for image ``i``.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> p = class_probability_scorer(model, lambda v: v, torch.tensor([0, 1]))(torch.rand(2, 3, 2, 2))
        >>> bool(((p > 0) & (p < 1)).all())
        True
    """
    if not isinstance(classes, torch.Tensor) or classes.dim() != 1:
        raise ValueError("classes must be a tensor [B] of class indices")

    @torch.no_grad()
    def score(images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] != classes.shape[0]:
            raise ValueError(f"got {images.shape[0]} images for {classes.shape[0]} classes")
        probabilities = F.softmax(model(normalize(images)), dim=1)
        return probabilities.gather(1, classes.to(probabilities.device).view(-1, 1)).squeeze(1)

    return score
