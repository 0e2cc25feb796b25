"""Search in the pipeline: a served model's gallery index, queried and explained.

:func:`run_search_jobs` is what a model's worker runs for
:class:`~fam_core.pipeline.jobs.SearchJob` s (the queries of several requests with one
:meth:`~fam_core.pipeline.jobs.SearchJob.batch_key` in one call of
:func:`fam_core.pipeline.explained_search`); :func:`encode_search_result` turns one query's
explained neighbours into a :class:`~fam_core.pipeline.request.SearchResult` whose maps are
float16 like every heatmap of the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from fam_core.messages import first_line
from fam_core.pipeline.decode import check_sizes
from fam_core.pipeline.encode import heatmap_bytes
from fam_core.pipeline.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from fam_core.pipeline.jobs import SearchJob
from fam_core.pipeline.limits import Limits
from fam_core.pipeline.request import (
    EXPLAIN_MODES,
    Heatmap,
    NeighbourResult,
    SearchRequest,
    SearchResult,
)

if TYPE_CHECKING:
    from fam_core.pipeline.models import ServedModel
    from fam_core.search.index import GalleryIndex

Explained = list[Any]
"""One query's :class:`fam_core.search.ExplainedNeighbour` s, most similar first."""


def no_index(model: str) -> FailedPrecondition:
    """The error of a search of a model without an index.

    Example:
        >>> str(no_index("m"))
        "model 'm' has no index to search: name one with 'index:' in its config"
    """
    return FailedPrecondition(
        f"model {model!r} has no index to search: name one with 'index:' in its config"
    )


def search_job(served: ServedModel, request: SearchRequest, limits: Limits) -> SearchJob:
    """The :class:`SearchJob` of ``request`` with the model's defaults filled in, every option
    and limit checked before anything is decoded (its ``inputs`` are ``[B, 0]`` until then).

    :class:`FailedPrecondition` for a model without an index; :class:`InvalidArgument` for a
    ``top_k`` outside ``[1, limits.max_top_k]``, an unknown explain mode or a filter that is
    not text within ``limits.max_filter_chars``; :class:`NotFound` for an unknown method;
    :class:`ResourceExhausted` for too many images, or maps of more bytes than a request may
    hold; :class:`InvalidArgument` for search parameters the index does not take
    (:func:`check_search_params`).
    """
    if served.index is None:
        raise no_index(served.name)
    if not request.images:
        raise InvalidArgument("the request has no images: expected at least one")
    check_sizes(tuple(request.images), limits)
    top_k = served.config.top_k if request.top_k is None else request.top_k
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= limits.max_top_k:
        raise InvalidArgument(f"top_k must be an integer in [1, {limits.max_top_k}], got {top_k!r}")
    explain = request.explain or served.config.explain
    if explain not in EXPLAIN_MODES:
        shown = explain[:40] if isinstance(explain, str) else explain
        raise InvalidArgument(f"explain must be one of {list(EXPLAIN_MODES)}, got {shown!r}")
    method = request.method or served.default_method
    if explain != "none":
        served.check_method(method)
    search_filter = request.filter or None
    if search_filter is not None and (
        not isinstance(search_filter, str) or len(search_filter) > limits.max_filter_chars
    ):
        raise InvalidArgument(
            f"filter must be text of at most {limits.max_filter_chars} characters, got "
            f"{type(search_filter).__name__} of {len(search_filter)}"
        )
    maps = {"none": 0, "query": 1, "both": 2}[explain] * len(request.images) * top_k
    height, width = served.config.image_size
    if maps * height * width * 2 > limits.max_request_bytes:
        raise ResourceExhausted(
            f"{maps} maps of {height}x{width} float16 values are more than the "
            f"{limits.max_request_bytes} bytes an answer may hold: ask for fewer images or a "
            "smaller top_k"
        )
    search_params = check_search_params(served.index, request.search_params, limits)
    empty = torch.zeros(len(request.images), 0)
    return SearchJob(empty, method, explain, top_k, search_filter, search_params)


def check_search_params(
    index: GalleryIndex, params: Mapping[str, Any] | None, limits: Limits
) -> tuple[tuple[str, int], ...]:
    """A request's ``search_params`` for ``index`` as sorted ``(name, value)`` pairs, every
    value checked before the search: names the index's type searches with (``ef``:
    ``HNSW``, ``nprobe``: ``IVF_FLAT``), integers, ``ef`` at most ``limits.max_search_ef``,
    ``nprobe`` at most the index's ``nlist`` cells. One-line :class:`InvalidArgument`.

    Example:
        >>> from types import SimpleNamespace as Fake
        >>> hnsw = Fake(card=Fake(index_type="HNSW", index_params={"M": 16, "ef": 64}))
        >>> check_search_params(hnsw, {"ef": 128}, Limits())
        (('ef', 128),)
        >>> check_search_params(hnsw, {"nprobe": 8}, Limits())
        Traceback (most recent call last):
        ...
        fam_core.pipeline.errors.InvalidArgument: search_params: HNSW index: unknown search parameter 'nprobe' (allowed: ef)
    """
    from fam_core.search.engine import IndexUnavailable
    from fam_core.search.index_types import search_override

    if not params:
        return ()
    if not isinstance(params, Mapping):
        raise InvalidArgument(
            f'search_params must map names to integers ({{"ef": 128}}), got {type(params).__name__}'
        )
    try:
        card = index.card
    except IndexUnavailable as error:
        raise Unavailable(f"search: {first_line(error)}") from None
    except ValueError as error:  # the index was dropped under the server
        raise FailedPrecondition(f"search: {first_line(error)}") from None
    try:
        search_override(card.index_type, card.index_params, params)
    except ValueError as error:
        raise InvalidArgument(f"search_params: {first_line(error)}") from None
    bounds = {"ef": limits.max_search_ef, "nprobe": card.index_params.get("nlist", 0)}
    for name, value in params.items():
        if value > bounds[name]:
            what = "the server's limit" if name == "ef" else "the index's nlist"
            raise InvalidArgument(
                f"search_params: {name} must be at most {bounds[name]} ({what}), got {value}"
            )
    return tuple(sorted((name, int(value)) for name, value in params.items()))


def run_search_jobs(served: ServedModel, jobs: list[SearchJob]) -> list[list[Explained]]:
    """Search the queries of ``jobs`` (one batch key) in ``served``'s index: per job, per
    query, its explained neighbours."""
    from fam_core.pipeline.explained_search import explained_search
    from fam_core.search.engine import IndexUnavailable

    if served.index is None:
        raise no_index(served.name)
    job = jobs[0]
    inputs = torch.cat([j.inputs for j in jobs])
    try:
        found = explained_search(
            served,
            served.index,
            inputs,
            top_k=job.top_k,
            method=job.method,
            explain=job.explain,
            filter=job.filter,
            search_params=dict(job.search_params) or None,
        )
    except IndexUnavailable as error:  # the engine did not answer
        raise Unavailable(f"search on model {served.name!r}: {first_line(error)}") from None
    except (ValueError, TypeError) as error:  # a filter the engine cannot parse, a bad method
        raise InvalidArgument(f"search on model {served.name!r}: {first_line(error)}") from None
    parts: list[list[Explained]] = []
    start = 0
    for j in jobs:
        parts.append(found[start : start + len(j)])
        start += len(j)
    return parts


def encode_search_result(neighbours: Explained, method: str, target_layer: str) -> SearchResult:
    """One query's explained neighbours as a :class:`SearchResult` (maps as float16).

    Example:
        >>> from types import SimpleNamespace as Fake
        >>> found = Fake(id="a.png", uri="/g/a.png", label=None, score=0.5)
        >>> item = Fake(neighbour=found, query_map=torch.ones(2, 3), reference_map=None,
        ...             reference_error=None)
        >>> result = encode_search_result([item], "fam", "block4")
        >>> result.neighbours[0].query_map.shape, result.neighbours[0].reference_map
        ((2, 3), None)
    """
    return SearchResult(
        tuple(
            NeighbourResult(
                id=item.neighbour.id,
                uri=item.neighbour.uri,
                label=item.neighbour.label,
                score=float(item.neighbour.score),
                query_map=_heatmap(item.query_map, method, target_layer),
                reference_map=_heatmap(item.reference_map, method, target_layer),
                reference_error=item.reference_error,
            )
            for item in neighbours
        )
    )


def _heatmap(values: torch.Tensor | None, method: str, target_layer: str) -> Heatmap | None:
    if values is None:
        return None
    height, width = values.shape[-2:]
    return Heatmap(
        data=heatmap_bytes(values.reshape(height, width)),
        shape=(int(height), int(width)),
        method=method,
        target_layer=target_layer,
        resolution="input",
    )
