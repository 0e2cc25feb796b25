"""The gallery index behind explained search: a vector index of a model's gallery
embeddings, searched top-k, and kNN votes over it.

- :mod:`.records`: :class:`IndexRow`, :class:`IndexCard`, :class:`Neighbour`;
- :mod:`.engine`: the :class:`VectorEngine` interface; :mod:`.milvus` implements it
  (Milvus Lite in a ``.db`` file, or a Milvus server at ``http(s)://HOST:PORT``);
- :mod:`.index`: :func:`open_index`, :class:`GalleryIndex`, :func:`model_card`;
- :mod:`.knn`: the kNN classifier's vote over the index;
- :mod:`.sources`: reading an indexed image back from its URI.

Explaining the matches runs through the request pipeline, which sits above this package:
:func:`fam_core.pipeline.explained_search` (the query's maps from its one forward pass);
an index is built with the bulk engine (:func:`fam_core.bulk.index_build.build_index`).

Example:
    >>> from fam_core.search import open_index
    >>> open_index("gallery.db").uri
    'gallery.db'
"""

from fam_core.moved_modules import moved_names
from fam_core.search.engine import Hit, IndexUnavailable, VectorEngine
from fam_core.search.index import GalleryIndex, model_card, open_index, weights_hash
from fam_core.search.milvus import MilvusEngine, parse_index_uri
from fam_core.search.records import IndexCard, IndexRow, Neighbour

__all__ = [
    "GalleryIndex",
    "Hit",
    "IndexCard",
    "IndexRow",
    "IndexUnavailable",
    "MilvusEngine",
    "Neighbour",
    "VectorEngine",
    "model_card",
    "open_index",
    "parse_index_uri",
    "weights_hash",
]

__getattr__ = moved_names(__name__)  # explained_search & co. moved to fam_core.pipeline
