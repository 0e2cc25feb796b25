"""Targets: what an explanation explains, turned into references in output space, and scores.

A :data:`Target` is reference embeddings, class indices or ``None``; :func:`resolve_target`
turns it into references ``[B, K, D]`` and the similarity that scores them
(:class:`ResolvedTarget`), and :func:`score` gives the explained score ``[B]`` (eq. 11).
A class index ``c`` becomes the one-hot reference ``e_c`` scored by the dot product, so the
explained score is the logit ``y_c``.

Example:
    >>> outputs = torch.tensor([[1.0, 3.0, 2.0]])
    >>> resolved = resolve_target(2, outputs, similarity="cosine", task="classifier")
    >>> resolved.similarity, score(outputs, resolved)
    ('dot', tensor([2.]))
    >>> score(outputs, resolve_target(None, outputs, similarity="cosine", task="classifier"))
    tensor([3.])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fam_core.maths.fam import one_hot_references
from fam_core.maths.similarity import SimilarityKind, similarity

Task = Literal["embedding", "classifier"]
TASKS: tuple[str, ...] = ("embedding", "classifier")

Target = torch.Tensor | int | list[int] | tuple[int, ...] | None
"""Reference embeddings ``[D]``, ``[K, D]`` or ``[B, K, D]``; class indices; or ``None``."""


@dataclass(frozen=True)
class ResolvedTarget:
    """A target as references in output space and the similarity that scores them.

    Class index ``c`` of a classifier becomes the one-hot reference ``e_c`` scored by the
    dot product, so the explained score is the logit ``y_c``.
    """

    references: torch.Tensor  # [B, K, D]
    similarity: SimilarityKind
    explains_self: bool = False  # target None on an embedding model: references = own outputs


def resolve_target(
    target: Target,
    outputs: torch.Tensor,
    *,
    similarity: SimilarityKind,
    task: Task | None,
    task_given: Task | None = None,
) -> ResolvedTarget:
    """Turn any accepted target into references ``[B, K, D]`` for ``outputs`` ``[B, D]``.

    ``similarity`` scores reference embeddings; ``task`` (as given or inferred) decides what
    ``None`` explains (a classifier's top class, else the image's own outputs);
    ``task_given == "embedding"`` refuses class indices.
    """
    batch, dim = outputs.shape
    if target is None:
        if task == "classifier":
            return class_target(outputs.argmax(dim=1), outputs)
        return ResolvedTarget(outputs.detach().unsqueeze(1), similarity, explains_self=True)
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        return ResolvedTarget(reference_tensor(target, batch, dim, outputs), similarity)
    return class_target(class_indices(target, batch, task_given=task_given), outputs)


def score(outputs: torch.Tensor, target: ResolvedTarget) -> torch.Tensor:
    """The explained score ``[B]``: the mean similarity to the references (eq. 11).

    For class targets this is the logit ``y_c`` (one-hot reference, dot product).
    """
    return similarity(outputs, target.references, target.similarity).mean(dim=1)


def reference_tensor(
    target: torch.Tensor, batch: int, dim: int, outputs: torch.Tensor
) -> torch.Tensor:
    """Reference embeddings ``[D]``, ``[K, D]`` or ``[B, K, D]`` as ``[B, K, D]`` on the
    outputs' device and dtype (``ValueError`` for any other shape)."""
    if target.shape[-1] != dim:
        raise ValueError(
            f"target embeddings have dimension {target.shape[-1]}, the model's embeddings have {dim}"
        )
    if target.dim() == 1:
        target = target.expand(batch, 1, dim)
    elif target.dim() == 2:
        if target.shape[0] == 0:
            raise ValueError("target has no reference embeddings: expected [K, D] with K >= 1")
        target = target.unsqueeze(0).expand(batch, -1, -1)
    elif target.dim() == 3:
        if target.shape[0] != batch or target.shape[1] == 0:
            raise ValueError(
                f"target [B, K, D] must have B = {batch} and K >= 1, got {tuple(target.shape)}"
            )
    else:
        raise ValueError(
            f"target must be [D], [K, D] or [B, K, D], got shape {tuple(target.shape)}"
        )
    return target.to(device=outputs.device, dtype=outputs.dtype)


def class_indices(target: Target, batch: int, *, task_given: Task | None = None) -> torch.Tensor:
    """Class-index targets (an int, ints or an integer tensor) as ``[B]`` indices.

    Example:
        >>> class_indices(3, 2), class_indices([1, 0], 2)
        (tensor([3, 3]), tensor([1, 0]))
    """
    if task_given == "embedding":
        raise TypeError(
            "class-index targets need a classifier (task='classifier'); for an embedding "
            "model pass reference embeddings [D], [K, D] or [B, K, D] (e.g. from "
            "explainer.embed)"
        )
    if isinstance(target, bool):
        raise TypeError("target must be a class index, not a bool")
    if isinstance(target, int):
        return torch.full((batch,), target, dtype=torch.long)
    if isinstance(target, torch.Tensor):
        indices = target.reshape(-1).long().cpu()
    elif isinstance(target, list | tuple) and all(isinstance(t, int) for t in target):
        indices = torch.tensor(list(target), dtype=torch.long)
    else:
        raise TypeError(f"target must be a tensor, an int, a list of ints or None, got {target!r}")
    if indices.numel() == 1:
        return indices.expand(batch)
    if indices.numel() != batch:
        raise ValueError(f"got {indices.numel()} class targets for a batch of {batch}")
    return indices


def class_target(classes: torch.Tensor, outputs: torch.Tensor) -> ResolvedTarget:
    """Class indices ``[B]`` as one-hot references scored by the dot product."""
    num_classes = outputs.shape[1]
    if (classes < 0).any() or (classes >= num_classes).any():
        raise ValueError(
            f"class index out of range: expected 0 <= target < {num_classes}, got {classes.tolist()}"
        )
    references = one_hot_references(classes.to(outputs.device), num_classes, outputs.dtype)
    return ResolvedTarget(references, "dot")
