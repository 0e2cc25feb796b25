"""The vector engine behind a gallery index: the small interface another database implements.

:class:`VectorEngine` is what :class:`~fam_core.search.index.GalleryIndex` needs of a vector
database: create a collection for a model's embeddings, upsert rows by id, search top-k,
get rows, count, drop, and read back the :class:`~fam_core.search.records.IndexCard` it was
created with. :class:`~fam_core.search.milvus.MilvusEngine` implements it. Scores are the
model's similarity (:mod:`fam_core.maths.similarity`): larger is always more similar.

Example:
    >>> from fam_core.search.milvus import MilvusEngine
    >>> isinstance(MilvusEngine, type) and issubclass(MilvusEngine, object)
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from fam_core.search.records import IndexCard, IndexRow, Neighbour

Hit = Neighbour
"""What an engine's search returns for each neighbour (a :class:`Neighbour`)."""


class IndexUnavailable(ValueError):
    """The vector database did not answer (cannot be reached, opened, read or written): a
    server answers it as unavailable, where any other ``ValueError`` is the request's fault.

    Example:
        >>> isinstance(IndexUnavailable("cannot reach Milvus at http://db:19530"), ValueError)
        True
    """


@runtime_checkable
class VectorEngine(Protocol):
    """A collection of :class:`IndexRow` in a vector database."""

    def create(self, dimension: int, metric: str, card: IndexCard) -> None:
        """Create the collection (``metric``: a :data:`fam_core.maths.similarity.SIMILARITIES`
        name) with the vector index ``card`` names (``card.index_type``, its build parameters
        in ``card.index_params``) and store ``card``; an existing collection is kept."""
        ...

    def upsert(self, rows: Sequence[IndexRow]) -> int:
        """Insert or replace ``rows`` by id; return how many were written."""
        ...

    def search(
        self,
        vectors: torch.Tensor,
        top_k: int,
        filter: str | None = None,
        params: Mapping[str, int] | None = None,
    ) -> list[list[Hit]]:
        """The ``top_k`` most similar rows of each query ``[Q, D]``, most similar first,
        searched with the card's search parameters, ``params`` replacing some (``ef``,
        ``nprobe``: :func:`fam_core.search.index_types.search_override`)."""
        ...

    def get(self, ids: Sequence[str]) -> list[IndexRow]:
        """The rows of ``ids`` that exist, in the order of ``ids``."""
        ...

    def existing(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are stored."""
        ...

    def count(self) -> int:
        """The rows stored."""
        ...

    def labels(self) -> dict[str, int]:
        """Each label and its row count (unlabelled rows are not counted)."""
        ...

    def drop(self) -> None:
        """Remove the collection and its card."""
        ...

    def card(self) -> IndexCard | None:
        """The card the collection was created with (``None``: no collection)."""
        ...
