"""The Open Inference Protocol (KServe v2) wire format of pipeline requests and responses.

Shared by the gRPC front door (:mod:`fam_core.server.oip`) and the KServe model server
(:mod:`fam_core.kserve`). The functions read and build ``inference.ModelInferRequest`` /
``ModelInferResponse`` messages by their fields only, so they work on the messages of any
stubs generated from the OIP ``grpc_service.proto`` (fam's own, or KServe's, which one process
cannot import together: both declare the package ``inference``).

Input: one tensor, either ``BYTES`` ``[B]`` of PNG/JPEG images (each element a 4-byte
little-endian length and its bytes in ``raw_input_contents``, or ``contents.bytes_contents``)
or ``UINT8``/``FP16``/``FP32`` ``[B, 3, H, W]`` pixels. Request parameters: ``method``,
``resolution`` (``"input"``/``"feature"``), ``target_class``. Outputs, as named tensors in
``raw_output_contents``: ``scores`` FP32 ``[B, C]``, ``label`` BYTES ``[B]``, ``embedding``
FP32 ``[B, D]``, ``heatmap`` FP16 ``[B, H, W]``; all four unless the request names some.
The heatmap's parameters: ``method``, ``target_layer``, and ``warning`` when a map is all
zeros or constant (``"image i: why"`` for each such map).

Example:
    >>> unpack_bytes(pack_bytes([b"ab", b""]))
    [b'ab', b'']
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from fam_core.pipeline.decode import check_count, check_decoded_bytes, check_tensor_shape
from fam_core.pipeline.errors import InvalidArgument, ResourceExhausted
from fam_core.pipeline.limits import Limits
from fam_core.pipeline.request import EncodedImage, ExplainRequest, ExplainResponse, RawTensor

OUTPUTS: tuple[str, ...] = ("scores", "label", "embedding", "heatmap")
_PIXEL_TYPES = {"UINT8": ("uint8", 1), "FP16": ("float16", 2), "FP32": ("float32", 4)}


def tensor_metadata(output_dim: int) -> dict[str, list[dict[str, Any]]]:
    """The ``inputs`` and ``outputs`` of a model's OIP metadata (``-1``: any size).

    Example:
        >>> [(t["name"], t["shape"]) for t in tensor_metadata(8)["outputs"]][2]
        ('embedding', [-1, 8])
    """
    return {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "embedding", "datatype": "FP32", "shape": [-1, output_dim]},
            {"name": "heatmap", "datatype": "FP16", "shape": [-1, -1, -1]},
        ],
    }


def pack_bytes(elements: list[bytes]) -> bytes:
    """BYTES tensor serialisation: each element preceded by its 4-byte little-endian length."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def unpack_bytes(data: bytes, max_elements: int | None = None) -> list[bytes]:
    """Inverse of :func:`pack_bytes`; raises :class:`InvalidArgument` on truncated data, or
    when there are more than ``max_elements`` elements (checked before each is built)."""
    elements, offset = [], 0
    while offset < len(data):
        if max_elements is not None and len(elements) >= max_elements:
            raise InvalidArgument(
                f"BYTES tensor data holds more than the {max_elements} elements its shape says"
            )
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


def _text_parameter(parameters, name: str) -> str | None:  # type: ignore[no-untyped-def]
    value = _parameter(parameters, name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"parameter {name!r} must be a string, got {value!r}")
    return value


def _target_class(parameters) -> int | None:  # type: ignore[no-untyped-def]
    """The ``target_class`` parameter: an int64 or uint64, an integral double or decimal text."""
    value = _parameter(parameters, "target_class")
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InvalidArgument(f"parameter 'target_class' must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise InvalidArgument(f"parameter 'target_class' must be an integer, got {value!r}")
    text = str(value).strip()
    if text.lstrip("+-").isdigit() and len(text) <= 20:
        return int(text)
    raise InvalidArgument(f"parameter 'target_class' must be an integer, got {text[:40]!r}")


def _images(request: Any, limits: Limits) -> tuple:
    """The images of the input tensor; its shape is checked against ``limits`` (images,
    sides, pixels, bytes) before anything is built per element."""
    if len(request.inputs) != 1:
        raise InvalidArgument(
            f"expected exactly one input tensor (BYTES images or pixels), got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    if len(tensor.shape) > 4:
        raise InvalidArgument(f"input shape has {len(tensor.shape)} dimensions; expected 1 to 4")
    shape = [int(s) for s in tensor.shape]
    if not shape or any(s < 0 for s in shape):
        raise InvalidArgument(f"input shape {shape} must hold sizes >= 0")
    if len(request.raw_input_contents) > 1:
        raise InvalidArgument(
            f"raw_input_contents has {len(request.raw_input_contents)} entries, one per input"
        )
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    if tensor.datatype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InvalidArgument(f"BYTES input shape {shape} must be [B] or [B, 1]")
        check_count(shape[0], limits, f"BYTES input shape {shape}")
        if raw is not None:
            elements = unpack_bytes(raw, max_elements=shape[0])
        else:
            contents = tensor.contents.bytes_contents
            if len(contents) != shape[0]:
                raise InvalidArgument(
                    f"BYTES input has {len(contents)} elements, shape says {shape[0]}"
                )
            elements = list(contents)
        if len(elements) != shape[0]:
            raise InvalidArgument(
                f"BYTES input has {len(elements)} elements, shape says {shape[0]}"
            )
        return tuple(EncodedImage(e) for e in elements)
    if tensor.datatype not in _PIXEL_TYPES:
        raise InvalidArgument(
            f"input datatype {tensor.datatype[:20]!r} is not supported; expected BYTES, UINT8, "
            "FP16 or FP32"
        )
    dtype, size = _PIXEL_TYPES[tensor.datatype]
    if len(shape) != 4 or shape[1] != 3:
        raise InvalidArgument(f"pixel input shape {shape} must be [B, 3, H, W]")
    batch = shape[0]
    check_count(batch, limits, f"pixel input shape {shape}")
    check_tensor_shape((3, shape[2], shape[3]), limits, f"pixel input shape {shape}")
    per_image = size * 3 * shape[2] * shape[3]
    if per_image * batch > limits.max_request_bytes:
        raise ResourceExhausted(
            f"pixel input shape {shape} of {tensor.datatype} is {per_image * batch} bytes, more "
            f"than the limit of {limits.max_request_bytes} bytes per request"
        )
    check_decoded_bytes(4 * 3 * shape[2] * shape[3] * batch, limits, f"pixel input shape {shape}")
    if raw is None:
        if dtype == "float16":
            raise InvalidArgument("FP16 input must come in raw_input_contents")
        contents = tensor.contents
        values = contents.uint_contents if dtype == "uint8" else contents.fp32_contents
        if len(values) != 3 * shape[2] * shape[3] * batch:
            raise InvalidArgument(
                f"input contents have {len(values)} values; shape {shape} needs "
                f"{3 * shape[2] * shape[3] * batch}"
            )
        raw = np.asarray(values, dtype="<u1" if dtype == "uint8" else "<f4").tobytes()
    if batch == 0 or len(raw) != per_image * batch:
        raise InvalidArgument(
            f"input data has {len(raw)} bytes; shape {shape} of {tensor.datatype} needs "
            f"{per_image * batch}"
        )
    return tuple(
        RawTensor(raw[i * per_image : (i + 1) * per_image], dtype, (3, shape[2], shape[3]))
        for i in range(batch)
    )


def request_from_infer(request: Any, limits: Limits | None = None) -> ExplainRequest:
    """The pipeline request of a ``ModelInferRequest`` (of any OIP stubs)."""
    limits = limits or Limits()
    requested = [o.name for o in request.outputs] or list(OUTPUTS)
    unknown = sorted(set(requested) - set(OUTPUTS))
    if unknown:
        raise InvalidArgument(
            f"unknown outputs {[name[:40] for name in unknown[:8]]}; this model has {list(OUTPUTS)}"
        )
    return ExplainRequest(
        model=request.model_name,
        images=_images(request, limits),
        method=_text_parameter(request.parameters, "method"),
        resolution=_text_parameter(request.parameters, "resolution") or "input",  # type: ignore[arg-type]
        heatmap="heatmap" in requested,
        embedding="embedding" in requested,
        target_class=_target_class(request.parameters),
        request_id=request.id,
    )


def infer_response(
    response: ExplainResponse, requested: list[str], version: str, message_type: Any
) -> Any:
    results = response.results
    batch = len(results)
    message = message_type(model_name=response.model, model_version=version, id=response.request_id)
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
            warnings = [
                f"image {i}: {r.heatmap.warning}"
                for i, r in enumerate(results)
                if r.heatmap is not None and r.heatmap.warning
            ]
            if warnings:  # maps that are all zeros or constant, and why
                output.parameters["warning"].string_param = "; ".join(warnings)
            data = b"".join(r.heatmap.data for r in results if r.heatmap is not None)
        message.raw_output_contents.append(data)
    return message
