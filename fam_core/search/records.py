"""The records of a gallery index: a stored row, the card of the model that built it, and a
search result.

Example:
    >>> card = IndexCard(model="default-embedding", dimension=2, similarity="cosine", model_hash="ab")
    >>> IndexCard.from_json(card.to_json()) == card
    True
    >>> card.index_type, card.index_params
    ('FLAT', {})
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from fam_core.maths.similarity import SIMILARITIES
from fam_core.search.index_types import DEFAULT_INDEX_TYPE, index_params


@dataclass(frozen=True)
class IndexRow:
    """One gallery image: its id (path relative to the image set, or the Parquet ``id``), the
    URI its image is read from, its label (``None``: unlabelled) and its embedding ``[D]``."""

    id: str
    uri: str
    label: str | None
    embedding: torch.Tensor


@dataclass(frozen=True)
class IndexCard:
    """The model an index was built with: searching it with another model is refused.

    Attributes:
        model: the model's name.
        dimension: the embedding size ``D``.
        similarity: ``cosine``, ``dot`` or ``euclidean`` (the index metric follows it).
        model_hash: SHA-256 of the weights (torch) or of the graph file (ONNX).
        index_type: the vector index, ``FLAT`` (exact), ``IVF_FLAT`` or ``HNSW``
            (:mod:`fam_core.search.index_types`).
        index_params: its build and search parameters, the defaults filled in
            (``IndexCard("m", 2, "cosine", "ab", "HNSW").index_params["ef"] == 64``).
    """

    model: str
    dimension: int
    similarity: str
    model_hash: str
    index_type: str = DEFAULT_INDEX_TYPE
    index_params: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if isinstance(self.dimension, bool) or not isinstance(self.dimension, int):
            raise TypeError(f"dimension must be an int, got {self.dimension!r}")
        if self.dimension < 1:
            raise ValueError(f"dimension must be >= 1, got {self.dimension}")
        object.__setattr__(self, "index_params", index_params(self.index_type, self.index_params))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IndexCard:
        values = json.loads(text)  # a card written before index types has none: FLAT
        return cls(**{name: values[name] for name in cls.__dataclass_fields__ if name in values})

    def describe(self) -> str:
        """``name (D-dim, similarity, weights abcdef012345)``."""
        return (
            f"{self.model} ({self.dimension}-dim, {self.similarity}, "
            f"weights {self.model_hash[:12]})"
        )


@dataclass(frozen=True)
class Neighbour:
    """A gallery image found by a search: its row and its score, the model's similarity of
    the query to it (cosine, dot product, or the negative euclidean distance)."""

    id: str
    uri: str
    label: str | None
    score: float
    embedding: torch.Tensor
