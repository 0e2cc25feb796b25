"""The request pipeline shared by every front door (gRPC, Open Inference Protocol, TorchServe).

decode (:mod:`.decode`) -> preprocess (:mod:`.preprocess`) -> run and explain
(:mod:`.engine`, micro-batched by :mod:`.batching`) -> encode (:mod:`.encode`), driven by
:class:`Pipeline` over the models of a :class:`ModelRegistry`. Errors are typed
(:mod:`.errors`) so each front door maps them to its own status.

Example:
    >>> from fam_core.pipeline import ExplainRequest, EncodedImage, ModelRegistry, Pipeline
    >>> pipeline = Pipeline(ModelRegistry.from_names(["default-classifier"]))  # doctest: +SKIP
"""

from fam_core.pipeline.batching import BatchingConfig, MicroBatcher
from fam_core.pipeline.encode import heatmap_bytes, heatmap_from_bytes
from fam_core.pipeline.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PipelineError,
    ResourceExhausted,
    Unavailable,
)
from fam_core.pipeline.explained_search import (
    EXPLAIN_MODES,
    ExplainedNeighbour,
    embed,
    explain_each_target,
    explained_search,
    load_uri_image,
    load_uri_pixels,
)
from fam_core.pipeline.limits import Limits
from fam_core.pipeline.models import (
    DEFAULT_MODELS,
    FailedModel,
    MethodChoice,
    ModelRegistry,
    ServedModel,
    choose_method,
)
from fam_core.pipeline.request import (
    EncodedImage,
    ExplainRequest,
    ExplainResponse,
    ExplainResult,
    Heatmap,
    Match,
    ModelDescription,
    NeighbourResult,
    RawTensor,
    SearchRequest,
    SearchResponse,
    SearchResult,
)
from fam_core.pipeline.service import Pipeline

__all__ = [
    "DEFAULT_MODELS",
    "EXPLAIN_MODES",
    "ExplainedNeighbour",
    "embed",
    "explain_each_target",
    "explained_search",
    "load_uri_image",
    "load_uri_pixels",
    "BatchingConfig",
    "DeadlineExceeded",
    "EncodedImage",
    "ExplainRequest",
    "ExplainResponse",
    "ExplainResult",
    "FailedModel",
    "Heatmap",
    "InvalidArgument",
    "Limits",
    "Match",
    "MethodChoice",
    "MicroBatcher",
    "ModelDescription",
    "ModelRegistry",
    "NeighbourResult",
    "NotFound",
    "Pipeline",
    "PipelineError",
    "RawTensor",
    "ResourceExhausted",
    "SearchRequest",
    "SearchResponse",
    "SearchResult",
    "ServedModel",
    "Unavailable",
    "choose_method",
    "heatmap_bytes",
    "heatmap_from_bytes",
]
