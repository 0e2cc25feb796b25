"""N-way K-shot episodes with prototype classification (Snell et al.), as in FAM's section V-B."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Episode:
    """Indices into a labelled pool: ``support [N, K]`` and ``query [N, Q]``, class order fixed."""

    classes: torch.Tensor  # [N] label values
    support: torch.Tensor  # [N, K]
    query: torch.Tensor  # [N, Q]


@dataclass(frozen=True)
class EpisodeResult:
    """Mean accuracy over episodes with its 95 % confidence interval (1.96 standard errors)."""

    accuracy: float
    interval: float
    episodes: int

    def __str__(self) -> str:
        return (
            f"{100 * self.accuracy:.2f} % ± {100 * self.interval:.2f} % ({self.episodes} episodes)"
        )


def sample_episodes(
    labels: torch.Tensor, *, n_way: int, k_shot: int, n_query: int, episodes: int, seed: int = 0
) -> list[Episode]:
    """Draw ``episodes`` episodes from a labelled pool, reproducibly for ``seed``.

    Example:
        >>> labels = torch.arange(10).repeat_interleave(20)
        >>> e = sample_episodes(labels, n_way=5, k_shot=1, n_query=15, episodes=2)[0]
        >>> e.support.shape, e.query.shape
        (torch.Size([5, 1]), torch.Size([5, 15]))
    """
    if min(n_way, k_shot, n_query, episodes) < 1:
        raise ValueError("n_way, k_shot, n_query and episodes must all be >= 1")
    labels = labels.cpu()
    classes = labels.unique()
    by_class = {int(c): (labels == c).nonzero().flatten() for c in classes}
    if len(classes) < n_way:
        raise ValueError(f"{n_way}-way episodes need {n_way} classes, the pool has {len(classes)}")
    short = [c for c, idx in by_class.items() if len(idx) < k_shot + n_query]
    if short:
        raise ValueError(
            f"classes {short} have fewer than k_shot + n_query = {k_shot + n_query} images"
        )
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(episodes):
        chosen = classes[torch.randperm(len(classes), generator=generator)[:n_way]]
        picks = []
        for c in chosen.tolist():
            pool = by_class[c]
            picks.append(pool[torch.randperm(len(pool), generator=generator)[: k_shot + n_query]])
        stacked = torch.stack(picks)
        result.append(Episode(chosen, stacked[:, :k_shot], stacked[:, k_shot:]))
    return result


def prototype_logits(
    support: torch.Tensor, query: torch.Tensor, similarity: str = "cosine"
) -> torch.Tensor:
    """Scores ``[Q, N]`` of query embeddings ``[Q, D]`` against class prototypes.

    ``support`` is ``[N, K, D]``; a prototype is the mean of its K support embeddings.
    """
    prototypes = support.mean(dim=1)
    if similarity == "cosine":
        return F.normalize(query, dim=1) @ F.normalize(prototypes, dim=1).T
    if similarity == "euclidean":
        return -torch.cdist(query, prototypes)
    if similarity == "dot":
        return query @ prototypes.T
    raise ValueError(f"unknown similarity {similarity!r}")


def few_shot_accuracy(
    embeddings: torch.Tensor, episodes: list[Episode], similarity: str = "cosine"
) -> EpisodeResult:
    """Accuracy of prototype classification over ``episodes`` of a pool's ``embeddings``."""
    accuracies = []
    for episode in episodes:
        n_way, n_query = episode.query.shape
        scores = prototype_logits(
            embeddings[episode.support], embeddings[episode.query.flatten()], similarity
        )
        truth = torch.arange(n_way).repeat_interleave(n_query).to(scores.device)
        accuracies.append((scores.argmax(dim=1) == truth).float().mean().item())
    values = torch.tensor(accuracies, dtype=torch.float64)
    interval = (
        1.96 * values.std(unbiased=True).item() / math.sqrt(len(values)) if len(values) > 1 else 0.0
    )
    return EpisodeResult(values.mean().item(), interval, len(values))


@dataclass(frozen=True)
class EpisodePredictions:
    """One episode classified: pool indices of its queries, their true and predicted
    way ``[Q]`` (0..N-1), and the class prototypes ``[N, D]``."""

    query: torch.Tensor
    truth: torch.Tensor
    predicted: torch.Tensor
    prototypes: torch.Tensor


def classify_episode(
    embeddings: torch.Tensor, episode: Episode, similarity: str = "cosine"
) -> EpisodePredictions:
    """Prototype classification of one episode's queries (as :func:`few_shot_accuracy`).

    Example:
        >>> emb = torch.eye(2).repeat_interleave(2, dim=0)  # two classes, two images each
        >>> e = sample_episodes(torch.tensor([0, 0, 1, 1]), n_way=2, k_shot=1, n_query=1,
        ...                     episodes=1)[0]
        >>> bool((classify_episode(emb, e).predicted == classify_episode(emb, e).truth).all())
        True
    """
    n_way, n_query = episode.query.shape
    query = episode.query.flatten()
    support = embeddings[episode.support]
    scores = prototype_logits(support, embeddings[query], similarity)
    truth = torch.arange(n_way).repeat_interleave(n_query).to(scores.device)
    return EpisodePredictions(query, truth, scores.argmax(dim=1), support.mean(dim=1))


def prototype_targets(prototypes: torch.Tensor, ways: torch.Tensor) -> torch.Tensor:
    """The explainer target of each query: the prototype ``[Q, 1, D]`` of its (predicted) way.

    Example:
        >>> prototype_targets(torch.eye(3), torch.tensor([2, 0])).squeeze(1)
        tensor([[0., 0., 1.],
                [1., 0., 0.]])
    """
    if prototypes.dim() != 2 or ways.dim() != 1:
        raise ValueError("prototypes must be [N, D] and ways [Q]")
    return prototypes[ways.to(prototypes.device)].unsqueeze(1)
