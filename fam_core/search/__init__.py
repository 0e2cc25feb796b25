"""Explained search: a vector index of a model's gallery embeddings, searched top-k, with
heatmaps on both sides of each match.

- :mod:`.records`: :class:`IndexRow`, :class:`IndexCard`, :class:`Neighbour`;
- :mod:`.engine`: the :class:`VectorEngine` interface; :mod:`.milvus` implements it
  (Milvus Lite in a ``.db`` file, or a Milvus server at ``http(s)://HOST:PORT``);
- :mod:`.index`: :func:`open_index`, :class:`GalleryIndex`, :func:`model_card`;
- :mod:`.explained`: :func:`explained_search` (the query's maps from its one forward pass);
- :mod:`.sources`: reading an indexed image back from its URI.

Example:
    >>> from fam_core.search import open_index
    >>> open_index("gallery.db").uri
    'gallery.db'
"""

from fam_core.search.engine import Hit, IndexUnavailable, VectorEngine
from fam_core.search.explained import (
    EXPLAIN_MODES,
    ExplainedNeighbour,
    embed,
    explain_each_target,
    explained_search,
    load_uri_image,
    load_uri_pixels,
)
from fam_core.search.index import GalleryIndex, model_card, open_index, weights_hash
from fam_core.search.milvus import MilvusEngine, parse_index_uri
from fam_core.search.records import IndexCard, IndexRow, Neighbour

__all__ = [
    "EXPLAIN_MODES",
    "ExplainedNeighbour",
    "GalleryIndex",
    "Hit",
    "IndexCard",
    "IndexRow",
    "IndexUnavailable",
    "MilvusEngine",
    "Neighbour",
    "VectorEngine",
    "embed",
    "explain_each_target",
    "explained_search",
    "load_uri_image",
    "load_uri_pixels",
    "model_card",
    "open_index",
    "parse_index_uri",
    "weights_hash",
]
