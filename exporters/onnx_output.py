"""The output a graft explains: the graph output, the logits behind its activation, an L2
normalisation inside the graph, and the one-line refusal of outputs with no image-level score.

Exporters write classifiers whose output is ``Softmax`` / ``LogSoftmax`` / ``Sigmoid`` of the
logits (PaddlePaddle adds an ``Identity`` after it), embeddings normalised by
``ReduceL2 -> Div`` or ``LpNormalization``, several outputs (logits + features), and models
whose output is no image-level score at all (CTC ``[B, T, C]``, detection boxes,
segmentation ``[B, K, H, W]``). :func:`choose_output` reads the structure,
:func:`describe_output` refuses, :func:`describe_node` names operators in messages.

Example:
    >>> describe_output("segments", (1, 4, 64, 64)).split(":")[0]
    "output 'segments' is [B, 4, 64, 64] (a score per pixel, as segmentation models write)"
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fam_core.exporters.onnx_graph import producers_of

__all__ = [
    "ACTIVATIONS",
    "PASS_THROUGH",
    "OutputChoice",
    "activation_fits",
    "choose_output",
    "describe_node",
    "describe_output",
    "format_shape",
    "with_l2_norms_written_out",
]


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
    """The output a graft explains (structure only;
    :func:`~fam_core.exporters.onnx_dataflow.analyse_graph` checks shapes).

    ``output_name`` wins as given. Without it: the first graph output of rank 2
    (``[B, D]``), else the first output (refused later, naming its shape); with
    ``walk_back``, a trailing Softmax / LogSoftmax / Sigmoid (also behind Identity,
    Reshape, Flatten, Squeeze) is walked back through: its input, the logits, is explained.

    Example:
        >>> from onnx import TensorProto
        >>> nodes = [helper.make_node("Softmax", ["z"], ["p"], name="soft")]
        >>> graph = helper.make_graph(nodes, "g",
        ...     [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", 3])],
        ...     [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["b", 3])])
        >>> choice = choose_output(helper.make_model(graph), None)
        >>> choice.explained, choice.activation
        ('z', 'softmax')
    """
    names = [value.name for value in proto.graph.output]
    if not names:
        raise ValueError("the graph has no output: fam-core explains an image-level score [B, D]")
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


def activation_fits(
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


_NORM_OPS = ("ReduceL2", "ReduceSumSquare", "LpNormalization")


def with_l2_norms_written_out(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its L2 norms written as ``Sqrt(ReduceSum(x * x))``: ReduceL2,
    ReduceSumSquare and LpNormalization (p = 2, ``x / ||x||``), the same values in the
    operators the head's torch interpreter runs (:mod:`fam_core.exporters.onnx_torch`).

    Example:
        >>> from onnx import TensorProto
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
