"""The vector index types a gallery is built with, and their build and search parameters.

``FLAT`` (the default) compares each query with every row: exact. ``IVF_FLAT`` clusters the
rows into ``nlist`` cells and searches the ``nprobe`` cells nearest the query; ``HNSW`` walks a
graph of degree ``M`` built with ``efConstruction`` candidates, searching with ``ef``. Both
are approximate and faster on large galleries (recall and latency: the benchmarks page). The
defaults are FAISS's and Milvus's usual ones (those Milvus Lite builds when given none), the
search side raised until recall@10 passes 0.95 on the benchmark's vectors
(``bench/bench_search_recall.py``).

Example:
    >>> index_params("HNSW", {"ef": 128})
    {'M': 16, 'efConstruction': 200, 'ef': 128}
    >>> split_params("HNSW", index_params("HNSW"))
    ({'M': 16, 'efConstruction': 200}, {'ef': 64})
    >>> index_params("IVF_PQ")
    Traceback (most recent call last):
    ...
    ValueError: index type must be one of ['FLAT', 'IVF_FLAT', 'HNSW'], got 'IVF_PQ'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEFAULT_INDEX_TYPE = "FLAT"
BUILD_PARAMS: dict[str, dict[str, int]] = {
    "FLAT": {},
    "IVF_FLAT": {"nlist": 128},
    "HNSW": {"M": 16, "efConstruction": 200},
}
"""Each index type's build parameters and their defaults."""
SEARCH_PARAMS: dict[str, dict[str, int]] = {
    "FLAT": {},
    "IVF_FLAT": {"nprobe": 32},
    "HNSW": {"ef": 64},
}
"""Each index type's search parameters and their defaults."""
INDEX_TYPES = tuple(BUILD_PARAMS)
SEARCH_PARAMETER_NAMES: tuple[str, ...] = tuple(
    dict.fromkeys(name for params in SEARCH_PARAMS.values() for name in params)
)
"""Every search parameter a request may name (each index type takes its own)."""
_RANGES: dict[str, tuple[int, int]] = {  # Milvus's bounds
    "nlist": (1, 65536),
    "nprobe": (1, 65536),
    "M": (2, 2048),
    "efConstruction": (1, 2**31 - 1),
    "ef": (1, 2**31 - 1),
}


def check_index_type(index_type: Any) -> str:
    """``index_type`` if it is one of :data:`INDEX_TYPES`, else a one-line ``ValueError``."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index type must be one of {list(INDEX_TYPES)}, got {index_type!r}")
    return index_type


def index_params(index_type: str, params: Mapping[str, Any] | None = None) -> dict[str, int]:
    """The build and search parameters of ``index_type``: its defaults, updated by ``params``
    (names of :data:`BUILD_PARAMS` and :data:`SEARCH_PARAMS`, integers in Milvus's bounds);
    a one-line ``ValueError`` names what is allowed.

    Example:
        >>> index_params("IVF_FLAT", {"ef": 10})
        Traceback (most recent call last):
        ...
        ValueError: IVF_FLAT index: unknown parameter 'ef' (allowed: nlist, nprobe)
        >>> index_params("HNSW", {"M": 1})
        Traceback (most recent call last):
        ...
        ValueError: HNSW index: M must be an int in [2, 2048], got 1
    """
    check_index_type(index_type)
    allowed = {**BUILD_PARAMS[index_type], **SEARCH_PARAMS[index_type]}
    given = dict(params or {})
    for name in given:
        if name not in allowed:
            names = ", ".join(allowed) or "none"
            raise ValueError(f"{index_type} index: unknown parameter {name!r} (allowed: {names})")
    merged = {**allowed, **given}
    for name, value in merged.items():
        low, high = _RANGES[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(
                f"{index_type} index: {name} must be an int in [{low}, {high}], got {value!r}"
            )
    return merged


def search_override(
    index_type: str, params: dict[str, int], override: Mapping[str, Any] | None
) -> dict[str, int]:
    """The search parameters of an index of ``index_type`` built with ``params``, where
    ``override`` replaces some (search parameters only: ``ef``, ``nprobe``).

    Example:
        >>> search_override("HNSW", index_params("HNSW"), {"ef": 200})
        {'ef': 200}
        >>> search_override("FLAT", {}, {"ef": 200})
        Traceback (most recent call last):
        ...
        ValueError: FLAT index: unknown search parameter 'ef' (allowed: none)
    """
    search = split_params(index_type, params)[1]
    for name in override or {}:
        if name not in SEARCH_PARAMS[index_type]:
            names = ", ".join(SEARCH_PARAMS[index_type]) or "none"
            raise ValueError(
                f"{index_type} index: unknown search parameter {name!r} (allowed: {names})"
            )
    merged = {**search, **(override or {})}
    return split_params(index_type, index_params(index_type, {**params, **merged}))[1]


def split_params(
    index_type: str, params: Mapping[str, int]
) -> tuple[dict[str, int], dict[str, int]]:
    """``params`` split into build and search parameters."""
    build = {name: value for name, value in params.items() if name in BUILD_PARAMS[index_type]}
    search = {name: value for name, value in params.items() if name in SEARCH_PARAMS[index_type]}
    return build, search
