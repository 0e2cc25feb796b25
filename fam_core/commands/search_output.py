"""What ``fam search`` writes: one JSON object per query, float maps as ``.npy`` files, and a
PNG montage per query (the query and its neighbours, each with its overlay, score and label).

Example:
    >>> from fam_core.search.records import Neighbour
    >>> hit = ExplainedNeighbour(Neighbour("a.png", "/g/a.png", "rose", 0.5, torch.zeros(2)))
    >>> search_record("q.png", [hit])
    {'query': 'q.png', 'results': [{'id': 'a.png', 'uri': '/g/a.png', 'label': 'rose', 'score': 0.5, 'query_map': None, 'reference_map': None}]}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fam_core.pipeline.explained_search import ExplainedNeighbour
from fam_core.render import image_grid, overlay

MAPS_FOLDER = "maps"


def search_record(
    query: str, results: Sequence[ExplainedNeighbour], maps: Sequence[dict[str, str | None]] = ()
) -> dict[str, Any]:
    """The JSON object of one query; ``maps`` gives each result's map file names (``None``:
    no map; left out: every map ``None``). ``reference_error`` is added where a neighbour's
    image could not be read."""
    records = []
    for number, hit in enumerate(results):
        files = maps[number] if maps else {}
        record: dict[str, Any] = {
            "id": hit.neighbour.id,
            "uri": hit.neighbour.uri,
            "label": hit.neighbour.label,
            "score": hit.neighbour.score,
            "query_map": files.get("query_map"),
            "reference_map": files.get("reference_map"),
        }
        if hit.reference_error is not None:
            record["reference_error"] = hit.reference_error
        records.append(record)
    return {"query": query, "results": records}


def write_maps(
    out: Path, stem: str, results: Sequence[ExplainedNeighbour]
) -> list[dict[str, str | None]]:
    """Save each result's maps as float32 ``.npy`` files in ``out/maps``; their names relative
    to ``out`` (``None`` where a map is absent)."""
    folder = out / MAPS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for rank, hit in enumerate(results, start=1):
        files: dict[str, str | None] = {}
        for side, value in (("query_map", hit.query_map), ("reference_map", hit.reference_map)):
            if value is None:
                files[side] = None
                continue
            name = f"{MAPS_FOLDER}/{stem}-{rank:03d}-{side.removesuffix('_map')}.npy"
            np.save(out / name, value.detach().cpu().float().numpy())
            files[side] = name
        names.append(files)
    return names


def search_montage(
    query: torch.Tensor,
    results: Sequence[ExplainedNeighbour],
    neighbours: Sequence[torch.Tensor | None],
    *,
    title: str | None = None,
) -> torch.Tensor:
    """The montage ``[H', W', 3]`` uint8 of one query: the first row shows the query and its
    map for each neighbour, the second each neighbour (``[3, H, W]`` pixels in ``[0, 1]``, or
    ``None`` when it could not be read) with its own map when there is one; the columns are
    titled with each neighbour's rank, label and score.

    Example:
        >>> from fam_core.search.records import Neighbour
        >>> hit = ExplainedNeighbour(Neighbour("a", "", "rose", 0.9, torch.zeros(2)),
        ...                          query_map=torch.rand(8, 8))
        >>> search_montage(torch.rand(3, 8, 8), [hit], [torch.rand(3, 8, 8)]).dtype
        torch.uint8
    """
    top: list[torch.Tensor | None] = [query]
    bottom: list[torch.Tensor | None] = [None]
    titles = ["query"]
    for rank, (hit, pixels) in enumerate(zip(results, neighbours, strict=True), start=1):
        top.append(query if hit.query_map is None else _overlay(query, hit.query_map))
        if pixels is None or hit.reference_map is None:
            bottom.append(pixels)
        else:
            bottom.append(_overlay(pixels, hit.reference_map))
        label = hit.neighbour.label or hit.neighbour.id
        titles.append(f"{rank}. {label} {hit.neighbour.score:.3f}")
    return image_grid(
        top + bottom,
        rows=2,
        cols=len(top),
        titles=titles,
        row_labels=["query map", "neighbour"],
        title=title,
    )


def _overlay(pixels: torch.Tensor, heatmap: torch.Tensor) -> torch.Tensor:
    blended = overlay(pixels.float().cpu(), heatmap.float().cpu().clamp(0, 1))
    return blended.permute(2, 0, 1).float() / 255.0
