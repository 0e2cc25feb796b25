"""The Open Inference Protocol (KServe v2) ``inference.GRPCInferenceService`` over the pipeline.

``ServerReady`` and ``ModelReady`` answer ``false`` from the moment a drain begins
(:meth:`~fam_core.pipeline.Pipeline.start_drain`, the server's stop), as gRPC health turns
``NOT_SERVING``.

The wire format (input tensors, parameters, named output tensors) is
:mod:`fam_core.pipeline.oip_codec`'s, shared with the KServe model server.
"""

from __future__ import annotations

from fam_core import __version__
from fam_core.pipeline import Pipeline
from fam_core.pipeline.oip_codec import (
    OUTPUTS,
    answer_infer,
    infer_response,
    pack_bytes,
    request_from_infer,
    tensor_metadata,
    unpack_bytes,
)
from fam_core.server.calls import Calls
from fam_core.server.status import deadline_of
from fam_core.server.stubs import grpc_service_pb2 as pb
from fam_core.server.stubs import grpc_service_pb2_grpc as pb_grpc

__all__ = [
    "OUTPUTS",
    "InferenceServicer",
    "ReadinessServicer",
    "infer_response",
    "pack_bytes",
    "request_from_infer",
    "unpack_bytes",
]


class ReadinessServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``ServerLive``, ``ServerReady`` and ``ModelReady`` alone (the rest UNIMPLEMENTED), for
    the health port's own thread pool."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def ServerLive(self, request, context):  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.pipeline.ready)

    def ModelReady(self, request, context):  # noqa: N802
        return pb.ModelReadyResponse(ready=model_ready(self.pipeline, request.name))


class InferenceServicer(ReadinessServicer):
    """The Open Inference Protocol front door (tritonclient.grpc and KServe clients): the
    readiness calls of :class:`ReadinessServicer` and the rest."""

    VERSION = "1"

    def __init__(self, pipeline: Pipeline, calls: Calls) -> None:
        super().__init__(pipeline)
        self.calls = calls

    def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name="fam-core", version=__version__, extensions=[])

    def ModelMetadata(self, request, context):  # noqa: N802
        def body() -> pb.ModelMetadataResponse:
            info = self.pipeline.describe(request.name)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            tensors = tensor_metadata(info.output_dim, search=info.searchable)
            return pb.ModelMetadataResponse(
                name=info.name,
                versions=[self.VERSION],
                platform="pytorch",
                inputs=[tensor(**t) for t in tensors["inputs"]],
                outputs=[tensor(**t) for t in tensors["outputs"]],
            )

        return self.calls.run("ModelMetadata", request.name, context, body)

    def ModelInfer(self, request, context):  # noqa: N802
        def body() -> pb.ModelInferResponse:
            version = request.model_version or self.VERSION
            return answer_infer(
                self.pipeline, request, version, pb.ModelInferResponse, deadline_of(context)
            )

        return self.calls.run("ModelInfer", request.model_name, context, body)


def model_ready(pipeline: Pipeline, name: str) -> bool:
    """Whether model ``name`` loaded and the pipeline takes work (no drain has begun)."""
    return pipeline.ready and name in pipeline.registry.names()
