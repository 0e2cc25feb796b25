"""Retrieval over a query/gallery split: Recall@k and mean average precision.

Every query ranks the whole gallery by similarity; a gallery item is relevant when it has
the query's label. Recall@k (Sohn; Taha et al.): share of queries with at least one relevant
item in the top k. AP: mean of the precision at the rank of each relevant item; mAP: its
mean over queries. The FAM-family target of a query is its top-1 gallery item.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fam_core.tasks._similarity import check_labels, pairwise_similarity


@dataclass(frozen=True)
class RetrievalResult:
    """``recall[k]`` for each requested k, and mAP, all in ``[0, 1]``."""

    recall: dict[int, float]
    mean_average_precision: float
    queries: int

    def __str__(self) -> str:
        recalls = ", ".join(f"R@{k} {100 * v:.2f} %" for k, v in self.recall.items())
        return f"{recalls}, mAP {100 * self.mean_average_precision:.2f} % ({self.queries} queries)"


def rank_gallery(
    queries: torch.Tensor, gallery: torch.Tensor, similarity: str = "cosine"
) -> torch.Tensor:
    """Gallery indices ``[Q, G]`` sorted from most to least similar (stable on ties)."""
    scores = pairwise_similarity(queries, gallery, similarity)
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def average_precision(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    *,
    similarity: str = "cosine",
) -> torch.Tensor:
    """Average precision ``[Q]`` of each query: ``AP = 1/R sum_{relevant rank r} P@r``.

    A query with no relevant gallery item scores 0.

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
        >>> average_precision(torch.tensor([[1.0, 0.1]]), torch.tensor([1]), g, torch.tensor([0, 1, 1]))
        tensor([0.5833])
    """
    query_labels = check_labels(query_labels, queries.shape[0], "query_labels")
    gallery_labels = check_labels(gallery_labels, gallery.shape[0], "gallery_labels")
    order = rank_gallery(queries, gallery, similarity)
    relevant = gallery_labels.to(order.device)[order] == query_labels.to(order.device)[:, None]
    relevant = relevant.to(torch.float64)
    ranks = torch.arange(1, order.shape[1] + 1, device=order.device, dtype=torch.float64)
    precision_at = relevant.cumsum(dim=1) / ranks
    count = relevant.sum(dim=1)
    ap = (precision_at * relevant).sum(dim=1) / count.clamp_min(1)
    return torch.where(count > 0, ap, torch.zeros_like(ap)).float()


def recall_at_k(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    k: int,
    *,
    similarity: str = "cosine",
) -> torch.Tensor:
    """``[Q]`` 1.0 where a relevant item is among the top ``k`` gallery items, else 0.0."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    query_labels = check_labels(query_labels, queries.shape[0], "query_labels")
    gallery_labels = check_labels(gallery_labels, gallery.shape[0], "gallery_labels")
    order = rank_gallery(queries, gallery, similarity)[:, :k]
    hits = gallery_labels.to(order.device)[order] == query_labels.to(order.device)[:, None]
    return hits.any(dim=1).float()


def retrieval_metrics(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    *,
    ks: tuple[int, ...] = (1, 5),
    similarity: str = "cosine",
) -> RetrievalResult:
    """Recall@k for each ``k`` in ``ks`` and mAP of queries ``[Q, D]`` against a gallery ``[G, D]``.

    Example:
        >>> g, gl = torch.eye(3), torch.tensor([0, 1, 2])
        >>> r = retrieval_metrics(torch.eye(3), torch.tensor([0, 1, 1]), g, gl, ks=(1, 2))
        >>> {k: round(v, 4) for k, v in r.recall.items()}, round(r.mean_average_precision, 4)
        ({1: 0.6667, 2: 0.6667}, 0.7778)
    """
    recall = {
        k: recall_at_k(queries, query_labels, gallery, gallery_labels, k, similarity=similarity)
        .mean()
        .item()
        for k in ks
    }
    ap = average_precision(queries, query_labels, gallery, gallery_labels, similarity=similarity)
    return RetrievalResult(recall, ap.mean().item(), queries.shape[0])


def top1_gallery_targets(
    queries: torch.Tensor, gallery: torch.Tensor, similarity: str = "cosine"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The explainer target of each query: its top-1 gallery embedding ``[Q, 1, D]``, and the
    index ``[Q]`` of that item.

    Example:
        >>> refs, index = top1_gallery_targets(torch.tensor([[0.0, 1.0]]), torch.eye(2))
        >>> refs.shape, index.tolist()
        (torch.Size([1, 1, 2]), [1])
    """
    index = rank_gallery(queries, gallery, similarity)[:, 0]
    return gallery.to(queries)[index].unsqueeze(1), index
