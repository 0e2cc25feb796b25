"""The records of a gallery index: a stored row, the card of the model that built it, and a
search result.

Example:
    >>> card = IndexCard(model="default-embedding", dimension=2, similarity="cosine", model_hash="ab")
    >>> IndexCard.from_json(card.to_json()) == card
    True
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

from fam_core.maths.similarity import SIMILARITIES


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
    """

    model: str
    dimension: int
    similarity: str
    model_hash: str

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if isinstance(self.dimension, bool) or not isinstance(self.dimension, int):
            raise TypeError(f"dimension must be an int, got {self.dimension!r}")
        if self.dimension < 1:
            raise ValueError(f"dimension must be >= 1, got {self.dimension}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IndexCard:
        values = json.loads(text)
        return cls(**{name: values[name] for name in cls.__dataclass_fields__})

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
