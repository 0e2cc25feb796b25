"""Tasks on toy embeddings whose answers are known."""

from __future__ import annotations

import pytest
import torch

from fam_core.tasks.fewshot import classify_episode, prototype_targets, sample_episodes
from fam_core.tasks.knn import knn_accuracy, knn_predict, neighbour_targets
from fam_core.tasks.retrieval import (
    average_precision,
    recall_at_k,
    retrieval_metrics,
    top1_gallery_targets,
)


def test_episode_classification_on_separable_embeddings_is_perfect() -> None:
    labels = torch.arange(6).repeat_interleave(5)
    embeddings = torch.eye(6)[labels] + 0.01 * torch.rand(30, 6)
    episode = sample_episodes(labels, n_way=3, k_shot=1, n_query=4, episodes=1, seed=3)[0]
    result = classify_episode(embeddings, episode)
    assert torch.equal(result.predicted, result.truth)
    targets = prototype_targets(result.prototypes, result.predicted)
    assert targets.shape == (12, 1, 6)
    assert torch.equal(targets[0, 0], embeddings[episode.support[0]].mean(dim=0))


def test_knn_weighted_vote_by_hand() -> None:
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.9]])
    prediction = knn_predict(query, bank, labels, k=5, temperature=0.1)
    sims = (
        torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    )
    weights = (sims[0] / 0.1).exp()
    expected = torch.stack([weights[:2].sum(), weights[2:].sum()])
    assert torch.allclose(prediction.votes[0], expected)
    assert prediction.labels.item() == int(expected.argmax())
    # two class-0 neighbours outweigh three class-1 neighbours when they are much closer
    near_zero = torch.tensor([[1.0, 0.05]])
    assert knn_predict(near_zero, bank, labels, k=5, temperature=0.07).labels.item() == 0
    # with a huge temperature the vote becomes a plain majority: class 1 (3 votes)
    assert knn_predict(near_zero, bank, labels, k=5, temperature=1e6).labels.item() == 1


def test_knn_accuracy_and_neighbour_targets() -> None:
    labels = torch.arange(4).repeat_interleave(10)
    bank = torch.eye(4)[labels] + 0.05 * torch.rand(
        40, 4, generator=torch.Generator().manual_seed(0)
    )
    queries = torch.eye(4)
    assert knn_accuracy(queries, torch.arange(4), bank, labels, k=200) == 1.0
    assert knn_accuracy(queries, torch.tensor([1, 0, 2, 3]), bank, labels, k=200) == 0.5
    targets = neighbour_targets(queries, bank, labels, torch.tensor([0, 1, 2, 3]), count=3)
    assert targets.shape == (4, 3, 4)
    assert (targets.argmax(dim=2) == torch.arange(4)[:, None]).all()
    with pytest.raises(ValueError, match="count"):
        neighbour_targets(queries, bank, labels, torch.arange(4), count=11)


def test_retrieval_metrics_by_hand() -> None:
    gallery = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    gallery_labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.1]])
    # ranking: 0 (label 0), 1 (label 1), 3 (label 0), 2 (label 1)
    ap0 = average_precision(query, torch.tensor([0]), gallery, gallery_labels).item()
    assert ap0 == pytest.approx((1 / 1 + 2 / 3) / 2)
    ap1 = average_precision(query, torch.tensor([1]), gallery, gallery_labels).item()
    assert ap1 == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert recall_at_k(query, torch.tensor([1]), gallery, gallery_labels, 1).item() == 0.0
    assert recall_at_k(query, torch.tensor([1]), gallery, gallery_labels, 2).item() == 1.0
    result = retrieval_metrics(
        query.repeat(2, 1), torch.tensor([0, 1]), gallery, gallery_labels, ks=(1, 2)
    )
    assert result.recall == {1: 0.5, 2: 1.0}
    assert result.mean_average_precision == pytest.approx((ap0 + ap1) / 2)
    refs, index = top1_gallery_targets(query, gallery)
    assert index.tolist() == [0] and torch.equal(refs[0, 0], gallery[0])
