"""A gallery index: the rows of a vector engine, searched with the model that built it.

:func:`open_index` opens an index URI (:func:`fam_core.search.milvus.parse_index_uri`);
:class:`GalleryIndex` searches it, counts it, lists its labels, and refuses a model other
than the one recorded in its :class:`~fam_core.search.records.IndexCard`
(:func:`model_card`: name, embedding size, similarity, SHA-256 of the weights or graph).

Example:
    >>> import tempfile
    >>> index = open_index(tempfile.mkdtemp() + "/gallery.db")
    >>> index.create(IndexCard("m", 2, "cosine", "0" * 64))
    >>> index.upsert([IndexRow("a.png", "/g/a.png", "rose", torch.tensor([1.0, 0.0]))])
    1
    >>> hit = index.search(torch.tensor([[2.0, 0.0]]), top_k=1)[0][0]
    >>> hit.id, hit.label, round(hit.score, 4)
    ('a.png', 'rose', 1.0)
    >>> index.check_model(IndexCard("other", 2, "cosine", "1" * 64))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: index ... was built by model m (2-dim, cosine, weights 000000000000); it cannot be searched with model other (2-dim, cosine, weights 111111111111)
    >>> index.close()
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fam_core.search.engine import VectorEngine
from fam_core.search.index_types import search_override
from fam_core.search.milvus import MilvusEngine
from fam_core.search.records import IndexCard, IndexRow, Neighbour

__all__ = ["GalleryIndex", "IndexCard", "IndexRow", "model_card", "open_index"]

_HASHES: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


class GalleryIndex:
    """A gallery of embeddings in a :class:`~fam_core.search.engine.VectorEngine`."""

    def __init__(
        self, engine: VectorEngine, uri: str = "", search_params: Mapping[str, int] | None = None
    ) -> None:
        self.engine = engine
        self.uri = uri
        self.search_params = dict(search_params or {})
        """What replaces the card's search parameters when a search names none."""

    @property
    def card(self) -> IndexCard:
        """The model the index was built with (``ValueError`` when nothing was built)."""
        card = self.engine.card()
        if card is None:
            raise ValueError(f"index {self.uri} holds no gallery: build it with `fam index build`")
        return card

    def exists(self) -> bool:
        """Whether a gallery was created here."""
        return self.engine.card() is not None

    def create(self, card: IndexCard) -> None:
        """Create the gallery for ``card``'s model; an existing one must be of the same model."""
        if self.exists():
            self.check_model(card)
            return
        self.engine.create(card.dimension, card.similarity, card)

    def check_model(self, card: IndexCard) -> None:
        """``ValueError`` naming both models unless ``card`` is the index's model: the same
        embedding size, similarity and weights (a config of another name over the same
        weights searches the same embeddings)."""
        built = self.card
        if (built.dimension, built.similarity, built.model_hash) != (
            card.dimension,
            card.similarity,
            card.model_hash,
        ):
            raise ValueError(
                f"index {self.uri} was built by model {built.describe()}; it cannot be "
                f"searched with model {card.describe()}"
            )

    def upsert(self, rows: Sequence[IndexRow]) -> int:
        """Insert or replace ``rows`` by id (embeddings of the card's size)."""
        dimension = self.card.dimension
        for row in rows:
            if row.embedding.numel() != dimension:
                raise ValueError(
                    f"row {row.id!r}: embedding of size {row.embedding.numel()}, the index "
                    f"holds {dimension}"
                )
        return self.engine.upsert(rows)

    def count(self) -> int:
        """The images indexed."""
        return self.engine.count()

    def labels(self) -> dict[str, int]:
        """Each label and how many images carry it."""
        return self.engine.labels()

    def get(self, ids: Sequence[str]) -> list[IndexRow]:
        """The rows of ``ids`` that are indexed, in the order of ``ids``."""
        return self.engine.get(ids)

    def search(
        self,
        embeddings: torch.Tensor,
        top_k: int,
        filter: str | None = None,
        search_params: Mapping[str, int] | None = None,
    ) -> list[list[Neighbour]]:
        """The ``top_k`` nearest images of each embedding ``[Q, D]`` (``[D]``: one query),
        most similar first; ``filter`` is a condition on ``id``, ``uri`` and ``label`` in the
        engine's language (Milvus: ``label == "rose"``, ``label in ["a", "b"]``);
        ``search_params`` replaces the card's search parameters (``{"ef": 128}`` for an
        ``HNSW`` index, ``{"nprobe": 64}`` for ``IVF_FLAT``; a one-line ``ValueError`` for
        another name)."""
        if isinstance(embeddings, torch.Tensor) and embeddings.dim() == 1:
            embeddings = embeddings.unsqueeze(0)
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise ValueError("embeddings must be a tensor [Q, D]")
        dimension = self.card.dimension
        if embeddings.shape[1] != dimension:
            raise ValueError(
                f"embeddings have dimension {embeddings.shape[1]}, the index holds {dimension}"
            )
        search_params = self.search_params if search_params is None else search_params
        if search_params:
            return self.engine.search(embeddings, top_k, filter, search_params)
        return self.engine.search(embeddings, top_k, filter)

    def check_search_params(self) -> dict[str, int]:
        """The search parameters a search that names none uses (the card's, replaced by
        :attr:`search_params`); ``ValueError`` unless :attr:`search_params` are search
        parameters of the index's type (``ef``: ``HNSW``, ``nprobe``: ``IVF_FLAT``)."""
        card = self.card
        return search_override(card.index_type, card.index_params, self.search_params)

    def check_index(self, card: IndexCard) -> None:
        """``ValueError`` unless the index was built with ``card``'s index type and
        parameters (another type needs a new index: drop this one, or build elsewhere)."""
        built = self.card
        if (built.index_type, built.index_params) != (card.index_type, card.index_params):
            raise ValueError(
                f"index {self.uri} is a {built.index_type} index {built.index_params}, not "
                f"{card.index_type} {card.index_params}: build into a new index to change it"
            )

    def drop(self) -> None:
        """Remove the gallery."""
        self.engine.drop()

    def close(self) -> None:
        """Release the engine (a Milvus Lite file is free for another process)."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> GalleryIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_index(
    uri: str | Path,
    *,
    base: Path | None = None,
    search_params: Mapping[str, int] | None = None,
) -> GalleryIndex:
    """The gallery index at ``uri``: ``PATH.db`` (Milvus Lite) or ``http(s)://HOST:PORT``
    (a Milvus server), optionally ``#COLLECTION``. A relative path is taken from ``base``
    (default: the working folder). ``search_params`` replace the card's search parameters
    (:attr:`GalleryIndex.search_params`). Nothing is opened before first use."""
    text = str(uri)
    if base is not None and "://" not in text and not Path(text.partition("#")[0]).is_absolute():
        text = str(base / text)
    return GalleryIndex(MilvusEngine(text), text, search_params)


def model_card(model: Any) -> IndexCard:
    """The :class:`IndexCard` of a served model (:class:`~fam_core.pipeline.ServedModel` or
    :class:`~fam_core.pipeline.backends.LoadedBackend`): its name, output size, similarity,
    and the SHA-256 of its weights (torch; computed once per module) or of its graph file.

    Example:
        >>> from fam_core.pipeline import ServedModel
        >>> card = model_card(ServedModel.load("default-embedding"))
        >>> card.model, card.dimension, card.similarity, len(card.model_hash)
        ('default-embedding', 64, 'cosine', 64)
    """
    config = model.config
    module = getattr(model.backend, "module", None)
    if isinstance(module, nn.Module):
        digest = _HASHES.get(module)
        if digest is None:
            digest = weights_hash(module)
            _HASHES[module] = digest
    else:
        runner = getattr(model.backend, "runner", None)
        path = getattr(runner, "path", None)
        if path is None:
            raise TypeError(f"model {config.name!r}: cannot hash a {type(model.backend).__name__}")
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return IndexCard(
        model=config.name,
        dimension=int(model.output_dim),
        similarity=config.similarity,
        model_hash=digest,
    )


def weights_hash(module: nn.Module) -> str:
    """SHA-256 of a module's state dict: names, dtypes, shapes and values.

    Example:
        >>> weights_hash(nn.Linear(2, 2)) == weights_hash(nn.Linear(2, 2))
        False
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\t{value.dtype}\t{tuple(value.shape)}\n".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
