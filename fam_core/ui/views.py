"""What the viewer page shows for one dropped image, as JSON: the query and a list of items
(classes, gallery neighbours or prototypes), each with its score and heatmap layers.

Every number and map comes from the request pipeline (:mod:`.backends`); this module only asks
for them and encodes them for the browser: images as PNG data URLs at the model's input size,
each heatmap as its own colour layer, so the page blends it over its image with an opacity
slider (CSS opacity ``a`` shows ``(1 - a) * image + a * colour``, the blend of
:func:`fam_core.render.overlay`).

Example:
    >>> from fam_core.data.flowers import make_flowers
    >>> from fam_core.render import to_png_bytes
    >>> from fam_core.ui.backends import LocalBackend
    >>> flower = make_flowers([9], per_class=1).images[0]  # class 9: leaves-cyan
    >>> png = to_png_bytes((flower * 255).round().byte().permute(1, 2, 0))
    >>> backend = LocalBackend.load("default-classifier")
    >>> view = explain_view(backend, png)
    >>> view["kind"], len(view["items"]), view["items"][0]["label"]
    ('classes', 5, 'centre-yellow')
    >>> backend.close()
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fam_core.pipeline import (
    EncodedImage,
    ExplainRequest,
    Heatmap,
    PipelineError,
    heatmap_from_bytes,
)
from fam_core.pipeline.request import ModelDescription, SearchRequest
from fam_core.render import colorize, to_png_bytes
from fam_core.ui.backends import ViewerBackend

CLASS_COUNT = 5
"""Classifiers: the classes shown, best first, each with its own map."""
CLASS_TASKS = ("classifier", "knn")
"""Tasks whose ``Explain`` scores classes (a ``knn`` model: by its neighbours' vote)."""
DEFAULT_TOP_K = 10
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class GalleryImage:
    """One image of a small gallery given to the viewer (``fam ui --references DIR``).

    ``id``: its path relative to the folder; ``label``: its sub-folder's name (``None`` at the
    top level).
    """

    id: str
    label: str | None
    data: bytes


def load_gallery(folder: str | Path) -> tuple[GalleryImage, ...]:
    """The images under ``folder`` (PNG, JPEG, WebP; sub-folders are labels), sorted by path.

    Example:
        >>> load_gallery("no/such/folder")
        Traceback (most recent call last):
        ...
        ValueError: references: no/such/folder is not a folder
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"references: {folder} is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"references: {folder} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return tuple(
        GalleryImage(
            id=path.relative_to(root).as_posix(),
            label=path.parent.name if path.parent != root else None,
            data=path.read_bytes(),
        )
        for path in paths
    )


def explain_view(
    backend: ViewerBackend,
    image: bytes,
    *,
    method: str | None = None,
    top_k: int | None = None,
    gallery: Sequence[GalleryImage] = (),
) -> dict[str, Any]:
    """The page's answer for one query image (:func:`view_kind` says which).

    ``"classes"``: the :data:`CLASS_COUNT` best classes, each with the query's map for it
    (a ``knn`` model's map: the paper's kNN target, the class's nearest neighbours).
    ``"search"``: the ``top_k`` nearest images of the model's index (``None``: the model's
    ``top_k``), searched and explained on both sides by the pipeline's search: each with the
    query's map (the neighbour's embedding as the target) and the neighbour's map (the
    query's embedding as the target). ``"gallery"``: the same for a small ``gallery`` given
    here, each map by one explain request. ``"prototypes"``: the ``top_k`` nearest
    prototypes, the nearest with the query's map.

    Returns:
        ``{"model", "task", "kind", "method", "query", "items": [{"label", "score", "id",
        "image", "query_map", "reference_map", "note"}]}``; images and map layers are PNG
        data URLs (``None`` where absent); ``note`` says why a neighbour has no image or map.
    """
    described = backend.describe()
    query = EncodedImage(image)
    kind = view_kind(described, bool(gallery))
    count = top_k or described.top_k or DEFAULT_TOP_K
    if kind == "classes":
        items, method_used = _classes(backend, query, method)
    elif kind == "search":
        items, method_used = _search(backend, query, method, top_k)
    elif kind == "gallery":
        items, method_used = _gallery(backend, query, method, count, gallery)
    else:
        items, method_used = _prototypes(backend, query, method, count)
    return {
        "model": described.name,
        "task": described.task,
        "kind": kind,
        "method": method_used,
        "query": image_url(backend.pixels((query,))[0]),
        "items": items,
    }


def view_kind(described: ModelDescription, gallery: bool = False) -> str:
    """What the page shows for a model: ``"classes"`` (a classifier, or a ``knn`` model: its
    classes by the neighbours' vote), ``"gallery"`` (a small gallery given to the viewer),
    ``"search"`` (an embedding model with an index) or ``"prototypes"``.

    Example:
        >>> from fam_core.pipeline import ModelRegistry, Pipeline
        >>> pipeline = Pipeline(ModelRegistry.from_names(["default-embedding"]), batching=None)
        >>> view_kind(pipeline.describe("default-embedding"))
        'prototypes'
    """
    if described.task in CLASS_TASKS:
        return "classes"
    if gallery:
        return "gallery"
    return "search" if described.index else "prototypes"


def _classes(
    backend: ViewerBackend, query: EncodedImage, method: str | None
) -> tuple[list[dict[str, Any]], str]:
    names = backend.describe().class_names
    first = backend.explain(ExplainRequest(backend.model, (query,), method)).results[0]
    scores = torch.tensor(first.scores)
    values, indices = scores.topk(min(CLASS_COUNT, scores.numel()))
    items = []
    for value, index in zip(values.tolist(), indices.tolist(), strict=True):
        result = first
        if index != first.prediction.index:
            request = ExplainRequest(backend.model, (query,), method, target_class=index)
            result = backend.explain(request).results[0]
        label = names[index] if index < len(names) else str(index)
        items.append(_item(label, value, query_map=result.heatmap))
    return items, _method(first.heatmap)


def _gallery(
    backend: ViewerBackend,
    query: EncodedImage,
    method: str | None,
    top_k: int,
    gallery: Sequence[GalleryImage],
) -> tuple[list[dict[str, Any]], str]:
    references = tuple(EncodedImage(g.data) for g in gallery)
    ranking = ExplainRequest(
        backend.model, (query,), heatmap=False, top_k=top_k, references=references
    )
    ranked = backend.explain(ranking).results[0].top_k
    neighbours = [references[m.index] for m in ranked]
    # the neighbours' maps, the query's embedding as their target: one pass for all of them
    backward = backend.explain(
        ExplainRequest(backend.model, tuple(neighbours), method, references=(query,))
    ).results
    pixels = backend.pixels(tuple(neighbours))
    items = []
    for match, neighbour, reference_result, picture in zip(
        ranked, neighbours, backward, pixels, strict=True
    ):
        forward = ExplainRequest(backend.model, (query,), method, references=(neighbour,))
        entry = gallery[match.index]
        items.append(
            _item(
                entry.label or entry.id,
                match.score,
                id=entry.id,
                image=picture,
                query_map=backend.explain(forward).results[0].heatmap,
                reference_map=reference_result.heatmap,
            )
        )
    return items, _method(backward[0].heatmap if backward else None)


def _search(
    backend: ViewerBackend, query: EncodedImage, method: str | None, top_k: int | None
) -> tuple[list[dict[str, Any]], str]:
    request = SearchRequest(backend.model, (query,), top_k=top_k, method=method, explain="both")
    response = backend.search(request)
    (result,) = response.results
    items = []
    for neighbour in result.neighbours:
        picture, unshown = _indexed_image(backend, neighbour.uri)
        items.append(
            _item(
                neighbour.label or neighbour.id,
                neighbour.score,
                id=neighbour.id,
                image=picture,
                query_map=neighbour.query_map,
                reference_map=neighbour.reference_map,
                note=neighbour.reference_error or unshown,
            )
        )
    return items, response.method


def _indexed_image(backend: ViewerBackend, uri: str) -> tuple[torch.Tensor | None, str | None]:
    """An indexed image as the model sees it, read from its URI here (a file this process can
    read), or ``None`` and why not."""
    from fam_core.search.sources import read_uri

    try:
        return backend.pixels((EncodedImage(read_uri(uri)),))[0], None
    except (ValueError, PipelineError) as error:
        return None, f"image not shown: {error}"


def _prototypes(
    backend: ViewerBackend, query: EncodedImage, method: str | None, top_k: int
) -> tuple[list[dict[str, Any]], str]:
    result = backend.explain(ExplainRequest(backend.model, (query,), method, top_k=top_k))
    (answer,) = result.results
    items = [
        _item(m.label, m.score, query_map=answer.heatmap if rank == 0 else None)
        for rank, m in enumerate(answer.top_k)
    ]
    return items, _method(answer.heatmap)


def _item(
    label: str,
    score: float,
    *,
    id: str | None = None,
    image: torch.Tensor | None = None,
    query_map: Heatmap | None = None,
    reference_map: Heatmap | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    return {
        "label": label,
        "score": float(score),
        "id": id,
        "image": None if image is None else image_url(image),
        "query_map": None if query_map is None else heatmap_url(query_map),
        "reference_map": None if reference_map is None else heatmap_url(reference_map),
        "note": note,
    }


def _method(heatmap: Heatmap | None) -> str:
    return "" if heatmap is None else heatmap.method


def image_url(pixels: torch.Tensor) -> str:
    """A ``[3, H, W]`` image in ``[0, 1]`` as a PNG data URL.

    Example:
        >>> image_url(torch.zeros(3, 1, 1))[:22]
        'data:image/png;base64,'
    """
    rgb = (pixels.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
    return _png_url(to_png_bytes(rgb))


def heatmap_url(heatmap: Heatmap) -> str:
    """A pipeline heatmap as its colour layer (jet, as ``fam explain`` draws it), a PNG data URL."""
    values = heatmap_from_bytes(heatmap.data, heatmap.shape)
    return _png_url(to_png_bytes(colorize(values)))


def _png_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
