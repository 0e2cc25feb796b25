"""Explained search: each query's top-k gallery neighbours, with a heatmap on either side.

For a query ``X`` with embedding ``Z' = f(X)`` and neighbours ``R_1 .. R_k`` (their stored
embeddings), the query's map for neighbour ``j`` is the method's map of ``X`` with target
``R_j``. For FAM (eq. 11-18 with one reference) the map needs no forward pass on the
neighbour: the k maps come from the query's ONE forward pass, its channel contributions
weighted k ways (:func:`explain_each_target`). Every channel method that works on one forward
pass (FAM, Grad-FAM with its closed-form gradient, Score-FAM, CAM, Eigen-CAM, ...) shares it;
methods that need the autograd graph or a pass of their own (Grad-CAM through autograd,
L2-CAF, guided backpropagation, ...) run one batched call over the (query, neighbour) pairs.

``explain="both"`` adds each neighbour's map with the query's embedding as the target (its
image read from its URI; one forward pass per distinct neighbour image, shared by the queries
it answers); a neighbour whose image cannot be read keeps its score and gets
``reference_error`` instead of a map.

Example:
    >>> import tempfile
    >>> from fam_core.data.flowers import make_flowers
    >>> from fam_core.pipeline import ServedModel
    >>> from fam_core.search.index import IndexRow, model_card, open_index
    >>> model = ServedModel.load("default-embedding")
    >>> flowers = make_flowers([9, 12], per_class=2)
    >>> inputs = model.config.normalize(flowers.images)
    >>> index = open_index(tempfile.mkdtemp() + "/g.db")
    >>> index.create(model_card(model))
    >>> embeddings = embed(model, inputs)
    >>> index.upsert([IndexRow(str(i), "", None, e) for i, e in enumerate(embeddings)])
    4
    >>> found = explained_search(model, index, inputs[:1], top_k=3)
    >>> [round(n.neighbour.score, 4) for n in found[0]][0], found[0][0].query_map.shape
    (1.0, torch.Size([84, 84]))
    >>> index.close()
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch

from fam_core.explainers.base import ChannelExplainer, Explainer, ForwardPass
from fam_core.explainers.targets import ResolvedTarget
from fam_core.messages import first_line
from fam_core.search.index import GalleryIndex, model_card
from fam_core.search.records import IndexCard, Neighbour

__all__ = [
    "EXPLAIN_MODES",
    "ExplainMode",
    "ExplainedNeighbour",
    "Neighbour",
    "embed",
    "explain_each_target",
    "explained_search",
    "load_uri_image",
    "load_uri_pixels",
]

ExplainMode = Literal["none", "query", "both"]
EXPLAIN_MODES: tuple[str, ...] = ("none", "query", "both")


@dataclass(frozen=True)
class ExplainedNeighbour:
    """A neighbour with the query's map for it (``[H, W]`` in ``[0, 1]`` at the query's input
    size) and its own map for the query (at its input size); ``None`` where not asked for, or,
    for ``reference_map``, where its image could not be read (``reference_error`` says why)."""

    neighbour: Neighbour
    query_map: torch.Tensor | None = None
    reference_map: torch.Tensor | None = None
    reference_error: str | None = None


def embed(model: Any, inputs: torch.Tensor) -> torch.Tensor:
    """The embeddings ``[B, D]`` of preprocessed ``inputs`` as the model computes them for
    explaining (the output its explainers explain; what a gallery index stores)."""
    from fam_core.pipeline.backends import Batch
    from fam_core.pipeline.jobs import Job

    job = Job(inputs=inputs, method=model.default_method, heatmap=False)
    computed = model.backend.run(model, Batch(inputs, job, [None] * len(inputs)))
    return computed.outputs.detach().float()


def explained_search(
    model: Any,
    index: GalleryIndex,
    images: torch.Tensor,
    *,
    top_k: int = 10,
    method: str | None = None,
    explain: ExplainMode = "query",
    filter: str | None = None,
    search_params: Mapping[str, int] | None = None,
    load_image: Callable[[str], torch.Tensor] | None = None,
) -> list[list[ExplainedNeighbour]]:
    """Search ``index`` with the preprocessed ``images`` ``[B, C, H, W]`` of ``model`` (a
    :class:`~fam_core.pipeline.ServedModel` of an embedding model) and explain the results.

    Args:
        top_k: neighbours per query.
        method: the explainer (any registered method that needs no fitting; default: the
            model's default method, :func:`fam_core.explainers.default_method.choose_method`).
        explain: ``"none"``, ``"query"`` (the query's map for each neighbour) or ``"both"``
            (also each neighbour's map for the query).
        filter: a condition on the rows (:meth:`GalleryIndex.search`).
        search_params: the index's search parameters for these queries (``{"ef": 128}``,
            ``{"nprobe": 64}``; :meth:`GalleryIndex.search`); ``None``: the index's own.
        load_image: the model inputs ``[C, H, W]`` of a neighbour's URI (default:
            :func:`load_uri_image` with the model's preprocessing); it raises ``ValueError``
            (or ``OSError``) for an image it cannot read.

    Raises ``ValueError`` when ``index`` was built by another model, and for bad arguments.
    """
    if explain not in EXPLAIN_MODES:
        raise ValueError(f"explain must be one of {list(EXPLAIN_MODES)}, got {explain!r}")
    if model.task not in ("embedding", "knn"):
        raise ValueError(
            f"explained search needs an embedding model; {model.name!r} is a {model.task}"
        )
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError("images must be a non-empty tensor [B, C, H, W] of model inputs")
    _check_index(model, index)
    method = method or model.default_method
    if explain == "none":
        found = index.search(embed(model, images), top_k, filter, search_params)
        return [[ExplainedNeighbour(n) for n in hits] for hits in found]
    forward: ForwardPass | None = None
    maps_of: Callable[..., torch.Tensor]
    if model.model is None:  # an ONNX graph: the pairs through the graph of the method
        _check_method(model, method)
        embeddings = embed(model, images)
        maps_of = partial(_backend_maps, model, method)
    else:
        explainer = _explainer(model, method)
        images = images.to(_device(explainer))
        forward = explainer.forward(images) if _one_pass(explainer) else None
        embeddings = embed(model, images) if forward is None else forward.outputs.detach().float()
        maps_of = partial(explain_each_target, explainer)

    found = index.search(embeddings, top_k, filter, search_params)
    pairs = [(q, n) for q, hits in enumerate(found) for n in hits]
    query_maps: list[torch.Tensor] = []
    if pairs:
        rows = torch.tensor([query for query, _ in pairs])
        targets = torch.stack([neighbour.embedding for _, neighbour in pairs])
        query_maps = list(maps_of(images, targets, rows=rows, forward=forward).detach().float())
    reference_maps: dict[int, torch.Tensor] = {}
    errors: dict[int, str] = {}
    if explain == "both" and pairs:
        loader = load_image or (lambda uri: load_uri_image(model, uri))
        reference_maps, errors = _reference_maps(maps_of, embeddings, pairs, loader)
    answers: list[list[ExplainedNeighbour]] = [[] for _ in found]
    for number, (query, neighbour) in enumerate(pairs):
        answers[query].append(
            ExplainedNeighbour(
                neighbour,
                query_map=query_maps[number],
                reference_map=reference_maps.get(number),
                reference_error=errors.get(number),
            )
        )
    return answers


# The check of a served model against an index, kept per (model, index): the index card it
# passed against. A request compares the card the index holds now with that one (a cheap
# version stamp: the engine keeps its card in memory, MilvusEngine reads its card collection
# once, and a drop and create through the index replace it) and computes the model's card (the
# SHA-256 of its weights or of its graph file) and checks it again only when they differ, so an
# index rebuilt while serving by another model is still refused.
_CHECKED: weakref.WeakKeyDictionary[GalleryIndex, dict[int, tuple[weakref.ref[Any], IndexCard]]] = (
    weakref.WeakKeyDictionary()
)


def _check_index(model: Any, index: GalleryIndex) -> None:
    """``ValueError`` (:meth:`GalleryIndex.check_model`) unless ``index`` was built by
    ``model``; checked once per (model, index card)."""
    built = index.card
    checked = _CHECKED.setdefault(index, {})
    entry = checked.get(id(model))
    if entry is not None and entry[0]() is model and entry[1] == built:
        return
    index.check_model(model_card(model))
    with contextlib.suppress(TypeError):  # a model no weak reference takes: checked each time
        checked[id(model)] = (weakref.ref(model), built)


def explain_each_target(
    explainer: Explainer,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    forward: ForwardPass | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The map ``[P, H, W]`` of ``images[rows[p]]`` for the single reference ``targets[p]``
    ``[P, D]`` (``rows`` default: ``arange(P)``, one target per image).

    A channel explainer that works on one forward pass explains every pair from the images'
    one forward pass (``forward``, or run here): the pass is repeated row-wise, never re-run,
    and each row weighted for its own target. Other methods run once on the repeated images.

    Example:
        >>> from fam_core.explainers import FAM
        >>> from fam_core.models.backbones import conv4
        >>> explainer = FAM(conv4().eval(), "block4")
        >>> images, refs = torch.rand(1, 3, 84, 84), torch.rand(2, 64)
        >>> maps = explain_each_target(explainer, images, refs, rows=torch.tensor([0, 0]))
        >>> torch.allclose(maps[1], explainer(images, target=refs[1:2]).maps[0], atol=1e-6)
        True
    """
    if rows is None:
        rows = torch.arange(targets.shape[0])
    rows = rows.to(torch.long)
    if targets.dim() != 2 or rows.shape != (targets.shape[0],):
        raise ValueError("targets must be [P, D] with one row index per target")
    if _one_pass(explainer):
        assert isinstance(explainer, ChannelExplainer)
        images = explainer._check_images(images)
        if forward is None:
            forward = explainer.forward(images)
        index = rows.to(forward.outputs.device)
        repeated = ForwardPass(
            forward.outputs.index_select(0, index),
            forward.activations.index_select(0, index),
            forward.layout,
        )
        references = targets.to(forward.outputs).unsqueeze(1)
        resolved = ResolvedTarget(references, explainer.similarity)
        pair_images = images.index_select(0, index.to(images.device))
        return explainer.explain_resolved(repeated, resolved, pair_images).maps
    pair_images = images.index_select(0, rows.to(images.device))
    return explainer(pair_images, target=targets.to(pair_images.device).unsqueeze(1)).maps


def load_uri_image(model: Any, uri: str) -> torch.Tensor:
    """The model inputs ``[C, H, W]`` of the image at ``uri`` (a file path, ``file://`` or
    ``parquet://`` URI), decoded and preprocessed as the request pipeline does; ``ValueError``
    naming the reason when it cannot be read."""
    return model.config.normalize(load_uri_pixels(model, uri)[None])[0]


def load_uri_pixels(model: Any, uri: str) -> torch.Tensor:
    """The image at ``uri`` as the model sees it before normalisation: decoded as the request
    pipeline decodes and fitted to the model's input, ``[3, H, W]`` in ``[0, 1]``."""
    from fam_core.pipeline.decode import decode_input
    from fam_core.pipeline.errors import PipelineError
    from fam_core.pipeline.limits import Limits
    from fam_core.pipeline.preprocess import preprocess
    from fam_core.pipeline.request import EncodedImage
    from fam_core.search.sources import read_uri

    data = read_uri(uri)
    try:
        decoded = decode_input(EncodedImage(data), Limits(), size=model.config.image_size)
    except PipelineError as error:
        raise ValueError(f"{uri}: {str(error).removeprefix('image 0: ')}") from None
    return preprocess([decoded], model.config)[0][0]


# -- helpers
def _explainer(model: Any, method: str) -> Explainer:
    _check_method(model, method)
    return model.explainer(method)


def _check_method(model: Any, method: str) -> None:
    from fam_core.pipeline.errors import PipelineError

    try:
        model.check_method(method)
    except PipelineError as error:
        raise ValueError(f"method {method!r} on model {model.name!r}: {error}") from None


def _device(explainer: Explainer) -> torch.device:
    parameter = next(explainer.model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _one_pass(explainer: Explainer) -> bool:
    """Whether the explainer's maps come from one forward pass without an autograd graph
    (then a repeated pass explains many targets)."""
    return (
        isinstance(explainer, ChannelExplainer)
        and type(explainer).__call__ is ChannelExplainer.__call__
        and type(explainer).explain_forward is ChannelExplainer.explain_forward
        and not explainer.needs_gradients
        and not explainer._head_needs_graph()
    )


def _reference_maps(
    maps_of: Callable[..., torch.Tensor],
    embeddings: torch.Tensor,
    pairs: list[tuple[int, Neighbour]],
    loader: Callable[[str], torch.Tensor],
) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """Each neighbour's map with its query's embedding as the target: each distinct
    neighbour image is loaded and run once, whatever the number of queries it answers."""
    loaded: dict[str, torch.Tensor | str] = {}
    for _, neighbour in pairs:
        if neighbour.id not in loaded:
            try:
                loaded[neighbour.id] = loader(neighbour.uri)
            except (ValueError, OSError) as error:
                loaded[neighbour.id] = first_line(error)
    numbers = [n for n, (_, nb) in enumerate(pairs) if isinstance(loaded[nb.id], torch.Tensor)]
    errors = {
        n: str(loaded[nb.id]) for n, (_, nb) in enumerate(pairs) if isinstance(loaded[nb.id], str)
    }
    if not numbers:
        return {}, errors
    distinct = list(dict.fromkeys(pairs[n][1].id for n in numbers))
    position = {image_id: row for row, image_id in enumerate(distinct)}
    images = torch.stack([loaded[image_id] for image_id in distinct])  # type: ignore[misc]
    images = images.to(embeddings.device)
    rows = torch.tensor([position[pairs[n][1].id] for n in numbers])
    targets = embeddings.index_select(
        0, torch.tensor([pairs[n][0] for n in numbers], device=embeddings.device)
    )
    maps = maps_of(images, targets, rows=rows)
    return dict(zip(numbers, maps.detach().float(), strict=True)), errors


def _backend_maps(
    model: Any,
    method: str,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    forward: None = None,
) -> torch.Tensor:
    """Maps ``[P, H, W]`` from the model's backend (an ONNX graph of ``method``): one run of
    the (image, single reference) pairs, the references as the request pipeline sends them."""
    from fam_core.pipeline.backends import Batch
    from fam_core.pipeline.encode import heatmap_at
    from fam_core.pipeline.errors import PipelineError
    from fam_core.pipeline.jobs import Job

    if rows is not None:
        images = images.index_select(0, rows.to(images.device))
    job = Job(inputs=images, method=method, heatmap=True)
    try:
        batch = Batch(images, job, [None] * len(images), targets[:, None])
        computed = model.backend.run(model, batch)
    except PipelineError as error:
        raise ValueError(f"method {method!r} on model {model.name!r}: {error}") from None
    size = model.config.image_size
    return torch.stack([heatmap_at(computed, i, "input", size) for i in range(len(images))])
