"""kNN classification over a gallery index: NPID's weighted vote (FAM paper, kNN setting).

A query's top ``k`` labelled neighbours are searched in the index; the vote is
:func:`fam_core.tasks.knn.knn_predict` over them (``w_c = sum_i exp(s_i / tau) 1[c_i = c]``
by cosine), so the prediction is the one ``knn_predict`` gives on the whole labelled
gallery as a bank. The classes are the index's labels, sorted. The explanation target is the
paper's kNN target (:func:`fam_core.tasks.knn.neighbour_targets`): the query's ``count``
nearest gallery images of the explained class (the predicted one by default).

Example:
    >>> import tempfile
    >>> from fam_core.search.index import open_index
    >>> from fam_core.search.records import IndexCard, IndexRow
    >>> index = open_index(tempfile.mkdtemp() + "/k.db")
    >>> index.create(IndexCard("m", 2, "cosine", "0" * 64))
    >>> index.upsert([IndexRow("a", "", "x", torch.tensor([1.0, 0.0])),
    ...               IndexRow("b", "", "y", torch.tensor([0.0, 1.0]))])
    2
    >>> result = knn_classify(index, torch.tensor([[1.0, 0.2]]), k=2)
    >>> result.classes, result.predicted.tolist()
    (('x', 'y'), [0])
    >>> index.close()
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from fam_core.search.index import GalleryIndex
from fam_core.search.records import Neighbour
from fam_core.tasks.knn import NPID_NEIGHBOURS, NPID_TEMPERATURE, knn_predict

KNN_TARGET_COUNT = 5
"""Neighbours of the explained class that form the kNN target (``neighbour_targets``)."""
LABELLED = 'label != ""'


@dataclass(frozen=True)
class KnnResult:
    """The kNN prediction of each query.

    Attributes:
        classes: the index's labels, sorted; class ``c`` is ``classes[c]``.
        predicted: ``[Q]`` the winning class of each query.
        votes: ``[Q, C]`` each class's summed weight ``exp(s / tau)``.
        neighbours: each query's labelled neighbours that voted, most similar first.
    """

    classes: tuple[str, ...]
    predicted: torch.Tensor
    votes: torch.Tensor
    neighbours: list[list[Neighbour]]

    @property
    def probabilities(self) -> torch.Tensor:
        """``[Q, C]`` the votes normalised to sum to 1."""
        return self.votes / self.votes.sum(dim=1, keepdim=True)


def knn_classify(
    index: GalleryIndex,
    embeddings: torch.Tensor,
    *,
    k: int = NPID_NEIGHBOURS,
    temperature: float = NPID_TEMPERATURE,
    classes: tuple[str, ...] | None = None,
) -> KnnResult:
    """Classify embeddings ``[Q, D]`` by the weighted vote of their ``k`` nearest labelled
    gallery images (:func:`fam_core.tasks.knn.knn_predict` semantics).

    ``classes``: the class list (default: the index's labels, sorted).
    """
    _check_cosine(index)
    if classes is None:
        classes = tuple(index.labels())
    if not classes:
        raise ValueError(f"index {index.uri} has no labelled image: kNN needs labels")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    position = {label: c for c, label in enumerate(classes)}
    found = index.search(embeddings, k, LABELLED)
    predicted, votes = [], []
    for query, hits in zip(embeddings, found, strict=True):
        bank = torch.stack([hit.embedding for hit in hits]).to(query)
        labels = torch.tensor([position[str(hit.label)] for hit in hits], dtype=torch.long)
        vote = knn_predict(
            query[None],
            bank,
            labels,
            k=len(hits),
            temperature=temperature,
            num_classes=len(classes),
        )
        predicted.append(vote.labels[0])
        votes.append(vote.votes[0])
    return KnnResult(classes, torch.stack(predicted).cpu(), torch.stack(votes).cpu(), found)


def knn_targets(
    index: GalleryIndex,
    embeddings: torch.Tensor,
    explained: list[str],
    *,
    count: int = KNN_TARGET_COUNT,
) -> torch.Tensor:
    """The paper's kNN target ``[Q, n, D]``: each query's ``n`` nearest gallery embeddings
    of its explained class (``explained[q]``, a label), ``n = count`` or the image count of
    the smallest explained class when that is fewer."""
    _check_cosine(index)
    found = []
    for query, label in zip(embeddings, explained, strict=True):
        (hits,) = index.search(query[None], count, label_filter(label))
        if not hits:
            raise ValueError(f"index {index.uri} has no image labelled {label!r}")
        found.append(hits)
    n = min(len(hits) for hits in found)
    rows = [torch.stack([hit.embedding for hit in hits[:n]]) for hits in found]
    return torch.stack(rows).to(embeddings)


def label_filter(label: str) -> str:
    """The filter expression of one label (quoted as a string literal).

    Example:
        >>> label_filter('say "hi"')
        'label == "say \\\\"hi\\\\""'
    """
    return f"label == {json.dumps(label)}"


def _check_cosine(index: GalleryIndex) -> None:
    similarity = index.card.similarity
    if similarity != "cosine":
        raise ValueError(
            f"kNN votes by cosine similarity (NPID); index {index.uri} was built for "
            f"{similarity!r}: build it with a cosine model"
        )
