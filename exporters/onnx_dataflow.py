"""Where to explain a foreign ONNX graph: its candidate target tensors and its head.

0. **The output** (:func:`choose_output`): the value named, else the first graph output
   ``[B, D]``; a classifier's trailing Softmax / LogSoftmax / Sigmoid is walked back through
   to its logits, an L2 normalisation is recognised, and an output with no image-level
   score (CTC, detection, segmentation) is refused in one line (:func:`describe_output`).
1. **Candidates** (:func:`find_target_tensors`): every float value whose data reaches the
   output and that holds feature maps as the torch explainers read them
   (:func:`fam_core.anatomy.layouts.detect_layout`): channel-first maps ``[B, C, h, w]``, token
   sequences ``[B, T, C]`` (leading class / register tokens dropped, the grid from the input
   size) and channel-last maps ``[B, h, w, C]``, with ``h * w > 1``, in the graph's
   topological order, with shapes from ONNX shape inference, or from one onnxruntime run
   where they are symbolic. A candidate that every path from the input to the output
   crosses is a *block* output.
2. **The automatic target** (:func:`choose_target`) is the torch side's rule
   (:mod:`fam_core.anatomy.discovery`): the last block output whose maps reach the output (for
   tokens: whose patch tokens do), i.e. the last map before global pooling of a CNN, and
   the output of the block before the last of a ViT read through its class token.
3. **The head** (:func:`head_graph`): the subgraph from the target to the output, as a
   model of its own (:mod:`fam_core.exporters.onnx_head` analyses it).

Example:
    >>> choose_target([Candidate("a", "Relu", (8, 4, 4)), Candidate("b", "Relu", (16, 2, 2))]).name
    'b'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from fam_core.anatomy.layouts import FeatureLayout, detect_layout
from fam_core.exporters.onnx_graph import (
    NO_DATA_OPS,
    data_ancestors,
    elem_types,
    float_value_shapes,
    make_session,
    producers_of,
    run_batch,
    sample_image,
    with_inferred_shapes,
)
from fam_core.exporters.onnx_load import (
    fixed_batch,
    image_input,
    input_channels,
    load_graph,
    resolve_input_size,
)
from fam_core.exporters.onnx_normalise import InputLayout, Normalised, normalise_graph
from fam_core.exporters.onnx_output import (
    OutputChoice,
    activation_fits,
    choose_output,
    describe_node,
    describe_output,
    format_shape,
    with_l2_norms_written_out,
)

__all__ = [
    "Candidate",
    "Graph",
    "OutputChoice",
    "analyse_graph",
    "choose_output",
    "choose_target",
    "describe_node",
    "describe_output",
    "format_shape",
    "find_target_tensors",
    "head_graph",
    "resolve_target",
    "sample_value",
    "with_l2_norms_written_out",
]


@dataclass(frozen=True)
class Candidate:
    """A value of the graph holding feature maps: a target tensor the head can explain.

    Attributes:
        name: the value's name in the graph.
        op_type: the operator that produces it.
        shape: the value's shape, the batch axis left out: ``(C, h, w)`` for channel-first
            maps, ``(T, C)`` for tokens, ``(h, w, C)`` for channel-last maps.
        layout: how it holds its maps (:mod:`fam_core.anatomy.layouts`: prefix tokens, grid).
        block: every path from the input to the output passes through it (a block's
            output, not a value inside a residual block): preferred as the target.

    Example:
        >>> str(Candidate("/layer4/Relu_output_0", "Relu", (64, 7, 7)))
        '/layer4/Relu_output_0  Relu  [B, 64, 7, 7]'
        >>> tokens = FeatureLayout("tokens", prefix=1, grid=(4, 4))
        >>> str(Candidate("/encoder/layer.0/Add_1_output_0", "Add", (17, 32), tokens, True))
        '/encoder/layer.0/Add_1_output_0  Add  [B, 17, 32]  tokens, 1 leading, grid 4x4  block'
    """

    name: str
    op_type: str
    shape: tuple[int, ...]
    layout: FeatureLayout = FeatureLayout("channels_first")
    block: bool = False

    @property
    def maps_shape(self) -> tuple[int, int, int]:
        """``(N, h, w)``: the maps ``A`` the explainers combine."""
        height, width = self.layout.grid
        if self.layout.kind == "channels_first":
            return (self.shape[0], self.shape[1], self.shape[2])
        return (self.shape[-1], height, width)

    def __str__(self) -> str:
        text = f"{self.name}  {self.op_type}  [B, {', '.join(str(s) for s in self.shape)}]"
        if self.layout.kind == "tokens":
            text += f"  tokens, {self.layout.prefix} leading, grid {self.layout.grid[0]}x{self.layout.grid[1]}"
        elif self.layout.kind == "channels_last":
            text += "  channels last"
        return text + ("  block" if self.block else "")


def _measured_shapes(
    proto: onnx.ModelProto, names: Sequence[str], size: tuple[int, int], batch: int
) -> dict[str, tuple[int, ...]]:
    """Shapes of ``names`` from one onnxruntime run on a sample image."""
    if not names:
        return {}
    session = make_session(proto, names)
    image = image_input(proto)
    images = sample_image(size, batch, channels=input_channels(image))
    values = session.run(list(names), {image.name: images})  # type: ignore[attr-defined]
    return {name: tuple(np.shape(array)) for name, array in zip(names, values, strict=True)}


@dataclass(frozen=True)
class Graph:
    """A loaded graph and what the graft needs to know about it."""

    proto: onnx.ModelProto  # shape-inferred
    source: str
    image: onnx.ValueInfoProto
    size: tuple[int, int]
    output: str  # the value explained: the logits before a trailing activation
    output_shape: tuple[int, ...]
    candidates: tuple[Candidate, ...]
    shapes: dict[str, tuple[int, ...]]  # measured / inferred shapes of candidates (batch 1)
    normalised: Normalised  # proto before shape inference, its backbone, the steps taken
    choice: OutputChoice | None = None  # how ``output`` relates to the graph's output
    outputs: tuple[tuple[str, tuple[int | None, ...] | None], ...] = ()  # every graph output


def analyse_graph(
    model: str | Path | onnx.ModelProto,
    input_size: int | Sequence[int] | None,
    output_name: str | None,
    layout: InputLayout | None = None,
    *,
    walk_back: bool = True,
) -> Graph:
    """Load ``model`` and find its image input, the output to explain (:func:`choose_output`;
    ``walk_back=False`` keeps a trailing Softmax / LogSoftmax / Sigmoid, as for embedding
    models, whose served output is what is compared) and the candidate target tensors.

    Raises a one-line ``ValueError`` (:func:`describe_output`) when the output is no
    image-level score ``[B, D]`` (CTC text recognition ``[B, T, C]``, detection boxes,
    segmentation ``[B, K, H, W]``).
    """
    proto, source = load_graph(model)
    normalised = normalise_graph(proto, layout=layout)
    proto = with_inferred_shapes(normalised.proto)
    image = image_input(proto)
    size = resolve_input_size(image, input_size)
    choice = choose_output(proto, output_name, walk_back=walk_back)
    batch = fixed_batch(image) or 1
    shapes = float_value_shapes(proto)
    types = elem_types(proto)
    ancestors = data_ancestors(proto, choice.declared)
    producers = producers_of(proto)
    ordered = [name for node in proto.graph.node for name in node.output if name in ancestors]
    graph_outputs = [value.name for value in proto.graph.output]
    # values whose C/h/w shape inference left symbolic (or untyped) are measured instead
    wanted = list(dict.fromkeys([*ordered, choice.explained, choice.declared]))
    unknown = [
        name
        for name in wanted
        if name not in shapes or (len(shapes[name]) in (2, 3, 4) and None in shapes[name][1:])
    ]
    unknown = [name for name in unknown if types.get(name, 0) in (0, TensorProto.FLOAT)]
    declared_dims = {value.name: _declared(value) for value in proto.graph.output}
    listed_unknown = [
        name
        for name in graph_outputs
        if name not in unknown and (declared_dims[name] is None or None in declared_dims[name][1:])
    ]
    try:  # the other outputs are listed, never needed: one that onnxruntime cannot return
        measured = _measured_shapes(proto, [*unknown, *listed_unknown], size, batch)
    except Exception:  # noqa: BLE001 - (a sequence, a map) is listed as declared
        measured = _measured_shapes(proto, unknown, size, batch)
    full: dict[str, tuple[int, ...]] = {}
    for name in wanted:
        if name in measured:
            full[name] = measured[name]
        elif name in shapes and None not in shapes[name][1:]:
            full[name] = (batch, *shapes[name][1:])  # type: ignore[arg-type]
    listed = tuple((name, measured.get(name, declared_dims[name])) for name in graph_outputs)
    if choice.explained != choice.declared and not activation_fits(
        producers, choice, full.get(choice.explained), full.get(choice.declared)
    ):  # an activation over no [B, D] (a CTC softmax per time step): refused as declared
        choice = OutputChoice(choice.declared, choice.declared)
    output = choice.explained
    output_shape = full.get(output)
    if output_shape is None or len(output_shape) != 2:
        message = describe_output(output, output_shape)
        if len(listed) > 1:
            message += "; the graph's outputs: " + ", ".join(
                f"{name!r} {format_shape(shape)}" for name, shape in listed
            )
        raise ValueError(message)
    ancestors = data_ancestors(proto, output)
    ordered = [name for name in ordered if name in ancestors]
    found = [(name, _layout(full[name], size)) for name in ordered if name in full]
    spatial = [
        (name, layout)
        for name, layout in found
        if layout is not None and not _flattened_map(producers[name], full)
    ]
    blocks = _dominators(proto, image.name, output, [name for name, _ in spatial])
    candidates = tuple(
        Candidate(name, producers[name].op_type, full[name][1:], layout, name in blocks)
        for name, layout in spatial
    )
    return Graph(
        proto,
        source,
        image,
        size,
        output,
        output_shape,
        candidates,
        full,
        normalised,
        choice,
        listed,
    )


def _declared(value: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    """A graph output's declared shape (``None`` for a symbolic axis), ``None`` if untyped."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)


def _layout(shape: tuple[int, ...], size: tuple[int, int]) -> FeatureLayout | None:
    """The layout of a value of ``shape`` (batch first) as the torch explainers read it
    (:func:`fam_core.anatomy.layouts.detect_layout`), with a spatial grid (``h * w > 1``); a 4-D
    value that fits no grid of the input is read channel-first, as before tokens existed."""
    if len(shape) not in (3, 4):
        return None
    layout = detect_layout(torch.empty(shape, device="meta"), size)
    if layout is None and len(shape) == 4:
        layout = FeatureLayout("channels_first", grid=(int(shape[2]), int(shape[3])))
    if layout is None or layout.grid[0] * layout.grid[1] <= 1:
        return None
    return layout


def _flattened_map(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether ``node`` flattens a channel-first map ``[B, C, h, w]`` to ``[B, C, h * w]``
    (before a pooling or a transpose to tokens): channels, not tokens, on its second axis."""
    if node.op_type not in ("Reshape", "Flatten") or not node.input:
        return False
    source, result = shapes.get(node.input[0]), shapes.get(node.output[0])
    return (
        source is not None
        and result is not None
        and len(source) == 4
        and len(result) == 3
        and result[1:] == (source[1], source[2] * source[3])
    )


def _dominators(proto: onnx.ModelProto, source: str, sink: str, names: Sequence[str]) -> set[str]:
    """The values of ``names`` that every data path from ``source`` to ``sink`` crosses.

    A residual block's output is one; a value inside the block is not (the skip connection
    avoids it): the ONNX counterpart of the building blocks that
    :func:`fam_core.anatomy.discovery.find_layers` prefers.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        if node.op_type in NO_DATA_OPS:
            continue
        for given in node.input:
            consumers.setdefault(given, []).append(node)
    found: set[str] = set()
    for avoided in names:
        seen, stack = {source}, [source]
        while stack and sink not in seen:
            for node in consumers.get(stack.pop(), ()):
                for produced in node.output:
                    if produced and produced != avoided and produced not in seen:
                        seen.add(produced)
                        stack.append(produced)
        if sink not in seen:
            found.add(avoided)
    return found


def find_target_tensors(
    model: str | Path | onnx.ModelProto,
    input_size: int | Sequence[int] | None = None,
    *,
    output_name: str | None = None,
) -> list[Candidate]:
    """The feature maps ``[B, C, h, w]`` (``h * w > 1``) whose data reaches the output.

    In the graph's topological (dataflow) order; :func:`choose_target` picks the last one.
    ``input_size`` ``(H, W)`` is needed only when the graph's input size is dynamic;
    ``output_name`` defaults to the first graph output of rank 2 (``[B, D]``).

    Example:
        >>> [c.shape for c in find_target_tensors("resnet18.onnx")][-1]  # doctest: +SKIP
        (512, 7, 7)
    """
    return list(analyse_graph(model, input_size, output_name).candidates)


def choose_target(
    candidates: Sequence[Candidate], reaches: Callable[[Candidate], bool] | None = None
) -> Candidate:
    """The automatic target, by the rule of :func:`fam_core.anatomy.discovery.find_layers`: the last
    block output (:attr:`Candidate.block`) whose maps reach the output, else the last
    candidate whose maps do. ``reaches`` tells whether a candidate's maps (a token
    sequence's patches, not its class token) reach the output (default: all do).

    For a CNN that is the last map before global pooling; for a vision transformer read
    through its class token, the output of the block before the last (the last block's
    patch tokens never reach the class token).

    Example:
        >>> choose_target([Candidate("a", "Relu", (8, 4, 4)), Candidate("b", "Relu", (16, 2, 2))]).name
        'b'
    """
    if not candidates:
        raise ValueError(
            "the graph has no feature map [B, C, h, w], token sequence [B, T, C] or "
            "channel-last map [B, h, w, C] (h * w > 1) on the path to its output"
        )
    check = reaches or (lambda _candidate: True)
    for group in ([c for c in candidates if c.block], list(candidates)):
        for candidate in reversed(group):
            if check(candidate):
                return candidate
    raise ValueError(
        "no candidate target tensor's maps reach the output: pass target_tensor= "
        f"(candidates: {[c.name for c in candidates]})"
    )


def _reaches(graph: Graph) -> Callable[[Candidate], bool]:
    """Whether a candidate's maps reach the output: always for maps; for tokens, when a
    change of the patch tokens alone (the leading tokens kept) changes the output."""

    def check(candidate: Candidate) -> bool:
        if candidate.layout.kind != "tokens":
            return True
        try:
            head = head_graph(graph, candidate.name)
        except ValueError:
            return False
        sample = sample_value(graph, candidate.name)[:1]
        noise = np.random.default_rng(3).standard_normal(sample.shape).astype(np.float32)
        noise[:, : candidate.layout.prefix] = 0.0
        moved = sample + noise * max(float(sample.std()), 1e-3)
        session = make_session(head)
        before, after = (run_batch(session, candidate.name, x)[0] for x in (sample, moved))
        return bool(np.abs(after - before).max() > 1e-6 * max(float(np.abs(before).max()), 1.0))

    return check


def sample_value(graph: Graph, name: str, batch: int = 1) -> np.ndarray:
    """The value ``name`` on sample images (item by item where the graph fixes the batch)."""
    session = make_session(graph.proto, [name])
    images = sample_image(graph.size, batch, channels=input_channels(graph.image))
    return run_batch(session, graph.image.name, images, [name])[0]


def resolve_target(graph: Graph, target_tensor: str | None) -> Candidate:
    if target_tensor is None:
        if not graph.candidates:
            raise ValueError(
                f"output {graph.output!r} [B, {graph.output_shape[1]}] is computed from no "
                "feature map [B, C, h, w], token sequence [B, T, C] or channel-last map "
                "[B, h, w, C] (h * w > 1): fam-core explains a score through such maps; "
                "name another output with output: (output_name=)"
            )
        return choose_target(graph.candidates, _reaches(graph))
    for candidate in graph.candidates:
        if candidate.name == target_tensor:
            return candidate
    if target_tensor not in producers_of(graph.proto):
        raise ValueError(
            f"target_tensor {target_tensor!r} is not a value of the graph; candidates are "
            f"{[c.name for c in graph.candidates]}"
        )
    shape = graph.shapes.get(target_tensor)
    if target_tensor not in data_ancestors(graph.proto, graph.output):
        raise ValueError(
            f"target_tensor {target_tensor!r} does not reach the output {graph.output!r}"
        )
    raise ValueError(
        f"target_tensor {target_tensor!r} is not a feature map [B, C, h, w], a token "
        "sequence [B, T, C] or a channel-last map [B, h, w, C] with a grid h * w > 1 "
        "covering the input "
        f"(its shape is {shape}); candidates are {[c.name for c in graph.candidates]}"
    )


def head_graph(graph: Graph, target: str) -> onnx.ModelProto:
    """The subgraph from ``target`` to the output, as a model with one input ``target``."""
    proto = graph.proto
    producers = producers_of(proto)
    graph_inputs = {value.name for value in proto.graph.input}
    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    needed: set[int] = set()
    used_initializers: set[str] = set()
    index = {id(node): position for position, node in enumerate(proto.graph.node)}
    stack, seen = [graph.output], set()
    while stack:
        name = stack.pop()
        if name in seen or name == target or not name:
            continue
        seen.add(name)
        if name in initializers:
            used_initializers.add(name)
            continue
        node = producers.get(name)
        if node is None:
            if name in graph_inputs:
                raise ValueError(
                    f"the output {graph.output!r} depends on the input {name!r} through a path "
                    f"that avoids target_tensor {target!r}: choose a later target tensor"
                )
            continue
        needed.add(index[id(node)])
        stack.extend(node.input)
    nodes = [proto.graph.node[position] for position in sorted(needed)]
    head = helper.make_graph(
        nodes,
        "head",
        [
            helper.make_tensor_value_info(
                target, TensorProto.FLOAT, ["batch", *graph.shapes[target][1:]]
            )
        ],
        [
            helper.make_tensor_value_info(
                graph.output, TensorProto.FLOAT, ["batch", graph.output_shape[1]]
            )
        ],
        initializer=[initializers[name] for name in sorted(used_initializers)],
    )
    model = helper.make_model(head, opset_imports=list(proto.opset_import))
    model.ir_version = proto.ir_version
    model.functions.extend(proto.functions)
    return with_l2_norms_written_out(model)
