"""Milvus behind :class:`~fam_core.search.engine.VectorEngine`: embedded or a server, one code.

An index URI is either a file path ending in ``.db`` (Milvus Lite, embedded in this process:
nothing to start; one process opens a file at a time) or ``http(s)://HOST:PORT`` (a Milvus
standalone server or cluster). ``#NAME`` at the end picks the collection (default
``fam_index``). The same :class:`pymilvus.MilvusClient` calls serve both.

Rows live in the collection ``NAME`` (``id`` primary key, ``uri``, ``label``, ``vector``);
the :class:`~fam_core.search.records.IndexCard` in ``NAME_card``. The metric follows the
model's similarity: ``cosine`` -> ``COSINE``, ``dot`` -> ``IP``, ``euclidean`` -> ``L2``
(Milvus returns the squared distance; the score is ``-sqrt``, the library's similarity).

Example:
    >>> parse_index_uri("gallery.db#flowers")
    IndexLocation(client_uri='gallery.db', collection='flowers', server=False)
    >>> parse_index_uri("http://milvus:19530").collection
    'fam_index'
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fam_core.extras import require
from fam_core.search.engine import Hit, IndexUnavailable
from fam_core.search.index_types import search_override, split_params
from fam_core.search.records import IndexCard, IndexRow

DEFAULT_COLLECTION = "fam_index"
METRICS: dict[str, str] = {"cosine": "COSINE", "dot": "IP", "euclidean": "L2"}
"""The Milvus metric of each similarity."""
MAX_ID = 4096
MAX_URI = 8192
MAX_LABEL = 1024
SERVER_TIMEOUT_S = 10.0
CARD_TTL_S = 5.0
"""How long an engine trusts the card it read: another process may drop a server's index and
build it again with another model, and each search checks the model against the card."""
# pymilvus logs each failed call with a traceback (we raise one line instead) and warns that a
# query iterator of Milvus Lite takes its timestamp on the client side
_QUIET_LOGGERS = ("pymilvus.decorators", "pymilvus.client.iterator.query_iterator")
_CARD_KEY = "card"
_CHUNK = 1000


class IndexLocation(NamedTuple):
    """Where an index lives: the client's URI, the collection, and whether it is a server."""

    client_uri: str
    collection: str
    server: bool


def parse_index_uri(uri: str) -> IndexLocation:
    """Split ``PATH.db[#NAME]`` or ``http(s)://HOST:PORT[#NAME]``; ``ValueError`` otherwise.

    Example:
        >>> parse_index_uri("gallery.txt")
        Traceback (most recent call last):
        ...
        ValueError: index 'gallery.txt': expected a Milvus Lite file ending in .db or http(s)://HOST:PORT (optionally #COLLECTION)
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"index URI must be a non-empty string, got {uri!r}")
    base, _, name = uri.partition("#")
    collection = name or DEFAULT_COLLECTION
    if not collection.replace("_", "a").isalnum() or collection[0].isdigit():
        raise ValueError(
            f"index {uri!r}: collection name {collection!r} must be letters, digits and _ "
            "(not starting with a digit)"
        )
    if base.startswith(("http://", "https://")):
        host = base.split("://", 1)[1].rstrip("/")
        if not host or "/" in host:
            raise ValueError(f"index {uri!r}: expected http(s)://HOST:PORT")
        return IndexLocation(base.rstrip("/"), collection, True)
    if "://" in base or not base.endswith(".db"):
        raise ValueError(
            f"index {uri!r}: expected a Milvus Lite file ending in .db or http(s)://HOST:PORT "
            "(optionally #COLLECTION)"
        )
    return IndexLocation(base, collection, False)


LITE_CLIENT_OPTIONS: dict[str, Any] = {
    # pymilvus pings every 10 s even without calls; Milvus Lite's in-process gRPC server takes
    # a ping at most every 5 minutes and answers more with GOAWAY too_many_pings (a stderr
    # line each time, and a long create_index retried). Ping only during calls, at that pace.
    "grpc_options": {
        "grpc.keepalive_time_ms": 300_000,
        "grpc.keepalive_permit_without_calls": False,
    }
}


_LITE_OPEN: dict[str, int] = {}
"""How many engines of this process hold each Milvus Lite file (by absolute path)."""
_LITE_LOCK = threading.Lock()


def _lite_opened(path: str) -> None:
    with _LITE_LOCK:
        key = os.path.abspath(path)
        _LITE_OPEN[key] = _LITE_OPEN.get(key, 0) + 1


def _lite_closed(path: str) -> None:
    """Stop Milvus Lite's server of ``path`` when the last engine of this process closes it.

    pymilvus starts one in-process server per ``.db`` file (``milvus_lite.server_manager``),
    which holds the file's lock, and ``MilvusClient.close`` leaves it running until the process
    exits; releasing it frees the file for another process.
    """
    with _LITE_LOCK:
        key = os.path.abspath(path)
        left = _LITE_OPEN.get(key, 0) - 1
        if left > 0:
            _LITE_OPEN[key] = left
            return
        _LITE_OPEN.pop(key, None)
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(key)


class MilvusEngine:
    """A gallery collection in Milvus Lite (a ``.db`` file) or a Milvus server.

    Errors are one-line ``ValueError``: an unreachable server, a file another process holds,
    a bad filter expression.

    Example:
        >>> import tempfile
        >>> from fam_core.search.records import IndexCard, IndexRow
        >>> engine = MilvusEngine(tempfile.mkdtemp() + "/g.db")
        >>> engine.create(2, "cosine", IndexCard("m", 2, "cosine", "0" * 64))
        >>> engine.upsert([IndexRow("a", "a.png", "x", torch.tensor([1.0, 0.0])),
        ...                IndexRow("b", "b.png", None, torch.tensor([0.0, 1.0]))])
        2
        >>> [(hit.id, round(hit.score, 4)) for hit in engine.search(torch.tensor([[1.0, 0.1]]), 1)[0]]
        [('a', 0.995)]
        >>> engine.count(), engine.labels()
        (2, {'x': 1})
        >>> engine.close()
    """

    def __init__(
        self, uri: str, *, timeout: float = SERVER_TIMEOUT_S, card_ttl: float = CARD_TTL_S
    ) -> None:
        self.uri = uri
        self.location = parse_index_uri(uri)
        self.timeout = timeout
        self.card_ttl = card_ttl
        self._client: Any = None
        self._card: IndexCard | None = None
        self._card_read = 0.0  # time.monotonic() when _card was read
        self._loaded: set[str] = set()

    # -- the connection
    @property
    def client(self) -> Any:
        """The :class:`pymilvus.MilvusClient` (connected on first use)."""
        if self._client is None:
            require("search", "pymilvus")
            if not self.location.server:
                require("search", "milvus_lite")
            from pymilvus import MilvusClient

            for name in _QUIET_LOGGERS:
                logging.getLogger(name).setLevel(logging.CRITICAL)

            where = self.location.client_uri
            if not self.location.server:
                folder = Path(where).resolve().parent
                if not folder.is_dir():
                    raise ValueError(f"index {self.uri}: no such folder {folder}")
            try:
                options = {"timeout": self.timeout} if self.location.server else LITE_CLIENT_OPTIONS
                self._client = MilvusClient(where, **options)
                if not self.location.server:
                    _lite_opened(where)
            except Exception as error:  # noqa: BLE001 - pymilvus raises many kinds
                what = "reach Milvus at" if self.location.server else "open Milvus Lite file"
                raise IndexUnavailable(f"cannot {what} {where}: {_first_line(error)}") from None
        return self._client

    def close(self) -> None:
        """Close the connection. Once the last engine of this process that opened a Milvus Lite
        file closes, its in-process gRPC server stops: the file is free for another process,
        and nothing polls while the process forks (a local Ray's start would log gRPC
        ``fork_posix`` lines). The next call opens it again.

        Example:
            >>> import tempfile
            >>> engine = MilvusEngine(tempfile.mkdtemp() + "/g.db")
            >>> engine.create(2, "cosine", IndexCard("m", 2, "cosine", "0" * 64))
            >>> engine.close()
            >>> engine.count()  # opened again
            0
            >>> engine.close()
        """
        if self._client is not None:
            client, self._client = self._client, None
            self._loaded.clear()
            try:
                client.close()
            finally:
                if not self.location.server:
                    _lite_closed(self.location.client_uri)

    def exists(self) -> bool:
        """Whether the collection exists (a missing Milvus Lite file is not created)."""
        if self._missing_file():
            return False
        return bool(self._call("look up", self.client.has_collection, self._name))

    def _missing_file(self) -> bool:
        return (
            not self.location.server
            and self._client is None
            and not Path(self.location.client_uri).exists()
        )

    def _ready(self, name: str) -> Any:
        """The client, with collection ``name`` loaded for reading (Milvus keeps a collection
        released until it is loaded: a reopened Milvus Lite file, a server's restart)."""
        client = self.client
        if name not in self._loaded:
            self._call("load", client.load_collection, name)
            self._loaded.add(name)
        return client

    # -- VectorEngine
    def create(self, dimension: int, metric: str, card: IndexCard) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
        if self.exists():
            return
        if card.index_type != "FLAT" and not self.location.server:
            _require_faiss(card.index_type)
        from pymilvus import DataType

        client = self.client
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID)
        schema.add_field("uri", DataType.VARCHAR, max_length=MAX_URI)
        schema.add_field("label", DataType.VARCHAR, max_length=MAX_LABEL)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dimension)
        index = client.prepare_index_params()
        index.add_index(
            field_name="vector",
            index_type=card.index_type,
            metric_type=METRICS[metric],
            # as one JSON "params" entry: the form Milvus Lite reads (it drops the flat
            # entries pymilvus 3 sends) and a Milvus server reads too
            params={"params": split_params(card.index_type, card.index_params)[0]},
        )
        card_schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        card_schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=64)
        card_schema.add_field("card", DataType.VARCHAR, max_length=4096)
        card_schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
        card_index = client.prepare_index_params()
        card_index.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
        self._call(
            "create the collection of",
            client.create_collection,
            self._card_name,
            schema=card_schema,
            index_params=card_index,
            consistency_level="Strong",
        )
        self._call(
            "store the card of",
            client.upsert,
            self._card_name,
            [{"key": _CARD_KEY, "card": card.to_json(), "vector": [0.0, 0.0]}],
        )
        self._call(
            "create the collection of",
            client.create_collection,
            self._name,
            schema=schema,
            index_params=index,
            consistency_level="Strong",
        )
        self._card, self._card_read = card, time.monotonic()

    def upsert(self, rows: Sequence[IndexRow]) -> int:
        records = [_record(row) for row in rows]
        for start in range(0, len(records), _CHUNK):
            self._call("write to", self.client.upsert, self._name, records[start : start + _CHUNK])
        return len(records)

    def search(
        self,
        vectors: torch.Tensor,
        top_k: int,
        filter: str | None = None,
        params: Mapping[str, int] | None = None,
    ) -> list[list[Hit]]:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2:
            raise ValueError("vectors must be a tensor [Q, D] of embeddings")
        metric = self._metric()
        card = self.card()
        assert card is not None  # _metric refused an empty index
        search_params = search_override(card.index_type, card.index_params, params)
        if "ef" in search_params:  # HNSW looks at ef candidates: at least top_k
            search_params["ef"] = max(search_params["ef"], top_k)
        data = vectors.detach().to("cpu", torch.float32).tolist()
        client = self._ready(self._name)
        try:
            found = client.search(
                self._name,
                data=data,
                limit=top_k,
                filter=filter or "",
                search_params={"params": search_params},
                output_fields=["uri", "label", "vector"],
            )
        except Exception as error:  # noqa: BLE001
            if filter:
                raise ValueError(f"filter {filter!r}: {_first_line(error)}") from None
            raise IndexUnavailable(
                f"cannot search index {self.uri}: {_first_line(error)}"
            ) from None
        return [[_hit(hit, metric) for hit in hits] for hits in found]

    def get(self, ids: Sequence[str]) -> list[IndexRow]:
        if not self.exists():
            return []
        ids = list(ids)
        found: dict[str, IndexRow] = {}
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            records = self._call(
                "read",
                self._ready(self._name).get,
                self._name,
                ids=chunk,
                output_fields=["uri", "label", "vector"],
            )
            for record in records:
                found[record["id"]] = _row(record)
        return [found[i] for i in ids if i in found]

    def existing(self, ids: Sequence[str]) -> set[str]:
        if not self.exists():
            return set()
        ids = list(ids)
        found: set[str] = set()
        for start in range(0, len(ids), _CHUNK):
            records = self._call(
                "read",
                self._ready(self._name).get,
                self._name,
                ids=ids[start : start + _CHUNK],
                output_fields=["id"],
            )
            found.update(record["id"] for record in records)
        return found

    def count(self) -> int:
        if not self.exists():
            return 0
        result = self._call(
            "count",
            self._ready(self._name).query,
            self._name,
            filter="",
            output_fields=["count(*)"],
        )
        return int(result[0]["count(*)"])

    def labels(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        if not self.exists():
            return counts
        iterator = self._call(
            "read",
            self._ready(self._name).query_iterator,
            self._name,
            batch_size=_CHUNK,
            filter='label != ""',
            output_fields=["label"],
        )
        try:
            while batch := iterator.next():
                for record in batch:
                    counts[record["label"]] = counts.get(record["label"], 0) + 1
        finally:
            iterator.close()
        return dict(sorted(counts.items()))

    def drop(self) -> None:
        if self._missing_file():
            return
        for name in (self._name, self._card_name):
            if self._call("look up", self.client.has_collection, name):
                self._call("drop", self.client.drop_collection, name)
        self._card = None
        self._loaded.clear()

    def card(self) -> IndexCard | None:
        """The index's card, read again once it is ``card_ttl`` seconds old (an index rebuilt
        meanwhile is loaded again, and its new model is what searches are checked against)."""
        if self._card is not None and time.monotonic() - self._card_read < self.card_ttl:
            return self._card
        card = self._read_card()
        if self._card is not None and card != self._card:
            self._loaded.clear()  # collections made again are released until loaded
        self._card, self._card_read = card, time.monotonic()
        return card

    def _read_card(self) -> IndexCard | None:
        if self._missing_file():
            return None
        if not self._call("look up", self.client.has_collection, self._card_name):
            return None
        records = self._call(
            "read the card of",
            self._ready(self._card_name).get,
            self._card_name,
            ids=[_CARD_KEY],
            output_fields=["card"],
        )
        return IndexCard.from_json(records[0]["card"]) if records else None

    # -- helpers
    @property
    def _name(self) -> str:
        return self.location.collection

    @property
    def _card_name(self) -> str:
        return f"{self.location.collection}_card"

    def _metric(self) -> str:
        card = self.card()
        if card is None:
            raise ValueError(f"index {self.uri} holds no gallery: build it with `fam index build`")
        return card.similarity

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - pymilvus raises many kinds
            raise IndexUnavailable(
                f"cannot {what} index {self.uri}: {_first_line(error)}"
            ) from None


def _require_faiss(index_type: str) -> None:
    """Milvus Lite builds the approximate indexes with FAISS (``faiss-cpu``)."""
    import importlib.util

    if importlib.util.find_spec("faiss") is None:
        raise ValueError(
            f"Milvus Lite builds a {index_type} index with FAISS: pip install faiss-cpu "
            "(or use index type FLAT, or a Milvus server)"
        )


def _record(row: IndexRow) -> dict[str, Any]:
    for name, value, limit in (("id", row.id, MAX_ID), ("uri", row.uri, MAX_URI)):
        if not isinstance(value, str) or len(value.encode()) > limit:
            raise ValueError(f"row {row.id!r}: {name} must be a string of at most {limit} bytes")
    if not row.id:
        raise ValueError("a row id must be a non-empty string")
    label = "" if row.label is None else row.label
    if not isinstance(label, str) or len(label.encode()) > MAX_LABEL:
        raise ValueError(f"row {row.id!r}: label must be a string of at most {MAX_LABEL} bytes")
    vector = row.embedding.detach().to("cpu", torch.float32).reshape(-1)
    if not torch.isfinite(vector).all():
        raise ValueError(f"row {row.id!r}: the embedding holds NaN or infinity")
    return {"id": row.id, "uri": row.uri, "label": label, "vector": vector.tolist()}


def _row(record: dict[str, Any]) -> IndexRow:
    return IndexRow(
        id=record["id"],
        uri=record["uri"],
        label=record["label"] or None,
        embedding=torch.tensor(record["vector"], dtype=torch.float32),
    )


def _hit(hit: dict[str, Any], similarity: str) -> Hit:
    entity = hit["entity"]
    distance = float(hit["distance"])
    score = -math.sqrt(max(distance, 0.0)) if similarity == "euclidean" else distance
    return Hit(
        id=hit["id"],
        uri=entity["uri"],
        label=entity["label"] or None,
        score=score,
        embedding=torch.tensor(entity["vector"], dtype=torch.float32),
    )


def _first_line(error: BaseException) -> str:
    message = getattr(error, "message", None)  # a MilvusException's text without its code
    text = (message if isinstance(message, str) and message else str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__
