"""Weighted kNN over a memory bank, as in NPID (Wu et al., CVPR 2018, section 3.4).

Each query takes its top ``k`` (200) neighbours in the bank by cosine similarity ``s_i``;
neighbour ``i`` votes for its class with weight ``exp(s_i / tau)``, and the class with the
largest total weight wins:  ``w_c = sum_{i in top-k} exp(s_i / tau) 1[c_i = c]``.
The FAM-family target of a query is the set of its nearest bank items of the predicted
class (:func:`neighbour_targets`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fam_core.tasks._similarity import check_labels, pairwise_similarity

NPID_NEIGHBOURS = 200
NPID_TEMPERATURE = 0.07


@dataclass(frozen=True)
class KnnPrediction:
    """Predicted class per query ``[Q]``, class votes ``[Q, C]`` and the neighbours used."""

    labels: torch.Tensor  # [Q]
    votes: torch.Tensor  # [Q, C]
    neighbours: torch.Tensor  # [Q, k] bank indices, most similar first
    similarities: torch.Tensor  # [Q, k]


def knn_predict(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    *,
    k: int = NPID_NEIGHBOURS,
    temperature: float = NPID_TEMPERATURE,
    num_classes: int | None = None,
) -> KnnPrediction:
    """Classify queries ``[Q, D]`` by weighted voting of their top-``k`` bank neighbours.

    ``k`` is capped at the bank size. ``num_classes`` defaults to ``max(label) + 1``.

    Example:
        >>> bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> knn_predict(torch.tensor([[1.0, 0.2]]), bank, torch.tensor([0, 0, 1]), k=2).labels
        tensor([0])
    """
    bank_labels = check_labels(bank_labels, bank.shape[0], "bank_labels")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    classes = int(bank_labels.max()) + 1 if num_classes is None else num_classes
    scores = pairwise_similarity(queries, bank, "cosine")
    top = scores.topk(min(k, bank.shape[0]), dim=1)  # sorted, most similar first
    weights = (top.values / temperature).exp()
    votes = torch.zeros(queries.shape[0], classes, dtype=weights.dtype, device=weights.device)
    votes.scatter_add_(1, bank_labels.to(weights.device)[top.indices], weights)
    return KnnPrediction(votes.argmax(dim=1), votes, top.indices, top.values)


def knn_accuracy(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    *,
    k: int = NPID_NEIGHBOURS,
    temperature: float = NPID_TEMPERATURE,
) -> float:
    """Share of queries whose kNN prediction is their label.

    Example:
        >>> bank, labels = torch.eye(2), torch.tensor([0, 1])
        >>> knn_accuracy(torch.tensor([[1.0, 0.1], [1.0, 0.0]]), torch.tensor([0, 1]), bank, labels)
        0.5
    """
    query_labels = check_labels(query_labels, queries.shape[0], "query_labels")
    predicted = knn_predict(queries, bank, bank_labels, k=k, temperature=temperature).labels
    return (predicted.cpu() == query_labels.cpu()).float().mean().item()


def neighbour_targets(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    predicted: torch.Tensor,
    *,
    count: int = 5,
) -> torch.Tensor:
    """The explainer target of each query: its ``count`` most similar bank embeddings among
    those of its predicted class, ``[Q, count, D]`` (the neighbours that carry the vote).

    Example:
        >>> bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
        >>> neighbour_targets(torch.tensor([[1.0, 0.0]]), bank, torch.tensor([0, 1, 1]),
        ...                   torch.tensor([1]), count=1)
        tensor([[[0.7000, 0.7000]]])
    """
    bank_labels = check_labels(bank_labels, bank.shape[0], "bank_labels")
    predicted = check_labels(predicted, queries.shape[0], "predicted")
    per_class = torch.bincount(bank_labels.cpu())
    fewest = int(per_class[predicted.cpu()].min())
    if count < 1 or fewest < count:
        raise ValueError(
            f"count must be in [1, {fewest}] (bank items of the rarest predicted class), got {count}"
        )
    scores = pairwise_similarity(queries, bank, "cosine")
    same = bank_labels.to(scores.device)[None, :] == predicted.to(scores.device)[:, None]
    scores = scores.masked_fill(~same, float("-inf"))
    index = scores.topk(count, dim=1).indices
    return bank.to(queries)[index]
