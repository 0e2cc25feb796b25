"""A ``fam.v1`` client that speaks the pipeline's own types: a running server used in place of an
in-process :class:`~fam_core.pipeline.Pipeline` (the browser viewer's ``--server``).

Requests and answers are the pipeline's dataclasses (:mod:`fam_core.pipeline.request`); a
refused call raises the :mod:`~fam_core.pipeline.errors` class of its gRPC status, so callers
handle a local and a remote pipeline alike.

Example:
    >>> from fam_core.pipeline import ModelRegistry
    >>> from fam_core.server.app import FamServer, ServerConfig
    >>> server = FamServer(ModelRegistry.from_names(["default-classifier"]), ServerConfig(port=0))
    >>> port = server.start()
    >>> with FamClient(f"127.0.0.1:{port}") as client:
    ...     client.describe("default-classifier").task
    'classifier'
    >>> server.stop(grace=1.0)
"""

from __future__ import annotations

from types import TracebackType

import grpc

from fam_core.pipeline.errors import BY_CODE, PipelineError, Unavailable
from fam_core.pipeline.request import (
    EncodedImage,
    ExplainRequest,
    ExplainResponse,
    ExplainResult,
    Heatmap,
    ImageInput,
    Match,
    ModelDescription,
    NeighbourResult,
    RawTensor,
    SearchRequest,
    SearchResponse,
    SearchResult,
)
from fam_core.server.stubs import fam_pb2, fam_pb2_grpc

ERRORS: dict[grpc.StatusCode, type[PipelineError]] = {
    getattr(grpc.StatusCode, code): error for code, error in BY_CODE.items()
}
"""The pipeline error a gRPC status is raised as (any other status: :class:`Unavailable`)."""
DEFAULT_TIMEOUT_S = 120.0
_RESOLUTIONS = {"input": fam_pb2.RESOLUTION_INPUT, "feature": fam_pb2.RESOLUTION_FEATURE}
_RESOLUTION_NAMES = {
    fam_pb2.RESOLUTION_UNSPECIFIED: "input",
    fam_pb2.RESOLUTION_INPUT: "input",
    fam_pb2.RESOLUTION_FEATURE: "feature",
}


class FamClient:
    """``Explain``, ``Search`` and ``ModelInfo`` of the ``fam.v1`` server at ``address`` (``HOST:PORT``).

    Args:
        address: the server's ``HOST:PORT``.
        timeout_s: each call's deadline.
        token: the bearer token of a server started with one.
    """

    def __init__(
        self, address: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, token: str | None = None
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]
        self._channel = grpc.insecure_channel(address, options=options)
        self._stub = fam_pb2_grpc.FamServiceStub(self._channel)

    def explain(self, request: ExplainRequest) -> ExplainResponse:
        """One ``Explain`` call; a refusal raises its :data:`ERRORS` class."""
        answer = self._call(self._stub.Explain, request_to_proto(request))
        return ExplainResponse(
            model=answer.model,
            results=tuple(result_from_proto(r) for r in answer.results),
            request_id=answer.request_id,
        )

    def search(self, request: SearchRequest) -> SearchResponse:
        """One ``Search`` call; a refusal raises its :data:`ERRORS` class."""
        answer = self._call(self._stub.Search, search_request_to_proto(request))
        return SearchResponse(
            model=answer.model,
            results=tuple(
                SearchResult(tuple(_neighbour(n) for n in result.neighbours))
                for result in answer.results
            ),
            explain=answer.explain,
            method=answer.method,
            request_id=answer.request_id,
        )

    def describe(self, model: str) -> ModelDescription:
        """``ModelInfo`` of ``model``."""
        info = self._model_info(model)
        return ModelDescription(
            name=info.name,
            task=info.task,
            backbone=info.backbone,
            input_size=info.input_size,
            mean=tuple(info.mean),
            std=tuple(info.std),
            methods=tuple(info.methods),
            default_method=info.default_method,
            target_layer=info.target_layer,
            feature_shape=(int(info.feature_shape[0]), int(info.feature_shape[1])),
            output_dim=info.output_dim,
            class_names=tuple(info.class_names),
            num_prototypes=info.num_prototypes,
            input_formats=tuple(info.input_formats),
            input_shape=(int(info.input_shape[0]), int(info.input_shape[1])),
            resize=info.resize,
            index=info.index,
            top_k=info.top_k,
            explain=info.explain,
            index_type=info.index_type,
            search_params=tuple(sorted(info.search_params.items())),
        )

    def max_request_bytes(self, model: str) -> int:
        """The server's limit on the image bytes of one request."""
        return int(self._model_info(model).max_request_bytes)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> FamClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def _model_info(self, model: str) -> fam_pb2.ModelInfoResponse:
        return self._call(self._stub.ModelInfo, fam_pb2.ModelInfoRequest(model=model))

    def _call(self, method, message):  # type: ignore[no-untyped-def]
        try:
            return method(message, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            details = error.details() or code.name  # type: ignore[attr-defined]
            raise ERRORS.get(code, Unavailable)(f"server {self.address}: {details}") from None


def request_to_proto(request: ExplainRequest) -> fam_pb2.ExplainRequest:
    """The ``fam.v1.ExplainRequest`` of a pipeline request."""
    message = fam_pb2.ExplainRequest(
        model=request.model,
        images=[_image(i) for i in request.images],
        method=request.method or "",
        resolution=_RESOLUTIONS.get(request.resolution, fam_pb2.RESOLUTION_UNSPECIFIED),
        return_embedding=request.embedding,
        return_overlay=request.overlay,
        top_k=request.top_k,
        skip_heatmap=not request.heatmap,
        references=[_image(i) for i in request.references],
        request_id=request.request_id,
    )
    if request.target_class is not None:
        message.target_class = request.target_class
    return message


def search_request_to_proto(request: SearchRequest) -> fam_pb2.SearchRequest:
    """The ``fam.v1.SearchRequest`` of a pipeline search (``None``: the model's default)."""
    return fam_pb2.SearchRequest(
        model=request.model,
        images=[_image(i) for i in request.images],
        top_k=request.top_k or 0,
        method=request.method or "",
        explain=request.explain or "",
        filter=request.filter or "",
        search_params=dict(request.search_params or {}),
        request_id=request.request_id,
    )


def result_from_proto(message: fam_pb2.Result) -> ExplainResult:
    """The pipeline result of a ``fam.v1.Result``."""
    heatmap = _heatmap(message.heatmap) if message.HasField("heatmap") else None
    embedding = message.embedding.data if message.HasField("embedding") else None
    return ExplainResult(
        prediction=_match(message.prediction),
        scores=tuple(message.scores),
        top_k=tuple(_match(m) for m in message.top_k),
        heatmap=heatmap,
        explained_score=message.explained_score,
        embedding=embedding,
        embedding_dim=int(message.embedding.shape[0]) if embedding is not None else 0,
        overlay_png=message.overlay_png or None,
    )


def _heatmap(message: fam_pb2.Heatmap) -> Heatmap:
    return Heatmap(
        data=message.data,
        shape=(int(message.shape[0]), int(message.shape[1])),
        method=message.method,
        target_layer=message.target_layer,
        resolution=_RESOLUTION_NAMES[message.resolution],  # type: ignore[arg-type]
        dtype=message.dtype or "float16",
    )


def _neighbour(message: fam_pb2.Neighbour) -> NeighbourResult:
    return NeighbourResult(
        id=message.id,
        uri=message.uri,
        label=message.label if message.HasField("label") else None,
        score=float(message.score),
        query_map=_heatmap(message.query_map) if message.HasField("query_map") else None,
        reference_map=(
            _heatmap(message.reference_map) if message.HasField("reference_map") else None
        ),
        reference_error=message.reference_error or None,
    )


def _image(image: ImageInput) -> fam_pb2.Image:
    if isinstance(image, EncodedImage):
        return fam_pb2.Image(encoded=image.data)
    if isinstance(image, RawTensor):
        tensor = fam_pb2.Tensor(dtype=image.dtype, shape=image.shape, data=image.data)
        return fam_pb2.Image(tensor=tensor)
    raise TypeError(f"expected an EncodedImage or a RawTensor, got {type(image).__name__}")


def _match(message: fam_pb2.Match) -> Match:
    return Match(message.label, int(message.index), float(message.score))
