"""The Open Inference Protocol (KServe v2) ``inference.GRPCInferenceService`` over the pipeline.

Input: one tensor, either ``BYTES`` ``[B]`` of PNG/JPEG images (each element a 4-byte
little-endian length and its bytes in ``raw_input_contents``, or ``contents.bytes_contents``)
or ``UINT8``/``FP16``/``FP32`` ``[B, 3, H, W]`` pixels. Request parameters: ``method``,
``resolution`` (``"input"``/``"feature"``), ``target_class``. Outputs, as named tensors in
``raw_output_contents``: ``scores`` FP32 ``[B, C]``, ``label`` BYTES ``[B]``, ``embedding``
FP32 ``[B, D]``, ``heatmap`` FP16 ``[B, H, W]``; all four unless the request names some.
"""

from __future__ import annotations

import struct

import numpy as np

from fam_core import __version__
from fam_core.pipeline import ExplainRequest, InvalidArgument, Pipeline
from fam_core.pipeline.request import EncodedImage, ExplainResponse, RawTensor
from fam_core.server.calls import Calls
from fam_core.server.status import deadline_of
from fam_core.server.stubs import grpc_service_pb2 as pb
from fam_core.server.stubs import grpc_service_pb2_grpc as pb_grpc

OUTPUTS: tuple[str, ...] = ("scores", "label", "embedding", "heatmap")
_PIXEL_TYPES = {"UINT8": ("uint8", 1), "FP16": ("float16", 2), "FP32": ("float32", 4)}


def pack_bytes(elements: list[bytes]) -> bytes:
    """BYTES tensor serialisation: each element preceded by its 4-byte little-endian length."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def unpack_bytes(data: bytes) -> list[bytes]:
    """Inverse of :func:`pack_bytes`; raises :class:`InvalidArgument` on truncated data."""
    elements, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise InvalidArgument("BYTES tensor data is truncated inside a length prefix")
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + size > len(data):
            raise InvalidArgument("BYTES tensor data is truncated inside an element")
        elements.append(data[offset : offset + size])
        offset += size
    return elements


def _parameter(parameters, name: str):  # type: ignore[no-untyped-def]
    if name not in parameters:
        return None
    value = parameters[name]
    return getattr(value, value.WhichOneof("parameter_choice") or "string_param")


def _images(request: pb.ModelInferRequest) -> tuple:
    if len(request.inputs) != 1:
        raise InvalidArgument(
            f"expected exactly one input tensor (BYTES images or pixels), got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    shape = [int(s) for s in tensor.shape]
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    if tensor.datatype == "BYTES":
        elements = unpack_bytes(raw) if raw is not None else list(tensor.contents.bytes_contents)
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InvalidArgument(f"BYTES input shape {shape} must be [B] or [B, 1]")
        if len(elements) != shape[0]:
            raise InvalidArgument(
                f"BYTES input has {len(elements)} elements, shape says {shape[0]}"
            )
        return tuple(EncodedImage(e) for e in elements)
    if tensor.datatype not in _PIXEL_TYPES:
        raise InvalidArgument(
            f"input datatype {tensor.datatype!r} is not supported; expected BYTES, UINT8, FP16 or FP32"
        )
    dtype, size = _PIXEL_TYPES[tensor.datatype]
    if len(shape) != 4 or shape[1] != 3:
        raise InvalidArgument(f"pixel input shape {shape} must be [B, 3, H, W]")
    if raw is None:
        contents = tensor.contents
        values = contents.uint_contents if dtype == "uint8" else contents.fp32_contents
        if dtype == "float16":
            raise InvalidArgument("FP16 input must come in raw_input_contents")
        raw = np.asarray(values, dtype="<u1" if dtype == "uint8" else "<f4").tobytes()
    per_image = size * 3 * max(shape[2], 0) * max(shape[3], 0)
    if shape[0] < 0 or len(raw) != per_image * shape[0]:
        raise InvalidArgument(
            f"input data has {len(raw)} bytes; shape {shape} of {tensor.datatype} needs "
            f"{per_image * max(shape[0], 0)}"
        )
    return tuple(
        RawTensor(raw[i * per_image : (i + 1) * per_image], dtype, (3, shape[2], shape[3]))
        for i in range(shape[0])
    )


def request_from_infer(request: pb.ModelInferRequest) -> ExplainRequest:
    """The pipeline request of a ``ModelInferRequest``."""
    requested = [o.name for o in request.outputs] or list(OUTPUTS)
    unknown = sorted(set(requested) - set(OUTPUTS))
    if unknown:
        raise InvalidArgument(f"unknown outputs {unknown}; this model has {list(OUTPUTS)}")
    target = _parameter(request.parameters, "target_class")
    return ExplainRequest(
        model=request.model_name,
        images=_images(request),
        method=_parameter(request.parameters, "method") or None,
        resolution=_parameter(request.parameters, "resolution") or "input",
        heatmap="heatmap" in requested,
        embedding="embedding" in requested,
        target_class=None if target is None else int(target),
        request_id=request.id,
    )


def infer_response(
    response: ExplainResponse, requested: list[str], version: str
) -> pb.ModelInferResponse:
    results = response.results
    batch = len(results)
    message = pb.ModelInferResponse(
        model_name=response.model, model_version=version, id=response.request_id
    )
    for name in requested:
        output = message.outputs.add(name=name)
        if name == "scores":
            width = len(results[0].scores)
            output.datatype, output.shape[:] = "FP32", [batch, width]
            data = np.asarray([r.scores for r in results], dtype="<f4").tobytes()
        elif name == "label":
            output.datatype, output.shape[:] = "BYTES", [batch]
            data = pack_bytes([r.prediction.label.encode() for r in results])
        elif name == "embedding":
            output.datatype, output.shape[:] = "FP32", [batch, results[0].embedding_dim]
            data = b"".join(r.embedding or b"" for r in results)
        else:
            heatmap = results[0].heatmap
            assert heatmap is not None
            output.datatype, output.shape[:] = "FP16", [batch, *heatmap.shape]
            output.parameters["method"].string_param = heatmap.method
            output.parameters["target_layer"].string_param = heatmap.target_layer
            data = b"".join(r.heatmap.data for r in results if r.heatmap is not None)
        message.raw_output_contents.append(data)
    return message


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol front door (tritonclient.grpc and KServe clients)."""

    VERSION = "1"

    def __init__(self, pipeline: Pipeline, calls: Calls) -> None:
        self.pipeline = pipeline
        self.calls = calls

    def ServerLive(self, request, context):  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=len(self.pipeline.registry) > 0)

    def ModelReady(self, request, context):  # noqa: N802
        return pb.ModelReadyResponse(ready=request.name in self.pipeline.registry.names())

    def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name="fam-core", version=__version__, extensions=[])

    def ModelMetadata(self, request, context):  # noqa: N802
        def body() -> pb.ModelMetadataResponse:
            info = self.pipeline.describe(request.name)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=info.name,
                versions=[self.VERSION],
                platform="pytorch",
                inputs=[tensor(name="image", datatype="BYTES", shape=[-1])],
                outputs=[
                    tensor(name="scores", datatype="FP32", shape=[-1, -1]),
                    tensor(name="label", datatype="BYTES", shape=[-1]),
                    tensor(name="embedding", datatype="FP32", shape=[-1, info.output_dim]),
                    tensor(name="heatmap", datatype="FP16", shape=[-1, -1, -1]),
                ],
            )

        return self.calls.run("ModelMetadata", request.name, context, body)

    def ModelInfer(self, request, context):  # noqa: N802
        def body() -> pb.ModelInferResponse:
            explain = request_from_infer(request)
            response = self.pipeline.explain(explain, deadline=deadline_of(context))
            requested = [o.name for o in request.outputs] or list(OUTPUTS)
            return infer_response(response, requested, request.model_version or self.VERSION)

        return self.calls.run("ModelInfer", request.model_name, context, body)
