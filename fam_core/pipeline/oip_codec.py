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

A model with a gallery index answers a search (:meth:`~fam_core.pipeline.Pipeline.search`)
when the request names only :data:`SEARCH_OUTPUTS`, or none and it is an embedding model
(a ``knn`` model classifies then); per query image ``[k]``
neighbours, stacked over the batch like every output: ``neighbour_ids`` BYTES ``[B, k]``,
``neighbour_scores`` FP32 ``[B, k]``, ``neighbour_labels`` BYTES ``[B, k]`` (empty when
unlabelled), ``heatmaps`` FP16 ``[B, k, H, W]`` (each query's map for each neighbour;
not with ``explain`` ``"none"``) and ``reference_heatmaps`` FP16 ``[B, k, H, W]`` (each
neighbour's map for the query; ``explain`` ``"both"`` only, NaN where a neighbour's image
could not be loaded). Search parameters: ``top_k``, ``method``, ``explain``, ``filter``,
and the index's search parameters ``ef`` (HNSW) and ``nprobe`` (IVF_FLAT) for that request.
Naming outputs of both kinds in one request is refused.

Example:
    >>> unpack_bytes(pack_bytes([b"ab", b""]))
    [b'ab', b'']
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING, Any

import numpy as np

from fam_core.pipeline.decode import check_count, check_decoded_bytes, check_tensor_shape
from fam_core.pipeline.errors import InvalidArgument, ResourceExhausted
from fam_core.pipeline.limits import Limits
from fam_core.pipeline.request import (
    EncodedImage,
    ExplainRequest,
    ExplainResponse,
    Heatmap,
    RawTensor,
    SearchRequest,
    SearchResponse,
)
from fam_core.pipeline.search import no_index
from fam_core.search.index_types import SEARCH_PARAMETER_NAMES

if TYPE_CHECKING:
    from fam_core.pipeline.service import Pipeline

OUTPUTS: tuple[str, ...] = ("scores", "label", "embedding", "heatmap")
SEARCH_OUTPUTS: tuple[str, ...] = (
    "neighbour_ids",
    "neighbour_scores",
    "neighbour_labels",
    "heatmaps",
    "reference_heatmaps",
)
_PIXEL_TYPES = {"UINT8": ("uint8", 1), "FP16": ("float16", 2), "FP32": ("float32", 4)}


def tensor_metadata(output_dim: int, *, search: bool = False) -> dict[str, list[dict[str, Any]]]:
    """The ``inputs`` and ``outputs`` of a model's OIP metadata (``-1``: any size); with
    ``search`` (a model with an index) the search outputs come first.

    Example:
        >>> [(t["name"], t["shape"]) for t in tensor_metadata(8)["outputs"]][2]
        ('embedding', [-1, 8])
        >>> [(t["name"], t["shape"]) for t in tensor_metadata(8, search=True)["outputs"]][3]
        ('heatmaps', [-1, -1, -1, -1])
    """
    search_outputs = [
        {"name": "neighbour_ids", "datatype": "BYTES", "shape": [-1, -1]},
        {"name": "neighbour_scores", "datatype": "FP32", "shape": [-1, -1]},
        {"name": "neighbour_labels", "datatype": "BYTES", "shape": [-1, -1]},
        {"name": "heatmaps", "datatype": "FP16", "shape": [-1, -1, -1, -1]},
        {"name": "reference_heatmaps", "datatype": "FP16", "shape": [-1, -1, -1, -1]},
    ]
    return {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
        "outputs": (search_outputs if search else [])
        + [
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


def _integer(parameters, name: str) -> int | None:  # type: ignore[no-untyped-def]
    """Integer parameter ``name``: an int64 or uint64, an integral double or decimal text."""
    value = _parameter(parameters, name)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InvalidArgument(f"parameter {name!r} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise InvalidArgument(f"parameter {name!r} must be an integer, got {value!r}")
    text = str(value).strip()
    if text.lstrip("+-").isdigit() and len(text) <= 20:
        return int(text)
    raise InvalidArgument(f"parameter {name!r} must be an integer, got {text[:40]!r}")


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


def is_search(request: Any, by_default: bool) -> bool:
    """Whether a ``ModelInferRequest`` asks for a search: it names only
    :data:`SEARCH_OUTPUTS`, or none and the model searches ``by_default``.

    Example:
        >>> from types import SimpleNamespace as Message
        >>> is_search(Message(outputs=[]), True), is_search(Message(outputs=[]), False)
        (True, False)
    """
    named = {output.name for output in request.outputs}
    if not named:
        return by_default
    unknown = sorted(named - set(OUTPUTS) - set(SEARCH_OUTPUTS))
    if unknown:
        raise InvalidArgument(
            f"unknown outputs {[name[:40] for name in unknown[:8]]}; expected some of "
            f"{list(OUTPUTS)} or, for a model with an index, of {list(SEARCH_OUTPUTS)}"
        )
    if named <= set(SEARCH_OUTPUTS):
        return True
    if named <= set(OUTPUTS):
        return False
    raise InvalidArgument(
        f"outputs {sorted(named)} mix a search's {list(SEARCH_OUTPUTS)} with an explanation's "
        f"{list(OUTPUTS)}: ask for one kind per request"
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
        target_class=_integer(request.parameters, "target_class"),
        request_id=request.id,
    )


def search_request_from_infer(request: Any, limits: Limits | None = None) -> SearchRequest:
    """The pipeline search of a ``ModelInferRequest`` (of any OIP stubs)."""
    limits = limits or Limits()
    return SearchRequest(
        model=request.model_name,
        images=_images(request, limits),
        top_k=_integer(request.parameters, "top_k"),
        method=_text_parameter(request.parameters, "method"),
        explain=_text_parameter(request.parameters, "explain"),
        filter=_text_parameter(request.parameters, "filter"),
        search_params=_search_params(request.parameters),
        request_id=request.id,
    )


def _search_params(parameters: Any) -> dict[str, int] | None:
    """The index's search parameters a request names (``ef``, ``nprobe``), else ``None``."""
    given = {name: _integer(parameters, name) for name in SEARCH_PARAMETER_NAMES}
    return {name: value for name, value in given.items() if value is not None} or None


def search_outputs(request: Any, explain: str) -> list[str]:
    """The outputs a search with ``explain`` answers: those the request names, else those
    it makes; a named map output that ``explain`` does not make is refused.

    Example:
        >>> from types import SimpleNamespace as Message
        >>> search_outputs(Message(outputs=[]), "query")[-1]
        'heatmaps'
    """
    maps = {"none": 0, "query": 1, "both": 2}.get(explain, 0)
    made = list(SEARCH_OUTPUTS[: 3 + maps])
    named = [output.name for output in request.outputs]
    missing = [name for name in named if name not in made]
    if missing:
        raise InvalidArgument(
            f"outputs {missing} are not made with explain {explain!r}: heatmaps need "
            '"query" or "both", reference_heatmaps "both"'
        )
    return named or made


def answer_infer(
    pipeline: Pipeline,
    request: Any,
    version: str,
    message_type: Any,
    deadline: float | None = None,
) -> Any:
    """The ``ModelInferResponse`` (of ``message_type``) to a ``ModelInferRequest``: a search
    (:func:`is_search`) or an explanation, every option checked before the work."""
    served = pipeline.registry.get(request.model_name)
    if is_search(request, served.index is not None and served.task == "embedding"):
        search = search_request_from_infer(request, pipeline.limits)
        if served.index is None:
            raise no_index(served.name)
        requested = search_outputs(request, search.explain or served.config.explain)
        found = pipeline.search(search, deadline=deadline)
        return search_infer_response(found, requested, version, message_type)
    explain = request_from_infer(request, pipeline.limits)
    response = pipeline.explain(explain, deadline=deadline)
    requested = [output.name for output in request.outputs] or list(OUTPUTS)
    return infer_response(response, requested, version, message_type)


def search_infer_response(
    response: SearchResponse, requested: list[str], version: str, message_type: Any
) -> Any:
    """The ``ModelInferResponse`` of a search: ``[B, k]`` neighbours (``k``: the most any
    query got; a query with fewer is padded with empty ids and labels, NaN scores and maps)."""
    results = response.results
    batch = len(results)
    k = max((len(r.neighbours) for r in results), default=0)
    message = message_type(model_name=response.model, model_version=version, id=response.request_id)
    rows = [list(r.neighbours) + [None] * (k - len(r.neighbours)) for r in results]
    for name in requested:
        output = message.outputs.add(name=name)
        if name in ("neighbour_ids", "neighbour_labels"):
            output.datatype, output.shape[:] = "BYTES", [batch, k]
            field = "id" if name == "neighbour_ids" else "label"
            data = pack_bytes(
                [((getattr(n, field) or "") if n else "").encode() for row in rows for n in row]
            )
        elif name == "neighbour_scores":
            output.datatype, output.shape[:] = "FP32", [batch, k]
            scores = [n.score if n else math.nan for row in rows for n in row]
            data = np.asarray(scores, dtype="<f4").tobytes()
        else:
            field = "query_map" if name == "heatmaps" else "reference_map"
            maps = [getattr(n, field) if n else None for row in rows for n in row]
            shape = next((m.shape for m in maps if m is not None), (0, 0))
            output.datatype, output.shape[:] = "FP16", [batch, k, *shape]
            output.parameters["method"].string_param = response.method
            output.parameters["target_layer"].string_param = next(
                (m.target_layer for m in maps if m is not None), ""
            )
            data = b"".join(_map_bytes(m, shape) for m in maps)
        message.raw_output_contents.append(data)
    return message


def _map_bytes(heatmap: Heatmap | None, shape: tuple[int, int]) -> bytes:
    if heatmap is not None:
        return heatmap.data
    return np.full(shape, np.nan, dtype="<f2").tobytes()


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
