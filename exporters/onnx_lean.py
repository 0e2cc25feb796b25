"""Rewrites that make a grafted graph cheap under onnxruntime, with the same outputs.

The head exported from torch is written for every runtime; on onnxruntime's CPU provider
a few of its forms cost more than the backbone of a small model:

- **Bilinear upsampling** (``Resize``, linear, no antialiasing) of a map with a static
  size: onnxruntime's generic ``Resize`` kernel costs a few nanoseconds per output pixel.
  Bilinear interpolation is separable and linear, so it is two matrix products with
  constant interpolation matrices, ``Y = R_rows X R_cols^T``
  (:func:`interpolation_matrix`), which onnxruntime's GEMM runs several times faster.
- **Picking the one channel** of ``[B, 1, H, W]`` with ``Gather`` copies the full map;
  ``Squeeze`` is the same values without the copy.
- **int8 activations** (``QuantizeLinear`` -> ``DequantizeLinear`` pairs with an int8 zero
  point): on x86, onnxruntime converts each pair to uint8 before it fuses the backbone into
  ``QLinearConv`` / ``QLinearGlobalAveragePool``, but only pairs whose ``QuantizeLinear``
  feeds a single node. Tapping the feature map gives its pair a second consumer: that pair
  stays int8, its neighbours become uint8, and the last convolution and the pooling fall
  back to float. The same conversion done here for every pair (the uint8 zero point is the
  int8 one + 128, which dequantizes to the same values) keeps the whole backbone fused.
- **Shapes read at run time**: the head's ``Reshape`` of the map to ``[B, N, h * w]`` takes
  its batch from ``Shape -> Slice -> Concat`` where onnxslim could not fold it (a QDQ
  graph's tapped map has no inferred shape); a constant shape whose zeros copy those
  extents does the same with no node. Min-max's magnitude ``max(|low|, |high|)`` is
  ``max(high, -low)`` (``low <= high``): one node fewer, the same values.
- **A dequantized map read channel-last**: onnxruntime runs a QDQ backbone's convolutions
  on uint8 in NHWC and puts a ``Transpose`` back to NCHW before the tapped map's
  ``DequantizeLinear``. The head's ``MatMul(w [B, 1, C], Reshape(map, [B, C, h * w]))``
  becomes ``MatMul(Reshape(Transpose(map, [0, 2, 3, 1]), [B, h * w, C]), w [B, C, 1])``:
  onnxruntime's transpose optimizer cancels the two transposes, so the map is dequantized
  where it lies (the same products over the channels).

:func:`lean_rewrites` applies them in place; :func:`fam_core.exporters.onnx_verify.leaned`
keeps the result only where it computes the same outputs.

Example:
    >>> interpolation_matrix(2, 4, "half_pixel").round(3).tolist()
    [[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fam_core.exporters.onnx_graph import prune_graph

__all__ = ["interpolation_matrix", "lean_rewrites"]

_COORDINATES = ("half_pixel", "pytorch_half_pixel")


def interpolation_matrix(size_in: int, size_out: int, coordinates: str) -> np.ndarray:
    """``[size_out, size_in]`` weights of 1-D linear interpolation as ONNX ``Resize`` does
    it (``mode="linear"``, no antialiasing, ``coordinates`` ``"half_pixel"`` or
    ``"pytorch_half_pixel"``): sample ``x = (i + 0.5) size_in / size_out - 0.5``, clamped
    to the input, between its two neighbours."""
    if coordinates not in _COORDINATES:
        raise ValueError(f"coordinates must be one of {_COORDINATES}, got {coordinates!r}")
    matrix = np.zeros((size_out, size_in), dtype=np.float64)
    for index in range(size_out):
        if coordinates == "pytorch_half_pixel" and size_out == 1:
            position = 0.0
        else:
            position = (index + 0.5) * size_in / size_out - 0.5
        position = min(max(position, 0.0), size_in - 1.0)
        low = int(np.floor(position))
        high = min(low + 1, size_in - 1)
        fraction = position - low
        matrix[index, low] += 1.0 - fraction
        matrix[index, high] += fraction
    return matrix.astype(np.float32)


def lean_rewrites(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> int:
    """Rewrite ``model`` in place (see the module); ``shapes`` are the concrete shapes of
    its values on a sample batch. Returns how many nodes were rewritten."""
    return (
        _unsigned_activations(model.graph)
        + _matmul_upsampling(model.graph, shapes)
        + _squeezed_picks(model.graph, shapes)
        + _direct_reshapes(model.graph)
        + _scaled_gathers(model.graph)
        + _batch_copying_reshapes(model.graph)
        + _signed_magnitudes(model.graph)
        + _channel_last_maps(model.graph, shapes)
    )


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {item.name: helper.get_attribute_value(item) for item in node.attribute}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes that read each value (a node twice where it reads the value twice)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _decoded(value: object) -> object:
    return value.decode() if isinstance(value, bytes) else value


def _matmul_upsampling(graph: onnx.GraphProto, shapes: Mapping[str, Sequence[int]]) -> int:
    """Each linear ``Resize`` of the last two axes of a 4-D value -> ``MatMul`` x 2; on the
    3-D value itself where the ``Resize`` sits between ``Unsqueeze`` and a pick of axis 1."""
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    producers = {name: node for node in graph.node for name in node.output}
    consumers = _consumers(graph)
    rewritten, dropped = 0, set()
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        steps = _upsampling_steps(node, shapes)
        if id(node) in dropped or not steps:
            if id(node) not in dropped:
                nodes.append(node)
            continue
        value, output, prefix = node.input[0], node.output[0], f"{node.name or node.output[0]}/"
        unsqueeze, users = producers.get(value), consumers.get(output, [])
        if (
            unsqueeze is not None
            and _axes(unsqueeze, "Unsqueeze", constants) == [1]
            and len(users) == 1
            and _picks_first_channel(users[0], constants)
        ):
            value, output = unsqueeze.input[0], users[0].output[0]
            dropped.add(id(users[0]))
        for number, (side, matrix) in enumerate(steps):
            name = prefix + side
            graph.initializer.append(numpy_helper.from_array(matrix, name))
            result = output if number == len(steps) - 1 else prefix + "columns_applied"
            inputs = [name, value] if side == "rows" else [value, name]
            nodes.append(helper.make_node("MatMul", inputs, [result], name=prefix + side))
            value = result
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def _axes(node: onnx.NodeProto, op_type: str, constants: Mapping[str, np.ndarray]) -> list[int]:
    """The ``axes`` of an ``Unsqueeze`` / ``Squeeze`` (attribute or constant input)."""
    if node.op_type != op_type:
        return []
    if len(node.input) > 1 and node.input[1] in constants:
        return [int(axis) for axis in constants[node.input[1]].reshape(-1)]
    return [int(axis) for axis in _attributes(node).get("axes", [])]  # type: ignore[union-attr]


def _picks_first_channel(node: onnx.NodeProto, constants: Mapping[str, np.ndarray]) -> bool:
    """``Gather(x, 0, axis=1)`` or ``Squeeze(x, [1])``."""
    if node.op_type == "Squeeze":
        return _axes(node, "Squeeze", constants) == [1]
    if node.op_type != "Gather" or node.input[1] not in constants:
        return False
    index = constants[node.input[1]]
    return index.shape == () and int(index) == 0 and _attributes(node).get("axis", 0) == 1


def _upsampling_steps(
    node: onnx.NodeProto, shapes: Mapping[str, Sequence[int]]
) -> list[tuple[str, np.ndarray]]:
    """``[("columns", R_cols^T), ("rows", R_rows)]`` (the axes that change) for a ``Resize``
    that is bilinear interpolation of the last two axes of a 4-D value; ``[]`` otherwise."""
    if node.op_type != "Resize":
        return []
    source, target = shapes.get(node.input[0]), shapes.get(node.output[0])
    attributes = {key: _decoded(value) for key, value in _attributes(node).items()}
    coordinates = attributes.get("coordinate_transformation_mode", "half_pixel")
    if (
        source is None
        or target is None
        or len(source) != 4
        or len(target) != 4
        or tuple(source[:2]) != tuple(target[:2])
        or attributes.get("mode", "nearest") != "linear"
        or attributes.get("antialias", 0)
        or attributes.get("keep_aspect_ratio_policy", "stretch") != "stretch"
        or coordinates not in _COORDINATES
    ):
        return []
    steps = []
    if source[3] != target[3]:
        steps.append(("columns", interpolation_matrix(source[3], target[3], coordinates).T.copy()))
    if source[2] != target[2]:
        steps.append(("rows", interpolation_matrix(source[2], target[2], coordinates)))
    return steps


def _squeezed_picks(graph: onnx.GraphProto, shapes: Mapping[str, Sequence[int]]) -> int:
    """``Gather(x, 0, axis)`` of an axis of extent 1 -> ``Squeeze(x, [axis])`` (no copy)."""
    constants = {tensor.name: tensor for tensor in graph.initializer}
    rewritten = 0
    for node in graph.node:
        if node.op_type != "Gather" or node.input[1] not in constants:
            continue
        index = numpy_helper.to_array(constants[node.input[1]])
        source = shapes.get(node.input[0])
        axis = int(_attributes(node).get("axis", 0))  # type: ignore[call-overload]
        if index.shape != () or int(index) != 0 or source is None or source[axis] != 1:
            continue
        axes = f"{node.name or node.output[0]}/axes"
        graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), axes))
        node.op_type = "Squeeze"
        node.input[1] = axes
        del node.attribute[:]
        rewritten += 1
    return rewritten


def _direct_reshapes(graph: onnx.GraphProto) -> int:
    """``Reshape(Squeeze(x), shape)`` -> ``Reshape(x, shape)`` for a constant ``shape``
    without zeros (a zero copies an axis of the input, which the ``Squeeze`` moved)."""
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    producers = {name: node for node in graph.node for name in node.output}
    consumers = _consumers(graph)
    outputs = {value.name for value in graph.output}
    rewritten = 0
    for node in graph.node:
        squeeze = producers.get(node.input[0]) if node.op_type == "Reshape" else None
        shape = constants.get(node.input[1]) if squeeze is not None else None
        if (
            squeeze is None
            or squeeze.op_type != "Squeeze"
            or shape is None
            or (shape == 0).any()
            or len(consumers[squeeze.output[0]]) != 1
            or squeeze.output[0] in outputs
        ):
            continue
        node.input[0] = squeeze.input[0]
        rewritten += 1
    return rewritten


def _scaled_gathers(graph: onnx.GraphProto) -> int:
    """``Div`` / ``Mul`` of the rows ``Gather`` picks from a constant by a constant scalar
    -> ``Gather`` from the constant divided / multiplied once (the same values)."""
    constants = {tensor.name: tensor for tensor in graph.initializer}
    producers = {name: node for node in graph.node for name in node.output}
    consumers = _consumers(graph)
    outputs = {value.name for value in graph.output}
    rewritten = 0
    for node in list(graph.node):
        gather = producers.get(node.input[0]) if node.op_type in ("Div", "Mul") else None
        if (
            gather is None
            or gather.op_type != "Gather"
            or gather.input[0] not in constants
            or node.input[1] not in constants
            or len(consumers[gather.output[0]]) != 1
            or gather.output[0] in outputs
        ):
            continue
        table = numpy_helper.to_array(constants[gather.input[0]])
        factor = numpy_helper.to_array(constants[node.input[1]])
        if factor.size != 1 or factor.dtype != table.dtype:
            continue
        scaled = np.divide(table, factor) if node.op_type == "Div" else np.multiply(table, factor)
        name = f"{gather.input[0]}/{node.op_type.lower()}"
        graph.initializer.append(numpy_helper.from_array(scaled.astype(table.dtype), name))
        node.op_type, node.input[:] = "Gather", [name, gather.input[1]]
        node.attribute.extend(gather.attribute)
        graph.node.remove(gather)
        rewritten += 1
    return rewritten


def _unsigned_activations(graph: onnx.GraphProto) -> int:
    """``QuantizeLinear`` -> ``DequantizeLinear`` pairs with an int8 zero point -> uint8
    (zero point + 128: the same dequantized values), where every consumer of the
    ``QuantizeLinear`` is a ``DequantizeLinear`` with its scale and zero point."""
    constants = {tensor.name: tensor for tensor in graph.initializer}
    consumers = _consumers(graph)
    outputs = {value.name for value in graph.output}
    converted: dict[str, str] = {}
    rewritten = 0
    for node in graph.node:
        if (
            node.op_type != "QuantizeLinear"
            or len(node.input) < 3
            or node.input[2] not in constants
            or "output_dtype" in _attributes(node)
            or node.output[0] in outputs
        ):
            continue
        zero_point = numpy_helper.to_array(constants[node.input[2]])
        users = consumers.get(node.output[0], [])
        if zero_point.dtype != np.int8 or not users:
            continue
        if any(u.op_type != "DequantizeLinear" or u.input[1:3] != node.input[1:3] for u in users):
            continue
        name = converted.get(node.input[2])
        if name is None:
            name = converted[node.input[2]] = f"{node.input[2]}/uint8"
            unsigned = (zero_point.astype(np.int16) + 128).astype(np.uint8)
            graph.initializer.append(numpy_helper.from_array(unsigned, name))
        for user in (node, *users):
            user.input[2] = name
        for value in graph.value_info:
            if value.name == node.output[0]:
                value.type.tensor_type.elem_type = TensorProto.UINT8
        rewritten += 1
    return rewritten


def _batch_copying_reshapes(graph: onnx.GraphProto) -> int:
    """``Reshape(x, Concat(Slice(Shape(x), 0, k), c))`` -> ``Reshape(x, [0] * k + c)`` for
    constant ``c``: the first ``k`` extents copied by zeros (``allowzero`` off) instead of
    read by three nodes (onnxslim folds them only where the map's shape is inferred; a QDQ
    graph's tapped map has none)."""
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    producers = {name: node for node in graph.node for name in node.output}
    rewritten = 0
    for node in graph.node:
        if node.op_type != "Reshape" or _attributes(node).get("allowzero", 0):
            continue
        found = _batch_and_constants(
            node.input[0], producers.get(node.input[1]), producers, constants
        )
        if found is None:
            continue
        copied, names = found
        tail = [constants.get(name) for name in names]
        if any(value is None or value.dtype != np.int64 for value in tail):
            continue
        shape = np.concatenate([np.zeros(copied, np.int64), *(v.reshape(-1) for v in tail)])  # type: ignore[union-attr]
        name = f"{node.name or node.output[0]}/shape"
        graph.initializer.append(numpy_helper.from_array(shape, name))
        node.input[1] = name
        rewritten += 1
    return rewritten


def _batch_and_constants(
    value: str,
    concat: onnx.NodeProto | None,
    producers: Mapping[str, onnx.NodeProto],
    constants: Mapping[str, np.ndarray],
) -> tuple[int, list[str]] | None:
    """``(k, the other inputs of concat)`` where it is ``Concat(Slice(Shape(value), [0],
    [k]), ...)`` on axis 0 (the first ``k`` extents of ``value``, then the rest); ``None``
    otherwise."""
    if concat is None or concat.op_type != "Concat" or _attributes(concat).get("axis") != 0:
        return None
    piece = producers.get(concat.input[0])
    if piece is None or piece.op_type != "Slice" or len(piece.input) < 3:
        return None
    shape = producers.get(piece.input[0])
    if shape is None or shape.op_type != "Shape" or shape.input[0] != value or shape.attribute:
        return None
    bounds = [_int_constant(name, producers, constants) for name in piece.input[1:]]
    starts, ends, *rest = bounds
    if starts != [0] or ends is None or len(ends) != 1 or not 1 <= ends[0] <= 8:
        return None
    if rest[:1] not in ([], [[0]]) or rest[1:] not in ([], [[1]]):
        return None  # axes 0 and steps 1 where given
    return ends[0], list(concat.input[1:])


def _int_constant(
    name: str, producers: Mapping[str, onnx.NodeProto], constants: Mapping[str, np.ndarray]
) -> list[int] | None:
    """The values of the integer initializer or ``Constant`` node ``name`` (``None``: not
    one)."""
    array = constants.get(name)
    node = producers.get(name)
    if array is None and node is not None and node.op_type == "Constant":
        value = _attributes(node).get("value")
        if isinstance(value, onnx.TensorProto):
            array = numpy_helper.to_array(value)
    if array is None or array.dtype.kind != "i":
        return None
    return [int(v) for v in array.reshape(-1)]


def _signed_magnitudes(graph: onnx.GraphProto) -> int:
    """``Max(Abs(ReduceMin(x)), Abs(ReduceMax(x)))`` -> ``Max(ReduceMax(x), Neg(ReduceMin(x)))``
    (min-max's magnitude: for ``low <= high`` the larger absolute value is ``high`` or
    ``-low``, the same values with one node fewer)."""
    producers = {name: node for node in graph.node for name in node.output}
    consumers = _consumers(graph)
    outputs = {value.name for value in graph.output}
    rewritten = 0
    for node in graph.node:
        if node.op_type != "Max" or len(node.input) != 2:
            continue
        absolutes = [producers.get(name) for name in node.input]
        if any(a is None or a.op_type != "Abs" or a.output[0] in outputs for a in absolutes):
            continue
        if any(len(consumers[a.output[0]]) != 1 for a in absolutes):  # type: ignore[union-attr]
            continue
        reduced = [producers.get(a.input[0]) for a in absolutes]  # type: ignore[union-attr]
        low = next((r for r in reduced if r is not None and r.op_type == "ReduceMin"), None)
        high = next((r for r in reduced if r is not None and r.op_type == "ReduceMax"), None)
        if (
            low is None
            or high is None
            or list(low.input) != list(high.input)
            or _attributes(low) != _attributes(high)
        ):
            continue
        negated = next(a for a in absolutes if a.input[0] == low.output[0])  # type: ignore[union-attr]
        negated.op_type = "Neg"
        node.input[:] = [high.output[0], negated.output[0]]
        rewritten += 1
    return rewritten


def _channel_last_maps(graph: onnx.GraphProto, shapes: Mapping[str, Sequence[int]]) -> int:
    """``MatMul(Unsqueeze(w, [1]), Reshape(DequantizeLinear(q), [0, 0, -1]))`` of a
    ``[B, C, h, w]`` map, reshaped to ``[B, h, w]`` -> ``MatMul(Reshape(Transpose(map,
    [0, 2, 3, 1]), [0, -1, C]), Unsqueeze(w, [2]))``: ``[B, h * w, 1]``. Runs on the pruned
    graph (the rewrites before it leave nodes that nothing reads)."""
    prune_graph(graph)
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    producers = {name: node for node in graph.node for name in node.output}
    consumers = _consumers(graph)
    outputs = {value.name for value in graph.output}
    rewritten = 0
    for reshape in list(graph.node):
        source = producers.get(reshape.input[0]) if reshape.op_type == "Reshape" else None
        users = consumers.get(reshape.output[0], [])
        if (
            source is None
            or source.op_type != "DequantizeLinear"
            or len(shapes.get(reshape.input[0], ())) != 4
            or constants.get(reshape.input[1], np.empty(0)).tolist() != [0, 0, -1]
            or len(users) != 1
            or users[0].op_type != "MatMul"
            or list(users[0].input[1:]) != [reshape.output[0]]
            or reshape.output[0] in outputs
        ):
            continue
        matmul = users[0]
        unsqueeze = producers.get(matmul.input[0])
        after = consumers.get(matmul.output[0], [])
        if (
            unsqueeze is None
            or unsqueeze.op_type != "Unsqueeze"
            or len(unsqueeze.input) != 2
            or constants.get(unsqueeze.input[1], np.empty(0)).tolist() != [1]
            or len(consumers[unsqueeze.output[0]]) != 1
            or unsqueeze.output[0] in outputs
            or len(after) != 1
            or after[0].op_type != "Reshape"
            or len(constants.get(after[0].input[1], ())) != 3
        ):
            continue
        channels = int(shapes[reshape.input[0]][1])
        axes, rows = f"{unsqueeze.output[0]}/column", f"{reshape.output[0]}/channel_last"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array([2], np.int64), axes),
                numpy_helper.from_array(np.array([0, -1, channels], np.int64), rows),
            ]
        )
        unsqueeze.input[1] = axes
        transposed = f"{reshape.input[0]}/channel_last"
        transpose = helper.make_node(
            "Transpose", [reshape.input[0]], [transposed], perm=[0, 2, 3, 1]
        )
        graph.node.insert(list(graph.node).index(reshape), transpose)
        reshape.input[:] = [transposed, rows]
        matmul.input[:] = [reshape.output[0], unsqueeze.output[0]]
        changed = {reshape.output[0], unsqueeze.output[0], matmul.output[0]}  # new shapes
        kept = [value for value in graph.value_info if value.name not in changed]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        rewritten += 1
    return rewritten
