"""Small tools over an ONNX graph that every stage of the graft uses.

Producers and data ancestors of a value, the shapes and element types that shape
inference typed, an onnxruntime CPU session with extra outputs, a batched run that falls
back to item by item where a graph fixes its batch, renaming and pruning.

Example:
    >>> from onnx import helper, TensorProto
    >>> node = helper.make_node("Relu", ["x"], ["y"])
    >>> graph = helper.make_graph([node], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2])])
    >>> sorted(data_ancestors(helper.make_model(graph), "y"))
    ['x', 'y']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

NO_DATA_OPS = ("Shape", "Size")  # ops whose output does not depend on their input's values

__all__ = [
    "NO_DATA_OPS",
    "data_ancestors",
    "default_opset",
    "drop_output",
    "elem_types",
    "float_value_shapes",
    "make_session",
    "producers_of",
    "prune_graph",
    "rename_value",
    "run_batch",
    "sample_image",
    "with_inferred_shapes",
]


def sample_image(
    size: tuple[int, int], batch: int = 1, seed: int = 0, channels: int = 3
) -> np.ndarray:
    """``[batch, channels, *size]`` standard-normal images (normalised inputs)."""
    generator = np.random.default_rng(seed)
    return generator.standard_normal((batch, channels, *size)).astype(np.float32)


def make_session(proto: onnx.ModelProto, outputs: Sequence[str] = ()) -> object:
    """An onnxruntime CPU session on ``proto`` with the values ``outputs`` added as outputs."""
    import onnxruntime

    if outputs:
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        present = {value.name for value in copy.graph.output}
        for name in outputs:
            if name not in present:
                copy.graph.output.append(helper.make_empty_tensor_value_info(name))
        proto = copy
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # a failed probe (a fixed batch) raises; no log line
    return onnxruntime.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run_batch(
    session: object, name: str, maps: np.ndarray, outputs: Sequence[str] | None = None
) -> list[np.ndarray]:
    """Run ``session`` on a batch of ``maps``; item by item where the head fixes the batch."""
    try:
        return session.run(outputs, {name: maps})  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a graph that hard-codes batch 1 runs item by item
        parts = [session.run(outputs, {name: maps[i : i + 1]}) for i in range(len(maps))]  # type: ignore[attr-defined]
        return [np.concatenate(arrays) for arrays in zip(*parts, strict=True)]


def float_value_shapes(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Shapes of the float values that shape inference typed (``None``: a symbolic axis)."""
    shapes: dict[str, list[int | None]] = {}
    for value in (*proto.graph.value_info, *proto.graph.output):
        tensor = value.type.tensor_type
        if tensor.elem_type != TensorProto.FLOAT or not tensor.HasField("shape"):
            continue
        shapes[value.name] = [
            d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim
        ]
    return shapes


def elem_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element types of the values that shape inference typed."""
    return {
        value.name: value.type.tensor_type.elem_type
        for value in (*proto.graph.value_info, *proto.graph.output)
    }


def producers_of(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in proto.graph.node for name in node.output if name}


def data_ancestors(proto: onnx.ModelProto, output: str) -> set[str]:
    """Values whose data reaches ``output`` (edges into Shape/Size carry none)."""

    def data_inputs(node: onnx.NodeProto) -> list[str]:
        return [] if node.op_type in NO_DATA_OPS else [given for given in node.input if given]

    return _ancestors(producers_of(proto), [output], data_inputs)


def _ancestors(
    producers: dict[str, onnx.NodeProto],
    outputs: list[str],
    inputs_of: Callable[[onnx.NodeProto], list[str]],
) -> set[str]:
    """``outputs`` and every value they are computed from, following ``inputs_of`` each node."""
    seen: set[str] = set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producers.get(name)
        if node is not None:
            stack.extend(inputs_of(node))
    return seen


def with_inferred_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - an unknown op stops inference; onnxruntime measures instead
        return proto


def default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError("the graph imports no default-domain ('ai.onnx') opset")


def rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == old:
            value.name = new


def prune_graph(graph: onnx.GraphProto) -> None:
    """Drop the nodes and initializers that no graph output needs (and the graph inputs
    that old IR versions list for the initializers dropped)."""
    producers = {name: node for node in graph.node for name in node.output if name}

    def inputs(node: onnx.NodeProto) -> list[str]:
        given = [name for name in node.input if name]
        for attribute in node.attribute:  # values a subgraph (If, Loop) reads
            for sub in (attribute.g, *attribute.graphs):
                given.extend(name for inner in sub.node for name in inner.input)
        return given

    needed = _ancestors(producers, [value.name for value in graph.output], inputs)
    kept_nodes = {id(producers[name]) for name in needed if name in producers}
    nodes = [node for node in graph.node if id(node) in kept_nodes]
    del graph.node[:]
    graph.node.extend(nodes)
    dropped = {tensor.name for tensor in graph.initializer if tensor.name not in needed}
    initializers = [tensor for tensor in graph.initializer if tensor.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    inputs = [value for value in graph.input if value.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)


def drop_output(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``proto`` without its output ``name`` and the nodes only that output read (changed in
    place and returned): the feature-resolution graph of an explanation graph is
    ``drop_output(graph, "heatmap")``.

    Example:
        >>> nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["z"])]
        >>> values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in "xyz"]
        >>> graph = helper.make_graph(nodes, "g", values[:1], values[1:])
        >>> [node.op_type for node in drop_output(helper.make_model(graph), "z").graph.node]
        ['Relu']
    """
    kept = [value for value in proto.graph.output if value.name != name]
    if len(kept) == len(proto.graph.output):
        raise ValueError(f"the graph has no output {name!r}")
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    prune_graph(proto.graph)
    return proto
