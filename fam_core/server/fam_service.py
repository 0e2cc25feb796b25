"""``fam.v1.FamService`` over the pipeline: wire messages to pipeline requests and back.

Example:
    >>> message = fam_pb2.SearchRequest(model="m", images=[fam_pb2.Image(encoded=b"...")])
    >>> request = search_request_from_proto(message)
    >>> request.top_k, request.explain, request.filter
    (None, None, None)
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from fam_core.pipeline import (
    EncodedImage,
    ExplainRequest,
    ExplainResponse,
    InvalidArgument,
    Pipeline,
    PipelineError,
    RawTensor,
)
from fam_core.pipeline.decode import check_count
from fam_core.pipeline.limits import Limits
from fam_core.pipeline.request import (
    ExplainResult,
    Heatmap,
    ImageInput,
    NeighbourResult,
    SearchRequest,
    SearchResponse,
)
from fam_core.server.calls import Calls
from fam_core.server.status import deadline_of
from fam_core.server.stubs import fam_pb2, fam_pb2_grpc

DEFAULT_TOP_K = 5
_RESOLUTIONS = {
    fam_pb2.RESOLUTION_UNSPECIFIED: "input",
    fam_pb2.RESOLUTION_INPUT: "input",
    fam_pb2.RESOLUTION_FEATURE: "feature",
}
_RESOLUTION_ENUMS = {"input": fam_pb2.RESOLUTION_INPUT, "feature": fam_pb2.RESOLUTION_FEATURE}


def image_from_proto(image: fam_pb2.Image, index: int) -> ImageInput:
    kind = image.WhichOneof("source")
    if kind == "encoded":
        return EncodedImage(image.encoded)
    if kind == "tensor":
        return RawTensor(image.tensor.data, image.tensor.dtype, tuple(image.tensor.shape))
    raise InvalidArgument(f"image {index} has neither encoded bytes nor a tensor")


def request_from_proto(
    message: fam_pb2.ExplainRequest, limits: Limits | None = None
) -> ExplainRequest:
    """The pipeline request of a ``fam.v1.ExplainRequest``; the image count is checked
    against ``limits`` before anything is built per image."""
    if limits is not None:
        check_count(len(message.images) + len(message.references), limits)
    if message.resolution not in _RESOLUTIONS:
        raise InvalidArgument(f"unknown resolution {message.resolution}")
    return ExplainRequest(
        model=message.model,
        images=tuple(image_from_proto(image, i) for i, image in enumerate(message.images)),
        method=message.method or None,
        resolution=_RESOLUTIONS[message.resolution],  # type: ignore[arg-type]
        heatmap=not message.skip_heatmap,
        embedding=message.return_embedding,
        overlay=message.return_overlay,
        top_k=message.top_k or DEFAULT_TOP_K,
        target_class=message.target_class if message.HasField("target_class") else None,
        references=tuple(image_from_proto(image, i) for i, image in enumerate(message.references)),
        request_id=message.request_id,
    )


def _match(match) -> fam_pb2.Match:  # type: ignore[no-untyped-def]
    return fam_pb2.Match(label=match.label, index=match.index, score=match.score)


def result_to_proto(result: ExplainResult) -> fam_pb2.Result:
    message = fam_pb2.Result(
        prediction=_match(result.prediction),
        scores=result.scores,
        top_k=[_match(m) for m in result.top_k],
        explained_score=result.explained_score,
    )
    if result.heatmap is not None:
        message.heatmap.CopyFrom(heatmap_to_proto(result.heatmap))
    if result.embedding is not None:
        message.embedding.CopyFrom(
            fam_pb2.Tensor(dtype="float32", shape=[result.embedding_dim], data=result.embedding)
        )
    if result.overlay_png is not None:
        message.overlay_png = result.overlay_png
    return message


def response_to_proto(response: ExplainResponse) -> fam_pb2.ExplainResponse:
    return fam_pb2.ExplainResponse(
        model=response.model,
        results=[result_to_proto(r) for r in response.results],
        request_id=response.request_id,
    )


def heatmap_to_proto(heatmap: Heatmap) -> fam_pb2.Heatmap:
    """A pipeline heatmap as a ``fam.v1.Heatmap``."""
    return fam_pb2.Heatmap(
        data=heatmap.data,
        shape=heatmap.shape,
        dtype=heatmap.dtype,
        method=heatmap.method,
        target_layer=heatmap.target_layer,
        resolution=_RESOLUTION_ENUMS[heatmap.resolution],
        warning=heatmap.warning,
    )


def search_request_from_proto(
    message: fam_pb2.SearchRequest, limits: Limits | None = None
) -> SearchRequest:
    """The pipeline request of a ``fam.v1.SearchRequest``; zero or empty fields are the
    model's defaults. The image count is checked against ``limits`` before anything is built
    per image."""
    if limits is not None:
        check_count(len(message.images), limits)
    return SearchRequest(
        model=message.model,
        images=tuple(image_from_proto(image, i) for i, image in enumerate(message.images)),
        top_k=message.top_k or None,
        method=message.method or None,
        explain=message.explain or None,
        filter=message.filter or None,
        search_params=dict(message.search_params) or None,
        request_id=message.request_id,
    )


def _neighbour_to_proto(neighbour: NeighbourResult) -> fam_pb2.Neighbour:
    message = fam_pb2.Neighbour(id=neighbour.id, uri=neighbour.uri, score=neighbour.score)
    if neighbour.label is not None:
        message.label = neighbour.label
    if neighbour.query_map is not None:
        message.query_map.CopyFrom(heatmap_to_proto(neighbour.query_map))
    if neighbour.reference_map is not None:
        message.reference_map.CopyFrom(heatmap_to_proto(neighbour.reference_map))
    if neighbour.reference_error:
        message.reference_error = neighbour.reference_error
    return message


def search_response_to_proto(response: SearchResponse) -> fam_pb2.SearchResponse:
    """A pipeline search response as a ``fam.v1.SearchResponse``."""
    return fam_pb2.SearchResponse(
        model=response.model,
        results=[
            fam_pb2.SearchResult(neighbours=[_neighbour_to_proto(n) for n in result.neighbours])
            for result in response.results
        ],
        request_id=response.request_id,
        explain=response.explain,
        method=response.method,
    )


class FamServicer(fam_pb2_grpc.FamServiceServicer):
    """The ``fam.v1`` service: a thin translation over :class:`~fam_core.pipeline.Pipeline`."""

    def __init__(self, pipeline: Pipeline, calls: Calls) -> None:
        self.pipeline = pipeline
        self.calls = calls

    def Explain(self, request, context):  # noqa: N802 - gRPC method name
        return self.calls.run(
            "Explain",
            request.model,
            context,
            lambda: response_to_proto(
                self.pipeline.explain(
                    request_from_proto(request, self.pipeline.limits), deadline=deadline_of(context)
                )
            ),
        )

    def ExplainStream(self, request_iterator, context) -> Iterator[fam_pb2.ExplainResponse]:  # noqa: N802
        for request in request_iterator:
            try:
                yield self.calls.run(
                    "ExplainStream",
                    request.model,
                    _StreamContext(context),
                    lambda request=request: response_to_proto(
                        self.pipeline.explain(
                            request_from_proto(request, self.pipeline.limits),
                            deadline=deadline_of(context),
                        )
                    ),
                )
            except _StreamError as error:
                yield fam_pb2.ExplainResponse(
                    model=request.model,
                    request_id=request.request_id,
                    error=fam_pb2.ErrorStatus(code=error.code, message=error.message),
                )

    def Search(self, request, context):  # noqa: N802
        return self.calls.run(
            "Search",
            request.model,
            context,
            lambda: search_response_to_proto(
                self.pipeline.search(
                    search_request_from_proto(request, self.pipeline.limits),
                    deadline=deadline_of(context),
                )
            ),
        )

    def ListModels(self, request, context):  # noqa: N802
        return self.calls.run(
            "ListModels",
            "",
            context,
            lambda: fam_pb2.ListModelsResponse(
                models=[
                    fam_pb2.ModelSummary(name=served.name, task=served.task, status="ready")
                    for served in self.pipeline.registry
                ]
                + [
                    fam_pb2.ModelSummary(
                        name=failed.name, task=failed.task, status="failed", error=failed.reason
                    )
                    for failed in self.pipeline.registry.failed()
                ]
            ),
        )

    def ModelInfo(self, request, context):  # noqa: N802
        def body() -> fam_pb2.ModelInfoResponse:
            info = self.pipeline.describe(request.model)
            limits = self.pipeline.limits
            return fam_pb2.ModelInfoResponse(
                name=info.name,
                task=info.task,
                backbone=info.backbone,
                input_size=info.input_size,
                mean=info.mean,
                std=info.std,
                input_formats=info.input_formats,
                methods=info.methods,
                default_method=info.default_method,
                target_layer=info.target_layer,
                feature_shape=info.feature_shape,
                output_dim=info.output_dim,
                class_names=info.class_names,
                num_prototypes=info.num_prototypes,
                max_batch=limits.max_batch,
                max_pixels=limits.max_pixels,
                max_request_bytes=limits.max_request_bytes,
                input_shape=info.input_shape,
                resize=info.resize,
                index=info.index,
                top_k=info.top_k,
                explain=info.explain,
                max_top_k=limits.max_top_k,
                index_type=info.index_type,
                search_params=dict(info.search_params),
                max_search_ef=limits.max_search_ef,
            )

        return self.calls.run("ModelInfo", request.model, context, body)


class _StreamError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _StreamContext:
    """A stand-in context: a failed stream message becomes an error response, not an abort."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _StreamError(code.name, details)

    def __getattr__(self, name: str) -> object:
        return getattr(self._context, name)


__all__ = [
    "FamServicer",
    "PipelineError",
    "request_from_proto",
    "response_to_proto",
    "search_request_from_proto",
    "search_response_to_proto",
]
