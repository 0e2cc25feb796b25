"""Where to explain a foreign ONNX graph: its candidate target tensors and its head.

1. **Candidates** (:func:`find_target_tensors`): every float value whose data reaches the
   output and that holds feature maps as the torch explainers read them
   (:func:`fam_core.layouts.detect_layout`): channel-first maps ``[B, C, h, w]``, token
   sequences ``[B, T, C]`` (leading class / register tokens dropped, the grid from the input
   size) and channel-last maps ``[B, h, w, C]``, with ``h * w > 1``, in the graph's
   topological order, with shapes from ONNX shape inference, or from one onnxruntime run
   where they are symbolic. A candidate that every path from the input to the output
   crosses is a *block* output.
2. **The automatic target** (:func:`choose_target`) is the torch side's rule
   (:mod:`fam_core.discovery`): the last block output whose maps reach the output (for
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
from onnx import TensorProto, helper, numpy_helper

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
from fam_core.exporters.onnx_load import fixed_batch, image_input, load_graph, resolve_input_size
from fam_core.layouts import FeatureLayout, detect_layout

__all__ = [
    "ACTIVATIONS",
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
        layout: how it holds its maps (:mod:`fam_core.layouts`: prefix tokens, grid).
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


ACTIVATIONS = {"Softmax": "softmax", "LogSoftmax": "log_softmax", "Sigmoid": "sigmoid"}
"""Trailing activations of a classifier's logits, walked back through to explain the logits."""

PASS_THROUGH = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Dropout")
"""Operators between an activation and the graph output that keep its values."""


@dataclass(frozen=True)
class OutputChoice:
    """The value a graft explains, and how it relates to the graph output.

    Attributes:
        declared: the graph output chosen (the first ``[B, D]`` one), or the value named by
            ``output_name=``.
        explained: the value explained: the input of a trailing Softmax / LogSoftmax /
            Sigmoid of ``declared`` (the logits), else ``declared`` itself.
        activation: ``"softmax"``, ``"log_softmax"`` or ``"sigmoid"``: what the graph applies
            after ``explained``; ``None`` when ``explained`` is the output.
        activation_node: the activation node, named as :func:`describe_node` names nodes.
        normalisation: the operators that L2-normalise ``explained`` inside the graph (e.g.
            ``"ReduceL2 -> Div"``), ``None`` when it is not normalised.

    Example:
        >>> OutputChoice("prob", "logits", "softmax", "'fc/Softmax' (Softmax)").note
        "the logits before 'fc/Softmax' (Softmax)"
    """

    declared: str
    explained: str
    activation: str | None = None
    activation_node: str | None = None
    normalisation: str | None = None

    @property
    def note(self) -> str:
        """What the explained value is, in a few words ('' for a plain output)."""
        if self.activation is not None:
            return f"the logits before {self.activation_node or self.activation}"
        if self.normalisation is not None:
            return f"L2-normalised in the graph ({self.normalisation}): explained as served"
        return ""


def describe_node(node: onnx.NodeProto) -> str:
    """A node as messages name it: its name and its operator, never a made-up name.

    Example:
        >>> describe_node(helper.make_node("Softmax", ["x"], ["y"], name="p2o.Softmax.0"))
        "'p2o.Softmax.0' (Softmax)"
        >>> describe_node(helper.make_node("Softmax", ["x"], ["probabilities"]))
        "the Softmax writing 'probabilities'"
    """
    if node.name:
        return f"{node.name!r} ({node.op_type})"
    return f"the {node.op_type} writing {node.output[0]!r}"


def choose_output(
    proto: onnx.ModelProto, output_name: str | None, *, walk_back: bool = True
) -> OutputChoice:
    """The output a graft explains (structure only; :func:`analyse_graph` checks shapes).

    ``output_name`` wins as given. Without it: the first graph output of rank 2
    (``[B, D]``), else the first output (refused later, naming its shape); with
    ``walk_back``, a trailing Softmax / LogSoftmax / Sigmoid (also behind Identity,
    Reshape, Flatten, Squeeze) is walked back through: its input, the logits, is explained.

    Example:
        >>> nodes = [helper.make_node("Softmax", ["z"], ["p"], name="soft")]
        >>> graph = helper.make_graph(nodes, "g",
        ...     [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", 3])],
        ...     [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["b", 3])])
        >>> choice = choose_output(helper.make_model(graph), None)
        >>> choice.explained, choice.activation
        ('z', 'softmax')
    """
    names = [value.name for value in proto.graph.output]
    if output_name is not None:
        if output_name not in names and output_name not in producers_of(proto):
            raise ValueError(
                f"output {output_name!r} is not a value of the graph; its outputs are {names}"
            )
        return OutputChoice(
            output_name, output_name, normalisation=_normalisation(proto, output_name)
        )
    ranked = [
        value.name for value in proto.graph.output if len(value.type.tensor_type.shape.dim) == 2
    ]
    declared = ranked[0] if ranked else names[0]
    if walk_back:
        found = _trailing_activation(proto, declared)
        if found is not None:
            logits, node = found
            return OutputChoice(
                declared,
                logits,
                ACTIVATIONS[node.op_type],
                describe_node(node),
                _normalisation(proto, logits),
            )
    return OutputChoice(declared, declared, normalisation=_normalisation(proto, declared))


def _skip_pass_through(producers: dict[str, onnx.NodeProto], name: str) -> str:
    """``name`` followed back through the operators that keep its values."""
    node = producers.get(name)
    while node is not None and node.op_type in PASS_THROUGH and node.input:
        name = node.input[0]
        node = producers.get(name)
    return name


def _trailing_activation(proto: onnx.ModelProto, output: str) -> tuple[str, onnx.NodeProto] | None:
    """``(logits, activation node)`` when ``output`` is a Softmax / LogSoftmax / Sigmoid of a
    value (through pass-through operators), ``None`` otherwise."""
    producers = producers_of(proto)
    node = producers.get(_skip_pass_through(producers, output))
    if node is None or node.op_type not in ACTIVATIONS or not node.input:
        return None
    return node.input[0], node


def _normalisation(proto: onnx.ModelProto, output: str) -> str | None:
    """The operators that L2-normalise ``output`` in the graph (``x / ||x||``): an
    LpNormalization (p=2), or Div / Mul-by-Reciprocal of ``x`` by ``ReduceL2(x)`` or
    ``Sqrt(ReduceSum(x * x))`` (``ReduceSumSquare``, ``Pow(x, 2)``), with a Max / Clip /
    Add epsilon and Expand / Reshape in between; ``None`` when it is none of these."""
    producers = producers_of(proto)
    node = producers.get(_skip_pass_through(producers, output))
    if node is None:
        return None
    if node.op_type == "LpNormalization":
        p = next((a.i for a in node.attribute if a.name == "p"), 2)
        return "LpNormalization" if p == 2 else None
    if node.op_type == "Div" and len(node.input) == 2:
        source, norm = node.input
        reciprocal = ""
    elif node.op_type == "Mul" and len(node.input) == 2:
        pair = [(a, producers.get(b)) for a, b in (node.input, node.input[::-1])]
        found = [(a, n) for a, n in pair if n is not None and n.op_type == "Reciprocal"]
        if not found:
            return None
        source, norm = found[0][0], found[0][1].input[0]
        reciprocal = "Reciprocal, "
    else:
        return None
    chain = _norm_of(producers, norm, source)
    if chain is None:
        return None
    return " -> ".join([*chain, f"{reciprocal}{node.op_type}"])


_EPSILON_OPS = ("Max", "Clip", "Add", "Expand", "Reshape", "Unsqueeze", "Identity", "Cast")


def _norm_of(producers: dict[str, onnx.NodeProto], name: str, source: str) -> list[str] | None:
    """The operators computing ``||source||`` into ``name``, ``None`` if they do not."""
    chain: list[str] = []
    node = producers.get(name)
    while node is not None and node.op_type in _EPSILON_OPS and node.input:
        chain.append(node.op_type)
        node = producers.get(node.input[0])
    if node is None:
        return None
    if node.op_type == "ReduceL2" and node.input[0] == source:
        return ["ReduceL2", *reversed(chain)]
    if node.op_type != "Sqrt" or not node.input:
        return None
    total = producers.get(node.input[0])
    if total is None or not total.input:
        return None
    if total.op_type == "ReduceSumSquare" and total.input[0] == source:
        return ["ReduceSumSquare", "Sqrt", *reversed(chain)]
    square = producers.get(total.input[0]) if total.op_type == "ReduceSum" else None
    if square is None:
        return None
    if square.op_type == "Mul" and list(square.input) == [source, source]:
        return ["Mul", "ReduceSum", "Sqrt", *reversed(chain)]
    if square.op_type == "Pow" and square.input[0] == source:
        return ["Pow", "ReduceSum", "Sqrt", *reversed(chain)]
    return None


def describe_output(name: str, shape: Sequence[int | None] | None) -> str:
    """One line refusing an output that is no image-level score ``[B, D]``: its shape,
    what such outputs hold, and what fam-core expects instead.

    Example:
        >>> describe_output("logits", (1, 25, 97))
        "output 'logits' is [B, 25, 97] (a score per time step or per box, as CTC text recognisers and detectors write): fam-core explains an image-level score [B, D] (an embedding or logits); name one with output: (output_name=)"
    """
    if shape is None:
        dims, kind = "of unknown shape", "(onnxruntime gave it no tensor shape)"
    else:
        dims = format_shape(shape)
        kinds = {
            0: "(a scalar, no batch axis)",
            1: "(one value per image, no classes or embedding axis)",
            3: "(a score per time step or per box, as CTC text recognisers and detectors write)",
            4: "(a score per pixel, as segmentation models write)",
        }
        kind = kinds.get(len(shape), f"(a rank-{len(shape)} tensor)")
    return (
        f"output {name!r} is {dims} {kind}: fam-core explains an image-level score [B, D] "
        "(an embedding or logits); name one with output: (output_name=)"
    )


def _measured_shapes(
    proto: onnx.ModelProto, names: Sequence[str], size: tuple[int, int], batch: int
) -> dict[str, tuple[int, ...]]:
    """Shapes of ``names`` from one onnxruntime run on a sample image."""
    if not names:
        return {}
    session = make_session(proto, names)
    image = image_input(proto).name
    values = session.run(list(names), {image: sample_image(size, batch)})  # type: ignore[attr-defined]
    return {name: tuple(array.shape) for name, array in zip(names, values, strict=True)}


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
    choice: OutputChoice | None = None  # how ``output`` relates to the graph's output
    outputs: tuple[tuple[str, tuple[int | None, ...] | None], ...] = ()  # every graph output


def analyse_graph(
    model: str | Path | onnx.ModelProto,
    input_size: int | Sequence[int] | None,
    output_name: str | None,
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
    proto = with_inferred_shapes(proto)
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
    unknown += [
        name
        for name in graph_outputs
        if name not in unknown and (declared_dims[name] is None or None in declared_dims[name][1:])
    ]
    measured = _measured_shapes(proto, unknown, size, batch)
    full: dict[str, tuple[int, ...]] = {}
    for name in wanted:
        if name in measured:
            full[name] = measured[name]
        elif name in shapes and None not in shapes[name][1:]:
            full[name] = (batch, *shapes[name][1:])  # type: ignore[arg-type]
    listed = tuple((name, measured.get(name, declared_dims[name])) for name in graph_outputs)
    if choice.explained != choice.declared and not _activation_fits(
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
    return Graph(proto, source, image, size, output, output_shape, candidates, full, choice, listed)


def _declared(value: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    """A graph output's declared shape (``None`` for a symbolic axis), ``None`` if untyped."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)


def format_shape(shape: Sequence[int | None] | None) -> str:
    """``[B, 25, 97]``: a shape (batch first) with its batch axis named.

    Example:
        >>> format_shape((1, 25, None))
        '[B, 25, ?]'
    """
    if shape is None:
        return "[?]"
    if not shape:
        return "[]"
    return "[" + ", ".join(["B", *("?" if d is None else str(d) for d in shape[1:])]) + "]"


def _activation_fits(
    producers: dict[str, onnx.NodeProto],
    choice: OutputChoice,
    logits: tuple[int, ...] | None,
    declared: tuple[int, ...] | None,
) -> bool:
    """Whether the walked-back activation maps logits ``[B, D]`` to the output ``[B, D]``
    (a Softmax over the class axis, not over the batch)."""
    if logits is None or declared is None or len(logits) != 2 or len(declared) != 2:
        return False
    if logits[1] != declared[1]:
        return False
    node = producers[_skip_pass_through(producers, choice.declared)]
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    return node.op_type == "Sigmoid" or axis in (1, -1)


def _layout(shape: tuple[int, ...], size: tuple[int, int]) -> FeatureLayout | None:
    """The layout of a value of ``shape`` (batch first) as the torch explainers read it
    (:func:`fam_core.layouts.detect_layout`), with a spatial grid (``h * w > 1``); a 4-D
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
    :func:`fam_core.discovery.find_layers` prefers.
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
    """The automatic target, by the rule of :func:`fam_core.discovery.find_layers`: the last
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
    images = sample_image(graph.size, batch)
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


_NORM_OPS = ("ReduceL2", "ReduceSumSquare", "LpNormalization")


def with_l2_norms_written_out(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its L2 norms written as ``Sqrt(ReduceSum(x * x))``: ReduceL2,
    ReduceSumSquare and LpNormalization (p = 2, ``x / ||x||``), the same values in the
    operators the head's torch interpreter runs (:mod:`fam_core.exporters.onnx_torch`).

    Example:
        >>> node = helper.make_node("LpNormalization", ["z"], ["e"], axis=1, p=2)
        >>> graph = helper.make_graph([node], "g",
        ...     [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", 3])],
        ...     [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["b", 3])])
        >>> model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        >>> [n.op_type for n in with_l2_norms_written_out(model).graph.node]
        ['Mul', 'ReduceSum', 'Sqrt', 'Div']
    """
    if not any(node.op_type in _NORM_OPS for node in model.graph.node):
        return model
    opset = next(
        (entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 17
    )
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    for position, node in enumerate(model.graph.node):
        if node.op_type not in _NORM_OPS or (
            node.op_type == "LpNormalization"
            and next((a.i for a in node.attribute if a.name == "p"), 2) != 2
        ):
            nodes.append(node)
            continue
        stem = f"{node.name or node.op_type}/l2_{position}"
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "LpNormalization":
            axes, keepdims, given = [int(attributes.get("axis", -1))], 1, None
        else:
            axes, keepdims = attributes.get("axes"), int(attributes.get("keepdims", 1))
            given = node.input[1] if len(node.input) > 1 and node.input[1] else None
        square, total = f"{stem}/square", f"{stem}/sum"
        nodes.append(helper.make_node("Mul", [node.input[0], node.input[0]], [square]))
        options: dict[str, object] = {"keepdims": keepdims}
        if "noop_with_empty_axes" in attributes:
            options["noop_with_empty_axes"] = attributes["noop_with_empty_axes"]
        inputs = [square]
        if given is not None:
            inputs.append(given)
        elif axes is not None and opset >= 13:
            axes_name = f"{stem}/axes"
            rewritten.graph.initializer.append(
                numpy_helper.from_array(np.asarray(axes, dtype=np.int64), axes_name)
            )
            inputs.append(axes_name)
        elif axes is not None:
            options["axes"] = list(axes)
        if node.op_type == "ReduceSumSquare":
            nodes.append(helper.make_node("ReduceSum", inputs, list(node.output), **options))
            continue
        nodes.append(helper.make_node("ReduceSum", inputs, [total], **options))
        if node.op_type == "ReduceL2":
            nodes.append(helper.make_node("Sqrt", [total], list(node.output), name=node.name))
            continue
        norm = f"{stem}/norm"
        nodes.append(helper.make_node("Sqrt", [total], [norm]))
        nodes.append(
            helper.make_node("Div", [node.input[0], norm], list(node.output), name=node.name)
        )
    del rewritten.graph.node[:]
    rewritten.graph.node.extend(nodes)
    return rewritten
