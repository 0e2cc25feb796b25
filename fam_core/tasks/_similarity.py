"""Pairwise similarity matrices shared by the tasks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAIRWISE_SIMILARITIES = ("cosine", "dot", "euclidean")


def pairwise_similarity(
    queries: torch.Tensor, items: torch.Tensor, kind: str = "cosine"
) -> torch.Tensor:
    """``[Q, G]`` similarities of queries ``[Q, D]`` to items ``[G, D]`` (euclidean: negative
    distance, so larger is always more similar).

    Example:
        >>> pairwise_similarity(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        tensor([[1., 0.]])
    """
    for name, value in (("queries", queries), ("items", items)):
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            raise ValueError(f"{name} must be a tensor [N, D] of embeddings")
    if queries.shape[1] != items.shape[1]:
        raise ValueError(
            f"queries have dimension {queries.shape[1]} but items have {items.shape[1]}"
        )
    items = items.to(queries)
    if kind == "cosine":
        return F.normalize(queries, dim=1) @ F.normalize(items, dim=1).T
    if kind == "dot":
        return queries @ items.T
    if kind == "euclidean":
        return -torch.cdist(queries, items)
    raise ValueError(f"unknown similarity {kind!r}; expected one of {PAIRWISE_SIMILARITIES}")


def check_labels(labels: object, count: int, name: str) -> torch.Tensor:
    """Integer labels ``[count]``."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.numel() != count:
        raise ValueError(f"{name} must be a tensor [{count}] of labels")
    if labels.is_floating_point():
        raise TypeError(f"{name} must hold integer labels, got {labels.dtype}")
    return labels
