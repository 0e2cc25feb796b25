"""Normalise an ONNX graph as real exporters write it: one stage, one report.

Files written by PaddlePaddle, tf2onnx, Keras, older PyTorch, MXNet, onnxruntime's
quantizer or onnxconverter-common's float16 converter differ from what the later stages
read in ways that do not change what the model computes. :func:`normalise_graph` removes
those differences before inspection and grafting, and lists each step it took
(:attr:`Normalised.steps`: ``fam inspect`` prints them, the grafted graph keeps them in
its metadata). The file itself is never changed.

- **Batch**: a ``-1`` or ``0`` batch extent on the input and outputs becomes a dynamic
  ``batch`` axis (a symbolic name such as ``N`` or ``unk__123`` is one already; a fixed
  batch is kept where the graph's own constants need it, see :mod:`fam_core.exporters.graft`).
- **Opset**: opsets 7-21 are converted to the grafting opsets (14-20) with
  :func:`onnx.version_converter.convert_version`; an operator it cannot convert is named.
- **Weights**: ``Constant`` nodes become initializers (external data is read from the
  model's folder by :func:`~fam_core.exporters.onnx_load.load_graph`).
- **Constants folded**: every node whose inputs are all constants is evaluated once
  (:class:`onnx.reference.ReferenceEvaluator`), so the shape arithmetic exporters write
  (``Cast`` of a constant, ``Concat`` of constants) reaches the head interpreter and
  ``torch.export`` as plain constants, not data-dependent shapes. This is a loop of our own
  over onnx's reference evaluator rather than onnxruntime's optimizer or onnxsim, because
  those also fuse nodes (Conv + BatchNormalization, ...), which drops or renames the values
  the explainers tap, differently for the float32 and the float16 copy of one graph.
- **Precision**: a float16 graph (``keep_io_types`` true or false) and an int8 graph
  (static QDQ, or ``MatMulInteger`` from dynamic quantization) keep their precision in the
  grafted backbone (:attr:`Normalised.backbone`); the stages analyse a float32, dequantized
  copy with the same value names (:attr:`Normalised.proto`), so that the explanation head
  runs in float32 on the dequantized feature map.
- **Layout**: an NHWC input (``[B, H, W, C]``, as tf2onnx and Keras write it: found from
  the input's shape and its first ``Transpose``, or stated as ``layout="NHWC"``) and a
  ``uint8`` input with its preprocessing inside the graph are both fed by one float32 NCHW
  input; a ``uint8`` graph is fed pixel values 0-255 (:attr:`Normalised.pixel_input`).

Example:
    >>> from onnx import helper, TensorProto
    >>> node = helper.make_node("Relu", ["x"], ["y"])
    >>> graph = helper.make_graph([node], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 4, 4])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, 4, 4])])
    >>> normalised = normalise_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]))
    >>> normalised.steps
    ('batch: input x batch -1 -> dynamic', 'opset: 11 -> 14 (onnx.version_converter)')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fam_core.exporters.onnx_graph import default_opset, prune_graph

__all__ = ["GRAFT_OPSETS", "InputLayout", "Normalised", "normalise_graph"]

GRAFT_OPSETS = (14, 20)
"""The default-domain opsets the graft writes its head in (``torch.onnx.export``)."""

InputLayout = Literal["NCHW", "NHWC"]
_NCHW_TO_NHWC = [0, 2, 3, 1]
_NHWC_TO_NCHW = [0, 3, 1, 2]
_QUANTIZATION_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
_FOLD_LIMIT = 1 << 24  # elements: larger constant results stay nodes (memory)


@dataclass(frozen=True)
class Normalised:
    """A graph after :func:`normalise_graph`.

    Attributes:
        proto: what inspection and the head analysis read: float32 values, dequantized,
            one float32 NCHW image input, a dynamic batch, a grafting opset.
        backbone: the same graph at the file's own precision (``proto`` itself for a float32
            graph), with the same value names and the same input: what the grafted graph runs
            up to the target tensor.
        steps: what was done, one line each (empty: the file was taken as it is).
        layout: the layout of the file's input.
        pixel_input: the file takes ``uint8`` pixels and normalises them itself: it is fed
            pixel values 0-255 (mean 0, std 1/255 on images in [0, 1]).
        precision: ``float32``, ``float16``, ``int8 (QDQ)`` or ``int8 (dynamic)``.
    """

    proto: onnx.ModelProto
    backbone: onnx.ModelProto
    steps: tuple[str, ...]
    layout: InputLayout = "NCHW"
    pixel_input: bool = False
    precision: str = "float32"


def normalise_graph(proto: onnx.ModelProto, *, layout: InputLayout | None = None) -> Normalised:
    """Normalise ``proto`` (a copy; see the module docstring for each step).

    ``layout`` states the input's layout (``"NCHW"`` or ``"NHWC"``); ``None`` detects it.
    Raises ``ValueError`` in one line for a graph that cannot be normalised (an operator the
    opset converter cannot convert, an input that is no image).
    """
    if layout not in (None, "NCHW", "NHWC"):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    steps: list[str] = []
    steps += _image_rank(copy)
    steps += _dynamic_batch(copy)
    copy, converted = _convert_opset(copy)
    steps += converted
    steps += _constants_as_initializers(copy)
    steps += _fold_constants(copy, keep=_QUANTIZATION_OPS)
    analysis, precision = _float32_copy(copy)
    if precision != "float32":
        steps.append(
            f"precision: {precision}; the backbone keeps it, the explanation head runs in "
            "float32 on the dequantized feature map"
        )
    found = _input_layout(copy, layout)
    pixels = _input_type(copy) == TensorProto.UINT8
    half_input = _input_type(copy) == TensorProto.FLOAT16
    if _adapt_input(copy, found) and analysis is not copy:
        _adapt_input(analysis, found)
    if found == "NHWC":
        steps.append("layout: NHWC input fed from NCHW images")
    if pixels:
        steps.append("input: uint8 pixels (preprocessing inside the graph), fed values 0-255")
    elif half_input:
        steps.append("input: float16, fed float32 images")
    return Normalised(analysis, copy, tuple(steps), found, pixels, precision)


# -- batch


def _dynamic_batch(proto: onnx.ModelProto) -> list[str]:
    """A dynamic ``batch`` axis where an exporter wrote ``-1`` or ``0`` as the first extent
    of the graph's inputs and outputs (a symbolic name is one already); value_info is
    dropped (the stages infer shapes again)."""
    steps: list[str] = []
    initializers = {tensor.name for tensor in proto.graph.initializer}
    for kind, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        for value in values:
            if value.name in initializers or not value.type.tensor_type.HasField("shape"):
                continue
            dims = value.type.tensor_type.shape.dim
            if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value > 0:
                continue
            if kind == "input":
                steps.append(f"batch: input {value.name} batch {dims[0].dim_value} -> dynamic")
            dims[0].dim_param = "batch"
    if steps:
        del proto.graph.value_info[:]
    return steps


def _image_rank(proto: onnx.ModelProto) -> list[str]:
    """A rank-4 shape ``[batch, C, height, width]`` for an image input that has none (some
    converters write no shape), ``C`` from the first ``Conv`` its data reaches."""
    value = _image_value(proto.graph)
    if value is None or value.type.tensor_type.HasField("shape"):
        return []
    frontier, channels = {value.name}, None
    for node in proto.graph.node:
        if not frontier.intersection(node.input):
            continue
        if node.op_type == "Conv":
            weights = {tensor.name: tensor for tensor in proto.graph.initializer}
            weight = weights.get(node.input[1])
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            channels = None if weight is None else int(weight.dims[1]) * group
            break
        frontier.update(node.output)
    if channels is None:
        return []
    shape = ["batch", channels, "height", "width"]
    value.type.CopyFrom(helper.make_tensor_type_proto(value.type.tensor_type.elem_type, shape))
    return [
        f"input: {value.name} had no shape; [batch, {channels}, height, width] from its first Conv"
    ]


# -- opset


def _convert_opset(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    version = default_opset(proto)
    low, high = GRAFT_OPSETS
    if low <= version <= high:
        return proto, []
    target = low if version < low else high
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(proto, target)
    except Exception as error:  # noqa: BLE001 - the converter's errors share no type
        raise ValueError(
            f"cannot convert the graph from opset {version} to {target}, the opset the graft "
            f"needs: {_blocking_operator(proto, str(error))}"
        ) from None
    converted.ir_version = max(converted.ir_version, 7)
    return converted, [f"opset: {version} -> {target} (onnx.version_converter)"]


def _blocking_operator(proto: onnx.ModelProto, message: str) -> str:
    """The operator a version-converter error names, in a few words."""
    ops = {node.op_type for node in proto.graph.node}
    named = [word for word in re.findall(r"[A-Z][A-Za-z]+", message) if word in ops]
    if named:
        return f"its operator {named[0]} cannot be converted"
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return first[:200]


# -- constants


def _constants_as_initializers(proto: onnx.ModelProto) -> list[str]:
    graph = proto.graph
    kept: list[onnx.NodeProto] = []
    moved = 0
    for node in graph.node:
        value = _constant_value(node) if node.op_type == "Constant" and not node.domain else None
        if value is None:
            kept.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        moved += 1
    if not moved:
        return []
    del graph.node[:]
    graph.node.extend(kept)
    return [f"weights: {moved} Constant nodes as initializers"]


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attribute in node.attribute:
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
        if attribute.name == "value_float":
            return np.array(attribute.f, dtype=np.float32)
        if attribute.name == "value_floats":
            return np.array(list(attribute.floats), dtype=np.float32)
        if attribute.name == "value_int":
            return np.array(attribute.i, dtype=np.int64)
        if attribute.name == "value_ints":
            return np.array(list(attribute.ints), dtype=np.int64)
    return None  # sparse tensors and strings stay nodes


def _fold_constants(proto: onnx.ModelProto, keep: tuple[str, ...] = ()) -> list[str]:
    """Evaluate the nodes whose inputs are all initializers, in order; ``keep`` op types stay."""
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    outputs = {value.name for value in graph.output}
    opsets = list(proto.opset_import)
    kept: list[onnx.NodeProto] = []
    folded = 0
    for node in graph.node:
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in keep
            and node.input
            and all(name == "" or name in constants for name in node.input)
            and not any(attribute.type in (5, 10) for attribute in node.attribute)  # graphs
            and not outputs.intersection(node.output)
        )
        values = _evaluate(ReferenceEvaluator, node, constants, opsets) if foldable else None
        if values is None:
            kept.append(node)
            continue
        for name, value in zip(node.output, values, strict=False):
            if name:
                tensor = numpy_helper.from_array(np.asarray(value), name)
                graph.initializer.append(tensor)
                constants[name] = tensor
        folded += 1
    if not folded:
        return []
    del graph.node[:]
    graph.node.extend(kept)
    prune_graph(graph)
    return [f"constants folded: {folded} nodes computed once (onnx.reference)"]


def _evaluate(
    evaluator: type,
    node: onnx.NodeProto,
    constants: dict[str, onnx.TensorProto],
    opsets: list[onnx.OperatorSetIdProto],
) -> list[np.ndarray] | None:
    inputs = [name for name in dict.fromkeys(node.input) if name]
    if sum(int(np.prod(constants[name].dims)) for name in inputs) > _FOLD_LIMIT:
        return None
    if node.op_type == "DequantizeLinear":  # the reference evaluator has it from opset 19 only
        return [_dequantize(node, constants)]
    graph = helper.make_graph(
        [node],
        "fold",
        [],
        [helper.make_empty_tensor_value_info(name) for name in node.output if name],
        initializer=[constants[name] for name in inputs],
    )
    try:
        values = evaluator(helper.make_model(graph, opset_imports=opsets)).run(None, {})
    except Exception:  # noqa: BLE001 - an op the reference evaluator lacks stays a node
        return None
    if any(np.asarray(value).size > _FOLD_LIMIT for value in values):
        return None
    return list(values)


def _dequantize(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> np.ndarray:
    """``(x - zero_point) * scale``, per tensor or along ``axis`` (default 1)."""
    x, scale = (numpy_helper.to_array(constants[name]) for name in node.input[:2])
    zero = np.zeros((), x.dtype)
    if len(node.input) > 2 and node.input[2]:
        zero = numpy_helper.to_array(constants[node.input[2]])
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((x.astype(np.float32) - zero.astype(np.float32)) * scale).astype(np.float32)


# -- precision


def _float32_copy(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """A float32, dequantized copy of ``proto`` with the same value names, and the
    precision of ``proto`` (``proto`` itself where it is float32 already)."""
    graph = proto.graph
    half = _uses_float16(graph)
    qdq = any(node.op_type == "DequantizeLinear" for node in graph.node)
    dynamic = any(node.op_type == "MatMulInteger" for node in graph.node)
    if not (half or qdq or dynamic):
        return proto, "float32"
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    if half:
        _half_to_float(copy.graph)
    if qdq:
        _dequantize_activations(copy.graph)
        _fold_constants(copy)  # the weights' DequantizeLinear: float32 weights
    if dynamic:
        _dequantize_dynamic(copy.graph)
        _fold_constants(copy)  # the dequantized weights
    del copy.graph.value_info[:]
    precision = "float16" if half else ("int8 (QDQ)" if qdq else "int8 (dynamic)")
    return copy, precision


def _uses_float16(graph: onnx.GraphProto) -> bool:
    values = (*graph.input, *graph.output, *graph.value_info)
    return any(t.data_type == TensorProto.FLOAT16 for t in graph.initializer) or any(
        v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in values
    )


def _half_to_float(graph: onnx.GraphProto) -> None:
    for position, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT16:
            array = numpy_helper.to_array(tensor).astype(np.float32)
            graph.initializer[position].CopyFrom(numpy_helper.from_array(array, tensor.name))
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        for attribute in node.attribute:
            if (
                node.op_type == "Cast"
                and attribute.name == "to"
                and attribute.i == TensorProto.FLOAT16
            ):
                attribute.i = TensorProto.FLOAT
            elif (
                attribute.type == onnx.AttributeProto.TENSOR
                and attribute.t.data_type == TensorProto.FLOAT16
            ):
                array = numpy_helper.to_array(attribute.t).astype(np.float32)
                attribute.t.CopyFrom(numpy_helper.from_array(array, attribute.t.name))


def _dequantize_activations(graph: onnx.GraphProto) -> None:
    """Each ``DequantizeLinear(QuantizeLinear(x))`` on a value computed from the input
    becomes ``Identity(x)`` (the same output name): the activations unrounded."""
    constants = {tensor.name for tensor in graph.initializer}
    producers = {name: node for node in graph.node for name in node.output}
    for position, node in enumerate(graph.node):
        if node.op_type != "DequantizeLinear" or node.input[0] in constants:
            continue
        source = producers.get(node.input[0])
        if source is None or source.op_type != "QuantizeLinear":
            continue
        identity = helper.make_node("Identity", [source.input[0]], [node.output[0]], name=node.name)
        graph.node[position].CopyFrom(identity)
    prune_graph(graph)


def _dequantize_dynamic(graph: onnx.GraphProto) -> None:
    """``MatMulInteger`` fed by ``DynamicQuantizeLinear(x)`` as a float ``MatMul`` of the
    unrounded ``x / scale`` and the dequantized weight: the later ``Mul`` by the scales gives
    ``x W`` exactly as the quantized head approximates it."""
    producers = {name: node for node in graph.node for name in node.output}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        source = producers.get(node.input[0]) if node.op_type == "MatMulInteger" else None
        if source is None or source.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        x, scale = source.input[0], source.output[1]
        stem = node.output[0]
        a = f"{stem}/unrounded"
        nodes.append(helper.make_node("Div", [x, scale], [a]))
        weight = f"{stem}/weight"
        nodes.append(
            helper.make_node("Cast", [node.input[1]], [f"{weight}/float"], to=TensorProto.FLOAT)
        )
        if len(node.input) > 3 and node.input[3]:
            nodes.append(
                helper.make_node("Cast", [node.input[3]], [f"{weight}/zero"], to=TensorProto.FLOAT)
            )
            nodes.append(helper.make_node("Sub", [f"{weight}/float", f"{weight}/zero"], [weight]))
        else:
            nodes.append(helper.make_node("Identity", [f"{weight}/float"], [weight]))
        nodes.append(helper.make_node("MatMul", [a, weight], [stem], name=node.name))
    del graph.node[:]
    graph.node.extend(nodes)
    prune_graph(graph)


# -- the input


def _image_value(graph: onnx.GraphProto) -> onnx.ValueInfoProto | None:
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    return inputs[0] if len(inputs) == 1 else None


def _input_type(proto: onnx.ModelProto) -> int:
    value = _image_value(proto.graph)
    return 0 if value is None else value.type.tensor_type.elem_type


def _input_layout(proto: onnx.ModelProto, stated: InputLayout | None) -> InputLayout:
    """NHWC where stated, where the input's first layout-changing node is a ``Transpose``
    to NCHW, or where only its last axis can hold the channels (1 or 3)."""
    if stated is not None:
        return stated
    value = _image_value(proto.graph)
    if value is None or len(value.type.tensor_type.shape.dim) != 4:
        return "NCHW"
    transpose = _first_transpose(proto.graph, value.name)
    if transpose is not None:
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        if perm == _NHWC_TO_NCHW:
            return "NHWC"
    dims = [
        d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
    ]
    if dims[3] in (1, 3) and dims[1] not in (1, 3, None):
        return "NHWC"
    return "NCHW"


def _first_transpose(graph: onnx.GraphProto, name: str) -> onnx.NodeProto | None:
    """The ``Transpose`` the input reaches through elementwise preprocessing, if any."""
    elementwise = ("Cast", "Sub", "Div", "Mul", "Add", "Identity")
    frontier = {name}
    for node in graph.node:
        if not frontier.intersection(node.input):
            continue
        if node.op_type == "Transpose":
            return node
        if node.op_type not in elementwise:
            return None
        frontier.update(node.output)
    return None


def _adapt_input(proto: onnx.ModelProto, layout: InputLayout) -> bool:
    """Feed ``proto``'s image input from a float32 NCHW input of the same name: a
    ``Transpose`` for NHWC, ``Clip``/``Round``/``Cast`` for uint8 pixels, a ``Cast`` for
    float16. Where a float NHWC input feeds only the graph's own ``Transpose`` to NCHW, that
    one goes instead of adding its inverse. Returns whether the input changed."""
    graph = proto.graph
    value = _image_value(graph)
    if value is None:
        return False
    tensor = value.type.tensor_type
    dtype = tensor.elem_type
    if layout == "NCHW" and dtype == TensorProto.FLOAT:
        return False
    name = value.name
    inner = f"{name}/as_graph_input"  # what the graph's nodes read: the file's own input
    for node in graph.node:
        node.input[:] = [inner if given == name else given for given in node.input]
    nodes: list[onnx.NodeProto] = []
    current = name
    if layout == "NHWC" and not (dtype == TensorProto.FLOAT and _drop_own_transpose(graph, inner)):
        nodes.append(helper.make_node("Transpose", [name], [f"{name}/nhwc"], perm=_NCHW_TO_NHWC))
        current = f"{name}/nhwc"
    if dtype == TensorProto.UINT8:
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(0.0, np.float32), f"{name}/zero"),
                numpy_helper.from_array(np.array(255.0, np.float32), f"{name}/full"),
            ]
        )
        nodes += [
            helper.make_node(
                "Clip", [current, f"{name}/zero", f"{name}/full"], [f"{name}/clipped"]
            ),
            helper.make_node("Round", [f"{name}/clipped"], [f"{name}/rounded"]),
            helper.make_node("Cast", [f"{name}/rounded"], [inner], to=TensorProto.UINT8),
        ]
    elif dtype == TensorProto.FLOAT16:
        nodes.append(helper.make_node("Cast", [current], [inner], to=TensorProto.FLOAT16))
    else:
        nodes.append(helper.make_node("Identity", [current], [inner]))
    shape = [_dim(d) for d in tensor.shape.dim]
    if layout == "NHWC" and len(shape) == 4:
        shape = [shape[0], shape[3], shape[1], shape[2]]
    value.CopyFrom(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape or None))
    _prepend(graph, nodes)
    del graph.value_info[:]
    return True


def _drop_own_transpose(graph: onnx.GraphProto, inner: str) -> bool:
    """Remove the graph's ``Transpose`` NHWC -> NCHW where it alone reads ``inner``; its
    readers read ``inner`` (then NCHW) instead."""
    readers = [node for node in graph.node if inner in node.input]
    if len(readers) != 1 or readers[0].op_type != "Transpose":
        return False
    perm = next((list(a.ints) for a in readers[0].attribute if a.name == "perm"), None)
    transposed = readers[0].output[0]
    if perm != _NHWC_TO_NCHW or any(value.name == transposed for value in graph.output):
        return False
    graph.node.remove(readers[0])
    for node in graph.node:
        node.input[:] = [inner if given == transposed else given for given in node.input]
    return True


def _prepend(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *existing])


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    if dim.HasField("dim_param"):
        return dim.dim_param
    return None
