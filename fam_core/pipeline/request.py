"""Requests and responses of the pipeline: plain dataclasses, independent of any transport.

Example:
    >>> request = ExplainRequest(model="default-classifier", images=(EncodedImage(b"..."),))
    >>> request.resolution, request.top_k
    ('input', 5)
    >>> SearchRequest(model="gallery-model", images=(EncodedImage(b"..."),)).explain is None
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fam_core.explanation import RESOLUTIONS, Resolution  # noqa: F401 - the codecs' import

EXPLAIN_MODES: tuple[str, ...] = ("none", "query", "both")
"""What a search explains: nothing, each query's map per neighbour, or also each neighbour's."""
TENSOR_DTYPES: dict[str, int] = {"uint8": 1, "float16": 2, "float32": 4}
"""Accepted raw tensor dtypes and their item sizes (little-endian)."""


@dataclass(frozen=True)
class EncodedImage:
    """PNG or JPEG bytes."""

    data: bytes


@dataclass(frozen=True)
class RawTensor:
    """A little-endian row-major tensor: ``[3, H, W]`` image (uint8 0..255, floats 0..1)."""

    data: bytes
    dtype: str
    shape: tuple[int, ...]


ImageInput = EncodedImage | RawTensor


@dataclass(frozen=True)
class ExplainRequest:
    """One request: a batch of images for one model.

    Attributes:
        model: a served model's name.
        images: at least one image.
        method: an explainer name; ``None`` is the model's default.
        resolution: heatmap at the model's ``"input"`` size or at the ``"feature"`` map's.
        heatmap: ``False`` predicts only.
        embedding: return the model's output vector.
        overlay: return a PNG of the heatmap over the preprocessed image.
        top_k: embedding models: how many matches to return.
        target_class: classifiers: explain this class instead of the predicted one.
        references: embedding models: explain the mean similarity to these images.
        request_id: echoed back.
    """

    model: str
    images: tuple[ImageInput, ...]
    method: str | None = None
    resolution: Resolution = "input"
    heatmap: bool = True
    embedding: bool = False
    overlay: bool = False
    top_k: int = 5
    target_class: int | None = None
    references: tuple[ImageInput, ...] = ()
    request_id: str = ""


@dataclass(frozen=True)
class Match:
    """A class, prototype or reference with its score."""

    label: str
    index: int
    score: float


@dataclass(frozen=True)
class Heatmap:
    """A heatmap in ``[0, 1]`` as float16 little-endian bytes of ``shape`` ``[H, W]``.

    ``warning``: why the map is not an explanation (``""``: it is); set when the map is all
    zeros or constant, so it carries no spatial information.
    """

    data: bytes
    shape: tuple[int, int]
    method: str
    target_layer: str
    resolution: Resolution
    dtype: str = "float16"
    warning: str = ""


@dataclass(frozen=True)
class ExplainResult:
    """What the pipeline returns for one image.

    ``scores``: classifiers: the softmax probabilities of every class; embedding models: the
    cosine similarity to each prototype (or each reference image).
    """

    prediction: Match
    scores: tuple[float, ...]
    top_k: tuple[Match, ...] = ()
    heatmap: Heatmap | None = None
    explained_score: float = 0.0
    embedding: bytes | None = None  # float32 little-endian [D]
    embedding_dim: int = 0
    overlay_png: bytes | None = None


@dataclass(frozen=True)
class ExplainResponse:
    model: str
    results: tuple[ExplainResult, ...]
    request_id: str = ""


@dataclass(frozen=True)
class SearchRequest:
    """A search of a model's gallery index: the nearest gallery images of each image.

    Attributes:
        model: a served model with an ``index``.
        images: the queries, at least one.
        top_k: neighbours per query; ``None``: the model config's ``top_k``.
        method: the explainer of the maps; ``None``: the model's default.
        explain: one of :data:`EXPLAIN_MODES`; ``None``: the model config's ``explain``.
        filter: a boolean expression over the index's fields (``label == "rose"``); ``None``:
            the whole gallery.
        search_params: the index's search parameters for this request, replacing the model
            config's ``index_search``: ``{"ef": 128}`` for an ``HNSW`` index, ``{"nprobe":
            64}`` for ``IVF_FLAT`` (recall for latency); ``None``: the config's.
        request_id: echoed back.
    """

    model: str
    images: tuple[ImageInput, ...]
    top_k: int | None = None
    method: str | None = None
    explain: str | None = None
    filter: str | None = None
    search_params: Mapping[str, int] | None = None
    request_id: str = ""


@dataclass(frozen=True)
class NeighbourResult:
    """One gallery image found for a query, with the heatmaps of the match.

    ``query_map``: the query's heatmap with this neighbour as the target (``None`` with
    explain ``"none"``); ``reference_map``: the neighbour's heatmap with the query as the
    target (explain ``"both"`` only; ``None`` with ``reference_error`` saying why when its
    image could not be loaded).
    """

    id: str
    uri: str
    label: str | None
    score: float
    query_map: Heatmap | None = None
    reference_map: Heatmap | None = None
    reference_error: str | None = None


@dataclass(frozen=True)
class SearchResult:
    """The neighbours of one query, most similar first."""

    neighbours: tuple[NeighbourResult, ...]


@dataclass(frozen=True)
class SearchResponse:
    """One result per query image, in order; ``explain`` and ``method`` as applied."""

    model: str
    results: tuple[SearchResult, ...]
    explain: str
    method: str
    request_id: str = ""


@dataclass(frozen=True)
class ModelDescription:
    """What ``ModelInfo`` reports about a served model."""

    name: str
    task: str
    backbone: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    methods: tuple[str, ...]
    default_method: str
    target_layer: str
    feature_shape: tuple[int, int]
    output_dim: int
    class_names: tuple[str, ...]
    num_prototypes: int
    input_formats: tuple[str, ...] = field(
        default=("png", "jpeg", "tensor:uint8", "tensor:float16", "tensor:float32")
    )
    input_shape: tuple[int, int] = (0, 0)  # (H, W); input_size is H when they differ
    resize: str = "crop"
    index: str = ""  # the gallery index searched, or voted over by a knn model ("": none)
    top_k: int = 0  # search: neighbours per query when a request names none
    explain: str = ""  # search: the explain mode when a request names none
    index_type: str = ""  # search: "FLAT", "IVF_FLAT" or "HNSW" ("": no index)
    # search: the index's search parameters when a request names none
    search_params: tuple[tuple[str, int], ...] = ()

    @property
    def searchable(self) -> bool:
        """Whether the model answers searches: it has an index."""
        return bool(self.index)
