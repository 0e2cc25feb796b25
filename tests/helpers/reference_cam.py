"""CAM and Grad-CAM of an ONNX classifier, computed without fam_core's explainers.

For a head that is global average pooling then a linear layer, ``z = W mean(A) + b``:
CAM's map is ``sum_n W[c, n] A_n`` (no ReLU, eq. 1) and Grad-CAM's is
``ReLU(sum_n (W[c, n] / hw) A_n)``, the spatial mean of ``dz_c / dA`` being ``W[c] / hw``.
``A`` is the tensor before the pooling, tapped by adding it as an output of the ORIGINAL file
and running onnxruntime one image at a time (any batch the file fixes); ``W`` is read off the
graph: the MatMul / Gemm after the pooling (an initializer, a Constant node, or the output of
a DequantizeLinear / Cast, tapped too), ``MatMulInteger``'s int8 matrix dequantized by its
scale and zero point, or the identity when the pooled values are the output (a Softmax of
the pooled maps, as Keras' mini-Xception ends).

The post-processing re-derives the library's (``fam_core.explainers.postprocess.upsample`` and
``min_max``), independently: bilinear upsampling to the input size with
``align_corners=False``, then min-max normalisation of each map to ``[0, 1]`` (a map whose
span is within ``1e-5`` of its magnitude is all zeros).

Example:
    >>> raw = np.array([[[0.0, 1.0], [2.0, 3.0]]])
    >>> maps = normalised_maps(raw, (4, 4))
    >>> float(maps.min()), float(maps.max()), maps.shape
    (0.0, 1.0, (1, 4, 4))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import numpy_helper
from onnx_zoo import ZooModel

PASS_THROUGH = {
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Cast",
    "Identity",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
}
OUTPUT_TAILS = {"Softmax", "LogSoftmax", "Sigmoid"}


@dataclass(frozen=True)
class ReferenceMaps:
    """The independent maps of a batch: ``classes`` ``[B]`` (top-1 of the file's first
    output unless given), ``activations`` ``[B, N, h, w]``, ``weight`` ``[C, N]``, low-res
    ``raw`` and input-size ``maps`` (``[B, H, W]`` in ``[0, 1]``) per method."""

    classes: np.ndarray
    activations: np.ndarray
    weight: np.ndarray
    outputs: np.ndarray
    raw: dict[str, np.ndarray]
    maps: dict[str, np.ndarray]


def normalised_maps(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[B, h, w]`` low-res maps, bilinearly upsampled to ``size`` and min-max normalised."""
    upsampled = torch.nn.functional.interpolate(
        torch.from_numpy(raw.astype(np.float64))[:, None],
        size=size,
        mode="bilinear",
        align_corners=False,
    )[:, 0].numpy()
    low = upsampled.min(axis=(1, 2), keepdims=True)
    high = upsampled.max(axis=(1, 2), keepdims=True)
    span = high - low
    flat = span <= 1e-5 * np.maximum(np.abs(low), np.abs(high))
    scale = np.where(flat | (span <= 0), 0.0, 1.0 / np.where(span > 0, span, 1.0))
    return (upsampled - low) * scale


def reference_maps(
    model: ZooModel, images: np.ndarray, classes: np.ndarray | None = None
) -> ReferenceMaps:
    """CAM and Grad-CAM of ``model`` for ``images`` ``[B, 3, H, W]`` in ``[0, 1]``."""
    if model.target is None:
        raise ValueError(f"{model.name} has no target tensor: it is refused")
    proto = onnx.load(str(model.path))  # external data beside the file comes along
    weight_name, head = _classifier_weight(proto, model.target)
    taps = [model.target, *head.taps]
    session = _tapped_session(proto, taps)
    first_output = proto.graph.output[0].name
    inputs = model.model_input(images)
    activations, outputs, tapped = [], [], {}
    for image in inputs:
        values = dict(
            zip(
                [first_output, *taps],
                session.run([first_output, *taps], {session.get_inputs()[0].name: image[None]}),
                strict=True,
            )
        )
        activations.append(values[model.target][0].astype(np.float64))
        outputs.append(values[first_output][0].astype(np.float64))
        tapped = values  # the head's computed matrix is the same for every image
    activations_array = np.stack(activations)
    outputs_array = np.stack(outputs).reshape(len(outputs), -1)
    weight = head.weight(tapped)
    if weight is None:  # the pooled maps are the output: W is the identity
        weight = np.eye(activations_array.shape[1])
    if weight.shape[1] != activations_array.shape[1]:
        raise ValueError(
            f"{model.name}: {weight_name} is {weight.shape}; the target has "
            f"{activations_array.shape[1]} channels"
        )
    if classes is None:
        classes = outputs_array.argmax(axis=1)
    rows = weight[classes]  # [B, N]
    cam = np.einsum("bn,bnhw->bhw", rows, activations_array)
    area = activations_array.shape[2] * activations_array.shape[3]
    gradcam = np.maximum(np.einsum("bn,bnhw->bhw", rows / area, activations_array), 0.0)
    raw = {"cam": cam, "gradcam": gradcam}
    maps = {method: normalised_maps(values, model.input_size) for method, values in raw.items()}
    return ReferenceMaps(classes, activations_array, weight, outputs_array, raw, maps)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps (or batches of maps), flattened."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


# -- reading the head


class _Head:
    """The head's matrix ``W`` ``[C, N]``: built from the graph's constants and, where the
    matrix is computed (a DequantizeLinear or Cast of a constant), from the values tapped
    under the names in ``taps``; ``None`` when the pooled maps are the output (identity)."""

    def __init__(self, constants: dict[str, np.ndarray]) -> None:
        self.constants = constants
        self.taps: list[str] = []
        self.build: Callable[[dict[str, np.ndarray]], np.ndarray | None] = lambda tapped: None

    def value(self, name: str, tapped: dict[str, np.ndarray]) -> np.ndarray:
        return self.constants[name] if name in self.constants else tapped[name]

    def need(self, name: str) -> None:
        if name not in self.constants:
            self.taps.append(name)

    def weight(self, tapped: dict[str, np.ndarray]) -> np.ndarray | None:
        return self.build(tapped)


def _constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def _classifier_weight(proto: onnx.ModelProto, target: str) -> tuple[str, _Head]:
    """The head's matrix after the pooling of ``target``, followed through reshapes,
    casts and (de)quantization to the first MatMul / Gemm / MatMulInteger."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    head = _Head(_constants(proto))
    pool = next(
        (n for n in consumers.get(target, []) if n.op_type in ("GlobalAveragePool", "ReduceMean")),
        None,
    )
    if pool is None:
        raise ValueError(f"{target} is not followed by global average pooling")
    value = pool.output[0]
    outputs = {v.name for v in proto.graph.output}
    while True:
        following = [n for n in consumers.get(value, []) if n.op_type != "Shape"]
        if not following:
            if value in outputs:
                return "identity", head  # the pooled values are the output
            raise ValueError(f"found no classifier after {value}")
        node = following[0]
        if node.op_type in ("MatMul", "Gemm"):
            _linear(head, node)
            return node.input[1], head
        if node.op_type == "MatMulInteger":
            _integer_linear(head, node, proto)
            return node.input[1], head
        if node.op_type not in PASS_THROUGH | OUTPUT_TAILS:
            raise ValueError(f"unexpected {node.op_type} node after the pooling")
        value = node.output[0]


def _linear(head: _Head, node: onnx.NodeProto) -> None:
    """``MatMul(x, B)``: ``W = B^T``; ``Gemm(x, B, alpha, transB)``: ``alpha B`` or its
    transpose."""
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    transposed = node.op_type == "Gemm" and attributes.get("transB", 0) == 1
    alpha = float(attributes.get("alpha", 1.0)) if node.op_type == "Gemm" else 1.0
    matrix = node.input[1]
    head.need(matrix)

    def build(tapped: dict[str, np.ndarray]) -> np.ndarray:
        values = head.value(matrix, tapped).astype(np.float64) * alpha
        return values if transposed else values.T  # [C, N]

    head.build = build


def _integer_linear(head: _Head, node: onnx.NodeProto, proto: onnx.ModelProto) -> None:
    """``MatMulInteger(x_q, W_q, x_zero, W_zero)`` then ``Mul`` by ``x_scale * W_scale``
    (onnxruntime's dynamic quantization): ``W = (W_q - W_zero) * W_scale``."""
    constants = head.constants
    quantized = constants[node.input[1]].astype(np.float64)
    zero = constants[node.input[3]].astype(np.float64) if len(node.input) > 3 else 0.0
    producer = {out: n for n in proto.graph.node for out in n.output}
    dynamic = producer[node.input[0]]
    if dynamic.op_type != "DynamicQuantizeLinear":
        raise ValueError(f"expected DynamicQuantizeLinear before {node.name}")
    input_scale = dynamic.output[1]
    scale = next(
        constants[other]
        for n in proto.graph.node
        if n.op_type == "Mul" and input_scale in n.input
        for other in n.input
        if other != input_scale and other in constants
    ).astype(np.float64)
    weight = ((quantized - zero) * scale).T  # [C, N]
    head.build = lambda tapped: weight


def _tapped_session(proto: onnx.ModelProto, names: list[str]) -> onnxruntime.InferenceSession:
    """An onnxruntime session of ``proto`` with ``names`` added as outputs."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(proto)
    inferred = onnx.shape_inference.infer_shapes(tapped)
    types = {v.name: v.type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    existing = {v.name for v in tapped.graph.output}
    for name in names:
        if name in existing:
            continue
        value = onnx.ValueInfoProto(name=name)
        if name in types:
            value.type.CopyFrom(types[name])
        tapped.graph.output.append(value)
        existing.add(name)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(
        tapped.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
