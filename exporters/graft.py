"""Graft an explanation head onto ANY ONNX graph: files that fam-core did not write.

A model exported by someone else (``torch.onnx.export`` with default names, another
framework) has no hook and no metadata. :func:`graft_onnx` finds, in its dataflow, the
feature map to explain (the *target tensor*) and the head between it and the output, and
appends :class:`~fam_core.exporters.heads.ExplanationHead` (the same maths as ``fam export``: it is
exported from torch on its own and merged with :func:`onnx.compose.merge_models`). The
result follows :mod:`fam_core.onnx_format` (input ``image``, outputs ``embedding`` /
``logits``, ``scores``, ``heatmap``...; the same metadata as :func:`fam_core.exporters.export_model`)
so :class:`~fam_core.onnx_runtime.OnnxExplainer` and the servers run it unchanged.

Steps:

1. **Candidates** (:func:`find_target_tensors`): every float value whose data reaches the
   output and that holds feature maps as the torch explainers read them
   (:func:`fam_core.layouts.detect_layout`): channel-first maps ``[B, C, h, w]``, token
   sequences ``[B, T, C]`` (leading class / register tokens dropped, the grid from the input
   size) and channel-last maps ``[B, h, w, C]``, with ``h * w > 1``, in the graph's
   topological order, with shapes from ONNX shape inference, or from one onnxruntime run
   where they are symbolic. A candidate that every path from the input to the output
   crosses is a *block* output. The automatic target (:func:`choose_target`) is the torch
   side's rule (:mod:`fam_core.discovery`): the last block output whose maps reach the
   output (for tokens: whose patch tokens do), i.e. the last map before global pooling of a
   CNN, and the output of the block before the last of a ViT read through its class token.
2. **Head** (:func:`analyse_head`): the subgraph from the target to the output. For a
   channel-first target it is probed with onnxruntime: invariant to a permutation of the
   spatial positions and affine (``h(A + B) - h(B) = h(A) - h(0)`` and
   ``h(-A) - h(0) = h(0) - h(A)`` to 1e-4 relative), i.e. global average pooling then an
   affine map ``z = W mean(A) + b``; ``W`` ``[J, N]`` and ``b`` come from running it on
   constant-per-channel maps. Any other head (and every token or channel-last target) is
   interpreted in torch (:mod:`fam_core.exporters.onnx_torch`) and explained by the
   library's explainer (:mod:`fam_core.exporters.interpreted`): a linear head found from the
   dataflow, or the head's exact per-sample Jacobian (``nonlinear_head="jacobian"``, the
   default; ``"error"`` refuses it, naming the first non-affine node).
3. **Graft** (:func:`graft_onnx`): FAM eq. 16-18 with that ``W`` (or Grad-FAM, CAM,
   Grad-CAM), merged after the target and the output; or the interpreted explanation,
   traced and exported as :func:`~fam_core.exporters.export.export_model` exports non-linear
   heads, merged after the target (the foreign head is dropped). The metadata key ``head``
   says which: ``identity``, ``linear`` or ``jacobian``.

Example:
    >>> import io, warnings
    >>> from fam_core.models.backbones import conv4
    >>> from fam_core.onnx_runtime import OnnxExplainer
    >>> buffer = io.BytesIO()
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     torch.onnx.export(conv4(width=0.25).eval(), (torch.rand(1, 3, 32, 32),), buffer,
    ...                       dynamo=False)
    >>> foreign = onnx.load_from_string(buffer.getvalue())
    >>> inspect_onnx(foreign).chosen.shape
    (16, 2, 2)
    >>> grafted = graft_onnx(foreign, method="fam")
    >>> [value.name for value in grafted.graph.output]
    ['embedding', 'scores', 'heatmap', 'heatmap_lowres', 'weights']
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from fam_core import onnx_format as fmt
from fam_core.exporters.export import _set_output_shapes, document
from fam_core.exporters.heads import ExplainMode, ExplanationHead
from fam_core.layouts import FeatureLayout, detect_layout
from fam_core.models.store import IMAGENET_MEAN, IMAGENET_STD
from fam_core.similarity import SimilarityKind

__all__ = [
    "AffineHead",
    "Candidate",
    "Inspection",
    "analyse_head",
    "choose_target",
    "find_target_tensors",
    "graft_onnx",
    "inspect_onnx",
]

Task = Literal["embedding", "classifier"]
RTOL = 1e-4  # relative tolerance of the head probes
_PREFIX = "model/"  # the foreign graph's names, so they cannot clash with the format's
_NO_DATA_OPS = ("Shape", "Size")  # ops whose output does not depend on their input's values
_HEAD_INPUTS = ("activations", "outputs")
_MIN_OPSET, _MAX_OPSET = 14, 20  # what torch.onnx.export(dynamo=False) writes the head in


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


@dataclass(frozen=True)
class AffineHead:
    """The head ``z = W mean_hw(A) + b`` found between a target tensor and an output.

    Attributes:
        matrix: ``W`` ``[J, N]`` float32.
        bias: ``b`` ``[J]`` float32.
        nodes: the op types of the head's nodes, in order.

    Example:
        >>> head = AffineHead(np.eye(2, dtype=np.float32), np.zeros(2, np.float32), ("GlobalAveragePool",))
        >>> head.is_identity, str(head)
        (True, 'global average pooling (GlobalAveragePool), no transform: z = mean(A)')
    """

    matrix: np.ndarray
    bias: np.ndarray
    nodes: tuple[str, ...]

    @property
    def is_identity(self) -> bool:
        """``W`` is the identity and ``b`` zero: the output is the pooled map itself."""
        rows, columns = self.matrix.shape
        return (
            rows == columns
            and bool(np.array_equal(self.matrix, np.eye(rows, dtype=self.matrix.dtype)))
            and not self.bias.any()
        )

    def __str__(self) -> str:
        ops = ", ".join(dict.fromkeys(self.nodes))
        if self.is_identity:
            return f"global average pooling ({ops}), no transform: z = mean(A)"
        rows, columns = self.matrix.shape
        return (
            f"global average pooling + affine map [{rows} x {columns}] ({ops}): z = W mean(A) + b"
        )


@dataclass(frozen=True)
class Inspection:
    """What :func:`inspect_onnx` finds in a graph; ``str()`` prints it for ``fam inspect``."""

    source: str
    input_name: str
    input_size: tuple[int, int]
    output_name: str
    output_dim: int
    candidates: tuple[Candidate, ...]
    chosen: Candidate
    head: AffineHead | None
    head_error: str | None
    head_kind: str | None = None  # an interpreted head: "identity", "linear" or "jacobian"
    head_detail: str | None = None

    def __str__(self) -> str:
        height, width = self.input_size
        lines = [
            f"ONNX graph {self.source}",
            f"input   {self.input_name}  [B, 3, {height}, {width}]",
            f"output  {self.output_name}  [B, {self.output_dim}]",
            f"candidate target tensors ({len(self.candidates)}, in dataflow order):",
        ]
        for candidate in self.candidates:
            mark = "*" if candidate == self.chosen else " "
            lines.append(f"  {mark} {candidate}")
        lines.append(f"chosen target tensor: {self.chosen.name}")
        if self.head is not None:
            lines.append(f"head: {self.head}")
        elif self.head_kind is not None:
            lines.append(f"head: {self.head_kind}: {self.head_detail}")
        else:
            lines.append(f"head: cannot be grafted: {self.head_error}")
        return "\n".join(lines)


# -- loading and the graph's interface


def _load(model: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy, model.graph.name or "model"
    if not isinstance(model, str | Path):
        raise TypeError(f"model must be an ONNX file path or onnx.ModelProto, got {type(model)}")
    path = Path(model)
    if not path.is_file():
        raise OSError(f"no such ONNX file: {path}")
    return onnx.load(str(path)), path.stem


def _image_input(proto: onnx.ModelProto) -> onnx.ValueInfoProto:
    initializers = {tensor.name for tensor in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(
            f"the graph must take one input (images [B, 3, H, W]), it takes {len(inputs)}: "
            f"{[value.name for value in inputs]}"
        )
    value = inputs[0]
    tensor = value.type.tensor_type
    if tensor.elem_type != TensorProto.FLOAT or len(tensor.shape.dim) != 4:
        raise ValueError(f"the graph's input {value.name!r} must be float32 [B, 3, H, W]")
    channels = tensor.shape.dim[1]
    if channels.HasField("dim_value") and channels.dim_value != 3:
        raise ValueError(
            f"the graph's input {value.name!r} has {channels.dim_value} channels, not 3"
        )
    return value


def _input_size(
    value: onnx.ValueInfoProto, input_size: int | Sequence[int] | None
) -> tuple[int, int]:
    dims = value.type.tensor_type.shape.dim
    fixed = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims[2:])
    if input_size is None:
        if None in fixed:
            raise ValueError(
                f"the graph's input {value.name!r} has a dynamic height/width: pass input_size=(H, W)"
            )
        return (int(fixed[0]), int(fixed[1]))  # type: ignore[arg-type]
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"input_size must be a positive int or (H, W), got {input_size!r}")
    for given, extent in zip(size, fixed, strict=True):
        if extent is not None and extent != given:
            raise ValueError(
                f"input_size {size} does not match the graph's fixed input size "
                f"{tuple(fixed)} ({value.name!r})"
            )
    return size  # type: ignore[return-value]


def _sample_image(size: tuple[int, int], batch: int = 1, seed: int = 0) -> np.ndarray:
    generator = np.random.default_rng(seed)
    return generator.standard_normal((batch, 3, *size)).astype(np.float32)


def _fixed_batch(value: onnx.ValueInfoProto) -> int | None:
    first = value.type.tensor_type.shape.dim[0]
    return int(first.dim_value) if first.HasField("dim_value") else None


def _session(proto: onnx.ModelProto, outputs: Sequence[str] = ()) -> object:
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


def _float_values(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
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


def _producers(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in proto.graph.node for name in node.output if name}


def _data_ancestors(proto: onnx.ModelProto, output: str) -> set[str]:
    """Values whose data reaches ``output`` (edges into Shape/Size carry none)."""
    producers = _producers(proto)
    seen: set[str] = set()
    stack = [output]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producers.get(name)
        if node is None or node.op_type in _NO_DATA_OPS:
            continue
        stack.extend(given for given in node.input if given)
    return seen


def _choose_output(proto: onnx.ModelProto, output_name: str | None) -> str:
    names = [value.name for value in proto.graph.output]
    if output_name is not None:
        if output_name not in names and output_name not in _producers(proto):
            raise ValueError(
                f"output {output_name!r} is not a value of the graph; its outputs are {names}"
            )
        return output_name
    ranked = [
        value.name for value in proto.graph.output if len(value.type.tensor_type.shape.dim) == 2
    ]
    if not ranked:
        raise ValueError(
            f"none of the graph's outputs {names} is [B, D]: pass output_name= the value "
            "that holds the embedding or the logits"
        )
    return ranked[0]


def _inferred(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - an unknown op stops inference; onnxruntime measures instead
        return proto


def _measured_shapes(
    proto: onnx.ModelProto, names: Sequence[str], size: tuple[int, int], batch: int
) -> dict[str, tuple[int, ...]]:
    """Shapes of ``names`` from one onnxruntime run on a sample image."""
    if not names:
        return {}
    session = _session(proto, names)
    image = _image_input(proto).name
    values = session.run(list(names), {image: _sample_image(size, batch)})  # type: ignore[attr-defined]
    return {name: tuple(array.shape) for name, array in zip(names, values, strict=True)}


@dataclass(frozen=True)
class _Graph:
    """A loaded graph and what the graft needs to know about it."""

    proto: onnx.ModelProto  # shape-inferred
    source: str
    image: onnx.ValueInfoProto
    size: tuple[int, int]
    output: str
    output_shape: tuple[int, ...]
    candidates: tuple[Candidate, ...]
    shapes: dict[str, tuple[int, ...]]  # measured / inferred shapes of candidates (batch 1)


def _analyse_graph(
    model: str | Path | onnx.ModelProto,
    input_size: int | Sequence[int] | None,
    output_name: str | None,
) -> _Graph:
    proto, source = _load(model)
    proto = _inferred(proto)
    image = _image_input(proto)
    size = _input_size(image, input_size)
    output = _choose_output(proto, output_name)
    batch = _fixed_batch(image) or 1
    shapes = _float_values(proto)
    ancestors = _data_ancestors(proto, output)
    producers = _producers(proto)
    ordered = [name for node in proto.graph.node for name in node.output if name in ancestors]
    # values whose C/h/w shape inference left symbolic (or untyped) are measured instead
    unknown = [
        name
        for name in [*ordered, output]
        if name not in shapes or (len(shapes[name]) in (2, 3, 4) and None in shapes[name][1:])
    ]
    types = _elem_types(proto)
    unknown = [name for name in unknown if types.get(name, 0) in (0, TensorProto.FLOAT)]
    measured = _measured_shapes(proto, unknown, size, batch)
    full: dict[str, tuple[int, ...]] = {}
    for name in [*ordered, output]:
        if name in measured:
            full[name] = measured[name]
        elif name in shapes and None not in shapes[name][1:]:
            full[name] = (batch, *shapes[name][1:])  # type: ignore[arg-type]
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
    output_shape = full.get(output)
    if output_shape is None or len(output_shape) != 2:
        raise ValueError(
            f"output {output!r} must be [B, D] (an embedding or logits), got shape {output_shape}"
        )
    return _Graph(proto, source, image, size, output, output_shape, candidates, full)


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
        if node.op_type in _NO_DATA_OPS:
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


def _elem_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element types of the values that shape inference typed."""
    return {
        value.name: value.type.tensor_type.elem_type
        for value in (*proto.graph.value_info, *proto.graph.output)
    }


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
    return list(_analyse_graph(model, input_size, output_name).candidates)


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


def _reaches(graph: _Graph) -> Callable[[Candidate], bool]:
    """Whether a candidate's maps reach the output: always for maps; for tokens, when a
    change of the patch tokens alone (the leading tokens kept) changes the output."""

    def check(candidate: Candidate) -> bool:
        if candidate.layout.kind != "tokens":
            return True
        try:
            head = _head_graph(graph, candidate.name)
        except ValueError:
            return False
        sample = _sample_value(graph, candidate.name)[:1]
        noise = np.random.default_rng(3).standard_normal(sample.shape).astype(np.float32)
        noise[:, : candidate.layout.prefix] = 0.0
        moved = sample + noise * max(float(sample.std()), 1e-3)
        session = _session(head)
        before, after = (_run(session, candidate.name, x)[0] for x in (sample, moved))
        return bool(np.abs(after - before).max() > 1e-6 * max(float(np.abs(before).max()), 1.0))

    return check


def _sample_value(graph: _Graph, name: str, batch: int = 1) -> np.ndarray:
    """The value ``name`` on sample images (item by item where the graph fixes the batch)."""
    session = _session(graph.proto, [name])
    images = _sample_image(graph.size, batch)
    return _run(session, graph.image.name, images, [name])[0]


def _target(graph: _Graph, target_tensor: str | None) -> Candidate:
    if target_tensor is None:
        return choose_target(graph.candidates, _reaches(graph))
    for candidate in graph.candidates:
        if candidate.name == target_tensor:
            return candidate
    if target_tensor not in _producers(graph.proto):
        raise ValueError(
            f"target_tensor {target_tensor!r} is not a value of the graph; candidates are "
            f"{[c.name for c in graph.candidates]}"
        )
    shape = graph.shapes.get(target_tensor)
    if target_tensor not in _data_ancestors(graph.proto, graph.output):
        raise ValueError(
            f"target_tensor {target_tensor!r} does not reach the output {graph.output!r}"
        )
    raise ValueError(
        f"target_tensor {target_tensor!r} is not a feature map [B, C, h, w], a token "
        "sequence [B, T, C] or a channel-last map [B, h, w, C] with a grid h * w > 1 "
        "covering the input "
        f"(its shape is {shape}); candidates are {[c.name for c in graph.candidates]}"
    )


# -- the head between the target and the output


def _head_graph(graph: _Graph, target: str) -> onnx.ModelProto:
    """The subgraph from ``target`` to the output, as a model with one input ``target``."""
    proto = graph.proto
    producers = _producers(proto)
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
    return model


def _run(
    session: object, name: str, maps: np.ndarray, outputs: Sequence[str] | None = None
) -> list[np.ndarray]:
    """Run ``session`` on a batch of ``maps``; item by item where the head fixes the batch."""
    try:
        return session.run(outputs, {name: maps})  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a graph that hard-codes batch 1 runs item by item
        parts = [session.run(outputs, {name: maps[i : i + 1]}) for i in range(len(maps))]  # type: ignore[attr-defined]
        return [np.concatenate(arrays) for arrays in zip(*parts, strict=True)]


def _affine_error(
    zero: np.ndarray, a: np.ndarray, b: np.ndarray, ab: np.ndarray, minus_a: np.ndarray
) -> float:
    """Largest relative violation of ``h(A+B)-h(B) = h(A)-h(0)`` and ``h(-A)-h(0) = h(0)-h(A)``."""
    scale = max(float(np.abs(v - zero).max()) for v in (a, b, ab, minus_a)) + float(
        np.abs(zero).max()
    )
    scale = max(scale, 1e-12)
    additive = np.abs((ab - b) - (a - zero)).max()
    homogeneous = np.abs((minus_a - zero) + (a - zero)).max()
    return float(max(additive, homogeneous)) / scale


def _probes(activations: np.ndarray, seed: int = 1) -> np.ndarray:
    """``[0, A, B, A + B, -A]``: ``A`` real activations, ``B`` noise of their scale."""
    generator = np.random.default_rng(seed)
    a = activations[:1]
    spread = float(a.std()) or 1.0
    b = (generator.standard_normal(a.shape) * spread + a.mean(axis=(2, 3), keepdims=True)).astype(
        np.float32
    )
    return np.concatenate([np.zeros_like(a), a, b, a + b, -a]).astype(np.float32)


def analyse_head(
    model: str | Path | onnx.ModelProto,
    target_tensor: str | None = None,
    *,
    input_size: int | Sequence[int] | None = None,
    output_name: str | None = None,
) -> AffineHead:
    """The affine head ``z = W mean(A) + b`` from ``target_tensor`` to the output.

    Raises ``ValueError`` naming the first non-affine node when the head is not global
    average pooling followed by an affine map.

    Example:
        >>> analyse_head("resnet18.onnx").matrix.shape  # doctest: +SKIP
        (1000, 512)
    """
    graph = _analyse_graph(model, input_size, output_name)
    return _analyse_head(graph, _target(graph, target_tensor))


def _analyse_head(graph: _Graph, target: Candidate) -> AffineHead:
    sample = _run(
        _session(graph.proto, [target.name]),
        graph.image.name,
        _sample_image(graph.size, _fixed_batch(graph.image) or 1),
        [target.name],
    )[0]
    head = _head_graph(graph, target.name)
    session = _session(head)
    probes = _probes(sample)
    zero, a, b, ab, minus_a = _run(session, target.name, probes)[0]
    if _affine_error(zero, a, b, ab, minus_a) > RTOL:
        raise _NotAffine(*_nonlinear_message(graph, head, target, probes))
    flat = sample[:1].reshape(1, target.shape[0], -1)
    permuted = flat[:, :, np.random.default_rng(2).permutation(flat.shape[2])].reshape(
        sample[:1].shape
    )
    moved = _run(session, target.name, permuted)[0][0]
    if np.abs(moved - a).max() > RTOL * max(float(np.abs(a).max()), 1e-12):
        raise _NotAffine(
            f"the head between {target.name!r} and {graph.output!r} is affine but not global "
            "average pooling: its output depends on where in the map a feature lies (e.g. "
            "Flatten + Gemm without pooling); choose an earlier target tensor, before the "
            "layers that mix spatial positions, or graft its per-sample Jacobian "
            "(nonlinear_head='jacobian')",
            "affine but position-dependent: no global average pooling",
        )
    channels = target.shape[0]
    basis = np.zeros((channels + 1, *target.shape), dtype=np.float32)
    basis[np.arange(1, channels + 1), np.arange(channels)] = 1.0  # constant map of channel n
    responses = _run(session, target.name, basis)[0]
    bias = responses[0]
    matrix = (responses[1:] - bias).T.astype(np.float32)  # [J, N]
    predicted = flat.mean(axis=2) @ matrix.T + bias
    if np.abs(predicted[0] - a).max() > RTOL * max(float(np.abs(a).max()), 1.0):
        raise _NotAffine(
            f"the head between {target.name!r} and {graph.output!r} does not reproduce the "
            "output as W mean(A) + b (a numerically unstable head); cannot graft it exactly",
            "not reproduced as W mean(A) + b",
        )
    return AffineHead(
        matrix, bias.astype(np.float32), tuple(node.op_type for node in head.graph.node)
    )


def _descendants(head: onnx.ModelProto, source: str) -> list[str]:
    """Values of ``head`` computed from ``source``'s data, in topological order."""
    reached = {source}
    ordered: list[str] = []
    for node in head.graph.node:
        if node.op_type not in _NO_DATA_OPS and reached.intersection(node.input):
            reached.update(node.output)
            ordered.extend(name for name in node.output if name)
    return ordered


class _NotAffine(ValueError):
    """The head is not global average pooling + an affine map; ``reason`` in a few words."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _nonlinear_message(
    graph: _Graph, head: onnx.ModelProto, target: Candidate, probes: np.ndarray
) -> tuple[str, str]:
    """``(message, reason)`` naming the first node of ``head`` whose output is not affine
    in the target tensor."""
    typed = _float_values(_inferred(head))
    names = [name for name in _descendants(head, target.name) if name in typed]
    culprit = None
    if names:
        results = _run(_session(head, names), target.name, probes, names)
        for name, values in zip(names, results, strict=True):
            if values.shape[0] == len(probes) and _affine_error(*values) > RTOL:
                culprit = _producers(head)[name]
                break
    advice = (
        "with nonlinear_head='error', grafting needs global average pooling followed by an "
        "affine map (Gemm, MatMul, Add, BatchNormalization, Flatten, Reshape), and nothing "
        "is approximated. Alternatives: explain the value before that node with "
        "output_name=, or graft the head's exact per-sample Jacobian "
        "(nonlinear_head='jacobian', the default)"
    )
    if culprit is None:
        message = f"the head between {target.name!r} and {graph.output!r} is not affine"
        return f"{message}; {advice}", "not affine"
    before = next((name for name in culprit.input if name in names), None)
    suggestion = f" (output_name={before!r} is the value before it)" if before else ""
    reason = f"first non-affine node {culprit.name or '(unnamed)'!r} ({culprit.op_type})"
    return (
        f"the head between {target.name!r} and {graph.output!r} is not affine: its first "
        f"non-affine node is {culprit.name or '(unnamed)'!r} ({culprit.op_type}){suggestion}; "
        f"{advice}",
        reason,
    )


# -- the graft


def _check_task(method: str, task: Task | None) -> Task:
    fmt.check_exportable(method)
    implied: Task = "embedding" if method in fmt.EMBEDDING_METHODS else "classifier"
    if task is not None and task not in ("embedding", "classifier"):
        raise ValueError(f"task must be 'embedding' or 'classifier', got {task!r}")
    if task is not None and task != implied:
        use = "'fam' or 'gradfam'" if task == "embedding" else "'cam' or 'gradcam'"
        raise ValueError(f"method {method!r} does not explain a {task} model: use {use}")
    return implied


def _head_module(
    head: AffineHead,
    method: str,
    *,
    size: tuple[int, int],
    similarity: SimilarityKind,
    references: torch.Tensor | None,
    explain: ExplainMode,
    class_input: bool,
) -> ExplanationHead:
    matrix = torch.from_numpy(head.matrix.copy())
    if head.is_identity and method in fmt.EMBEDDING_METHODS:
        matrix = None  # type: ignore[assignment]  # eq. 18 with W = I: the weights themselves
    return ExplanationHead(
        method,
        matrix=matrix,
        heatmap_size=size,
        similarity=similarity,
        references=references,
        explain=explain,
        class_input=class_input,
    ).eval()


def _export_head(
    module: ExplanationHead, channels_hw: tuple[int, int, int], dimension: int, opset: int
) -> tuple[onnx.ModelProto, tuple[torch.Tensor, ...], dict[str, dict[int, str]], list[str]]:
    """The head alone as ONNX: inputs ``activations``, ``outputs`` (+ references/class_index)."""
    generator = torch.Generator().manual_seed(0)
    activations = torch.rand(2, *channels_hw, generator=generator)
    outputs = torch.randn(2, dimension, generator=generator)
    args: tuple[torch.Tensor, ...] = (activations, outputs)
    input_names = list(_HEAD_INPUTS)
    axes: dict[str, dict[int, str]] = {name: {0: "batch"} for name in input_names}
    if module.is_classifier:
        output_names = [fmt.OUTPUT_LOGITS, fmt.OUTPUT_CLASS_INDEX]
        if module.class_input:
            args += (torch.zeros(2, dtype=torch.long),)
            input_names.append(fmt.INPUT_CLASS_INDEX)
            axes[fmt.INPUT_CLASS_INDEX] = {0: "batch"}
            output_names = [fmt.OUTPUT_LOGITS]
    else:
        output_names = [fmt.OUTPUT_EMBEDDING, fmt.OUTPUT_SCORES]
        if module.baked_references is None:
            args += (torch.randn(3, dimension, generator=generator),)
            input_names.append(fmt.INPUT_REFERENCES)
            axes[fmt.INPUT_REFERENCES] = {0: "num_references"}
    output_names += [fmt.OUTPUT_HEATMAP, fmt.OUTPUT_HEATMAP_LOWRES, fmt.OUTPUT_WEIGHTS]
    axes.update({name: {0: "batch"} for name in output_names})
    if not module.is_classifier and module.baked_references is None:
        axes[fmt.OUTPUT_SCORES] = {0: "batch", 1: "num_references"}
    with torch.no_grad():
        sample = module(*args)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue()), sample, axes, input_names


def _default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError("the graph imports no default-domain ('ai.onnx') opset")


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == old:
            value.name = new


def _set_batch(value: onnx.ValueInfoProto, batch: int | None) -> None:
    first = value.type.tensor_type.shape.dim[0]
    if batch is None:
        first.dim_param = "batch"
    else:
        first.dim_value = batch


def _merge(
    graph: _Graph,
    target: Candidate,
    head_proto: onnx.ModelProto,
    output_names: Sequence[str],
    batch: int | None,
    *,
    interpreted: bool = False,
) -> onnx.ModelProto:
    """The foreign graph up to the target (and its output, for an affine head) with the
    head graph after it. An interpreted head recomputes the output from the target: the
    foreign graph's own head is dropped."""
    foreign = onnx.ModelProto()
    foreign.CopyFrom(graph.proto)
    del foreign.graph.value_info[:]  # inferred for a fixed batch; the merged graph re-infers
    links = [(target.name, _HEAD_INPUTS[0])]
    if not interpreted:
        links.append((graph.output, _HEAD_INPUTS[1]))
    del foreign.graph.output[:]
    for name, _ in links:
        foreign.graph.output.append(helper.make_empty_tensor_value_info(name))
    foreign, head_proto = _same_opset(foreign, head_proto)
    version = max(foreign.ir_version, head_proto.ir_version)
    foreign.ir_version = head_proto.ir_version = version
    merged = onnx.compose.merge_models(
        foreign,
        head_proto,
        io_map=links,
        prefix1=_PREFIX,
        outputs=list(output_names),
    )
    _prune(merged.graph)
    opsets = {(entry.domain, entry.version): entry for entry in merged.opset_import}
    del merged.opset_import[:]
    merged.opset_import.extend(opsets.values())
    _rename(merged.graph, _PREFIX + graph.image.name, fmt.INPUT_IMAGE)
    image = next(value for value in merged.graph.input if value.name == fmt.INPUT_IMAGE)
    dims = image.type.tensor_type.shape.dim
    for axis, extent in zip((1, 2, 3), (3, *graph.size), strict=True):
        dims[axis].dim_value = extent
    _set_batch(image, batch)
    del merged.graph.value_info[:]
    # inputs that are initializers (old IR versions list them) are no inputs of the format
    initializers = {tensor.name for tensor in merged.graph.initializer}
    kept = [value for value in merged.graph.input if value.name not in initializers]
    del merged.graph.input[:]
    merged.graph.input.extend(kept)
    return merged


def _same_opset(
    first: onnx.ModelProto, second: onnx.ModelProto
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Both graphs at the higher of their default-domain opsets (``onnx.version_converter``)."""
    a, b = _default_opset(first), _default_opset(second)
    if a == b:
        return first, second
    from onnx import version_converter

    try:
        if a < b:
            return version_converter.convert_version(first, b), second
        return first, version_converter.convert_version(second, a)
    except Exception as error:  # noqa: BLE001 - the converter's errors name no common type
        raise ValueError(
            f"cannot bring the graph (opset {a}) and the explanation head (opset {b}) to one "
            f"opset: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes and initializers that no graph output needs."""
    producers = {name: node for node in graph.node for name in node.output if name}
    needed: set[str] = set()
    stack = [value.name for value in graph.output]
    kept_nodes: set[int] = set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producers.get(name)
        if node is not None and id(node) not in kept_nodes:
            kept_nodes.add(id(node))
            stack.extend(given for given in node.input if given)
            for attribute in node.attribute:  # values a subgraph (If, Loop) reads
                for sub in (attribute.g, *attribute.graphs):
                    stack.extend(given for inner in sub.node for given in inner.input)
    nodes = [node for node in graph.node if id(node) in kept_nodes]
    del graph.node[:]
    graph.node.extend(nodes)
    initializers = [tensor for tensor in graph.initializer if tensor.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def graft_onnx(
    model: str | Path | onnx.ModelProto,
    *,
    method: str = "fam",
    task: Task | None = None,
    target_tensor: str | None = None,
    output_name: str | None = None,
    references: torch.Tensor | np.ndarray | None = None,
    explain: ExplainMode = "mean",
    class_input: bool = False,
    input_size: int | Sequence[int] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    class_names: Sequence[str] = (),
    similarity: SimilarityKind = "cosine",
    model_name: str | None = None,
    out_path: str | Path | None = None,
    nonlinear_head: Literal["jacobian", "error"] = "jacobian",
) -> onnx.ModelProto | Path:
    """Graft the explanation head ``method`` onto the ONNX graph ``model``.

    Args:
        model: an ONNX file or ``onnx.ModelProto`` with one image input ``[B, 3, H, W]``
            (already normalised with ``mean`` / ``std``), written by any exporter.
        method: ``"fam"`` / ``"gradfam"`` (embedding models) or ``"cam"`` / ``"gradcam"``
            (classifiers).
        task: ``"embedding"`` or ``"classifier"``; checked against ``method`` when given.
        target_tensor: the feature map or token sequence to explain (a value name, see
            :func:`inspect_onnx`); ``None``: found as the torch explainers find their layer.
        output_name: the value holding the embedding / logits ``[B, D]``; ``None``: the
            first graph output of rank 2.
        references: ``[K, D]`` references baked in as constants (``fam`` / ``gradfam``);
            ``None``: a ``references`` input.
        explain: ``"mean"`` over the references (eq. 11) or ``"best"`` (``fam`` only).
        class_input: ``cam`` / ``gradcam`` take a ``class_index`` input instead of top-1.
        input_size: ``(H, W)`` (or an int); needed when the graph's input size is dynamic.
        mean, std, class_names, similarity, model_name: written to the metadata.
        out_path: write the file there and return its path; ``None``: return the model.
        nonlinear_head: ``"jacobian"`` grafts a head that is not global average pooling +
            an affine map through its per-sample Jacobian (the head interpreted in torch);
            ``"error"`` refuses it.

    Raises ``ValueError`` for a target tensor that is not in the graph or not a feature map /
    token sequence, a head with an ONNX operator the interpreter does not run (naming it),
    a head that is not linear with ``nonlinear_head="error"`` (naming its first non-affine
    node), and a method that does not fit the task.

    Example:
        >>> path = graft_onnx("resnet50.onnx", method="gradcam", out_path="explained.onnx")  # doctest: +SKIP
        >>> OnnxExplainer(path).method  # doctest: +SKIP
        'gradcam'
    """
    task = _check_task(method, task)
    if nonlinear_head not in ("jacobian", "error"):
        raise ValueError(f"nonlinear_head must be 'jacobian' or 'error', got {nonlinear_head!r}")
    graph = _analyse_graph(model, input_size, output_name)
    target = _target(graph, target_tensor)
    head: AffineHead | None = None
    if target.layout.kind == "channels_first":
        try:
            head = _analyse_head(graph, target)
        except _NotAffine:
            if nonlinear_head == "error":
                raise
    dimension = int(graph.output_shape[1])
    if task == "classifier" and class_names and len(class_names) != dimension:
        raise ValueError(
            f"class_names has {len(class_names)} names but output {graph.output!r} has "
            f"{dimension} classes"
        )
    baked = None
    if references is not None:
        baked = torch.as_tensor(np.asarray(references), dtype=torch.float32)
        if baked.dim() != 2 or baked.shape[1] != dimension:
            raise ValueError(f"references must be [K, {dimension}], got {tuple(baked.shape)}")
    options = {
        "similarity": similarity,
        "references": baked,
        "explain": explain,
        "class_input": class_input,
    }
    if head is not None:
        merged, input_names, output_names, opset, kind = _graft_affine(
            graph, target, head, method, dimension, **options
        )
    else:
        merged, input_names, output_names, opset, kind = _graft_interpreted(
            graph, target, method, task, nonlinear_head, **options
        )
    document(
        merged,
        method=method,
        target_layer=target.name,
        task=task,
        model_name=model_name or graph.source,
        input_size=graph.size,
        mean=mean,
        std=std,
        class_names=list(class_names),
        input_names=input_names,
        output_names=output_names,
        opset=opset,
        similarity=similarity,
        explain=explain,
        baked_references=None if baked is None else int(baked.shape[0]),
        class_input=class_input,
        head=kind,
    )
    merged.doc_string += f" (grafted onto {graph.source!r} after output {graph.output!r})"
    onnx.checker.check_model(merged, full_check=True)
    if out_path is None:
        return merged
    path = Path(out_path)
    if not path.parent.exists():
        raise OSError(f"output folder {path.parent} does not exist")
    onnx.save_model(merged, str(path), save_as_external_data=False)
    return path


def _graft_affine(
    graph: _Graph,
    target: Candidate,
    head: AffineHead,
    method: str,
    dimension: int,
    *,
    similarity: SimilarityKind,
    references: torch.Tensor | None,
    explain: ExplainMode,
    class_input: bool,
) -> tuple[onnx.ModelProto, list[str], list[str], int, str]:
    """FAM eq. 16-18 (or Grad-FAM, CAM, Grad-CAM) with the probed ``W`` after the target."""
    module = _head_module(
        head,
        method,
        size=graph.size,
        similarity=similarity,
        references=references,
        explain=explain,
        class_input=class_input,
    )
    opset = min(max(_default_opset(graph.proto), _MIN_OPSET), _MAX_OPSET)
    if opset != _default_opset(graph.proto):
        raise ValueError(
            f"the graph uses opset {_default_opset(graph.proto)}; grafting supports opsets "
            f"{_MIN_OPSET}-{_MAX_OPSET} (convert it with onnx.version_converter first)"
        )
    head_proto, sample, axes, head_inputs = _export_head(
        module, target.maps_shape, dimension, opset
    )
    output_names = [value.name for value in head_proto.graph.output]
    input_names = [fmt.INPUT_IMAGE] + [n for n in head_inputs if n not in _HEAD_INPUTS]
    axes[fmt.INPUT_IMAGE] = {0: "batch"}
    merged = _merge(graph, target, head_proto, output_names, batch=None)
    batch = None
    if not _runs_batched(merged, graph.size, dimension):
        batch = _warn_fixed_batch(graph)
        merged = _merge(graph, target, head_proto, output_names, batch=batch)
        for name in list(axes):
            axes[name] = {axis: label for axis, label in axes[name].items() if axis != 0}
    _set_output_shapes(merged, sample, axes)
    if batch is not None:
        for value in merged.graph.output:
            _set_batch(value, batch)
    return merged, input_names, output_names, opset, "identity" if head.is_identity else "linear"


def _graft_interpreted(
    graph: _Graph,
    target: Candidate,
    method: str,
    task: Task,
    nonlinear_head: str,
    *,
    similarity: SimilarityKind,
    references: torch.Tensor | None,
    explain: ExplainMode,
    class_input: bool,
) -> tuple[onnx.ModelProto, list[str], list[str], int, str]:
    """The explainer's own steps on the head interpreted in torch (:mod:`.interpreted`),
    exported as the torch exporter exports non-linear heads, after the target."""
    from fam_core.exporters.interpreted import export_interpreted, head_explainer, head_kind

    head = _head_graph(graph, target.name)
    options = {
        "method": method,
        "heatmap_size": graph.size,
        "references": references,
        "explain": explain,
        "class_input": class_input,
    }

    def export_at(batch: int | None) -> tuple[onnx.ModelProto, list[str], list[str], str]:
        """The head's explanation exported with a dynamic batch (``None``) or ``batch``."""
        sample = _sample_value(graph, target.name, batch=batch or 2)
        explainer = head_explainer(head, method, target.layout, task, similarity, batch)
        kind, layer = head_kind(explainer, sample)
        _refuse_jacobian(kind, layer, nonlinear_head, graph, target)
        exported = export_interpreted(explainer, sample, dynamic_batch=batch is None, **options)
        return (*exported, kind)

    fixed = _fixed_batch(graph.image)
    try:  # a dynamic batch, even where the graph's input fixes one (shapes read by Shape)
        head_proto, head_inputs, output_names, kind = export_at(None)
        batch = None
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 - a head whose constants fix the batch: export that one
        if fixed is None:
            raise
        head_proto, head_inputs, output_names, kind = export_at(fixed)
        batch = fixed
    _rename(head_proto.graph, head_inputs[0], _HEAD_INPUTS[0])
    input_names = [fmt.INPUT_IMAGE, *head_inputs[1:]]
    merged = _merge(graph, target, head_proto, output_names, batch=batch, interpreted=True)
    if batch is None and not _runs_batched(merged, graph.size, int(graph.output_shape[1])):
        batch = fixed
        merged = _merge(graph, target, head_proto, output_names, batch=batch, interpreted=True)
    if batch is not None:
        _warn_fixed_batch(graph)
        for value in (*merged.graph.input, *merged.graph.output):
            dims = value.type.tensor_type.shape.dim
            if dims and (dims[0].dim_param == "batch" or not dims[0].dim_param):
                _set_batch(value, batch)
    return merged, input_names, output_names, _default_opset(merged), kind


def _refuse_jacobian(
    kind: str, layer: str | None, nonlinear_head: str, graph: _Graph, target: Candidate
) -> None:
    if kind == "jacobian" and nonlinear_head == "error":
        raise ValueError(
            f"the head between {target.name!r} and {graph.output!r} is not linear ({layer}); "
            "pass nonlinear_head='jacobian' to graft its per-sample Jacobian"
        )


def _warn_fixed_batch(graph: _Graph) -> int | None:
    batch = _fixed_batch(graph.image)
    warnings.warn(
        f"{graph.source}: the graph fixes its batch size to {batch}; the grafted graph "
        "takes that batch only (export it with a dynamic batch axis to lift this)",
        stacklevel=3,
    )
    return batch


def _runs_batched(merged: onnx.ModelProto, size: tuple[int, int], dimension: int) -> bool:
    """Whether the grafted graph runs a batch of 2 (a foreign graph may fix batch 1)."""
    feeds: dict[str, np.ndarray] = {fmt.INPUT_IMAGE: _sample_image(size, 2)}
    names = {value.name for value in merged.graph.input}
    if fmt.INPUT_REFERENCES in names:
        feeds[fmt.INPUT_REFERENCES] = np.ones((1, dimension), dtype=np.float32)
    if fmt.INPUT_CLASS_INDEX in names:
        feeds[fmt.INPUT_CLASS_INDEX] = np.zeros(2, dtype=np.int64)
    try:
        _session(merged).run(None, feeds)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - any failure means: keep the graph's own batch
        return False
    return True


def inspect_onnx(
    model: str | Path | onnx.ModelProto,
    *,
    input_size: int | Sequence[int] | None = None,
    output_name: str | None = None,
    target_tensor: str | None = None,
) -> Inspection:
    """Candidate target tensors, the chosen one and the head after it (``fam inspect``).

    ``str()`` of the result is the printable report; a head that cannot be grafted is
    reported (``head_error``), not raised.

    Example:
        >>> print(inspect_onnx("resnet18.onnx"))  # doctest: +SKIP
        ONNX graph resnet18
        ...
    """
    graph = _analyse_graph(model, input_size, output_name)
    chosen = _target(graph, target_tensor)
    head, error, reason = None, None, None
    if chosen.layout.kind == "channels_first":
        try:
            head = _analyse_head(graph, chosen)
        except _NotAffine as problem:
            reason = problem.reason
        except ValueError as problem:
            error = str(problem)
    kind, detail = None, None
    if head is None and error is None:
        try:
            kind, detail = _describe_interpreted(graph, chosen, reason)
        except ValueError as problem:
            error = str(problem)
    return Inspection(
        source=graph.source,
        input_name=graph.image.name,
        input_size=graph.size,
        output_name=graph.output,
        output_dim=int(graph.output_shape[1]),
        candidates=graph.candidates,
        chosen=chosen,
        head=head,
        head_error=error,
        head_kind=kind,
        head_detail=detail,
    )


def _describe_interpreted(graph: _Graph, target: Candidate, reason: str | None) -> tuple[str, str]:
    """``(kind, description)`` of a head the graft interprets in torch."""
    from fam_core.exporters.interpreted import head_explainer, head_kind

    proto = _head_graph(graph, target.name)
    explainer = head_explainer(proto, "fam", target.layout, "embedding")
    kind, layer = head_kind(explainer, _sample_value(graph, target.name))
    ops = ", ".join(
        dict.fromkeys(n.op_type for n in proto.graph.node if n.op_type not in ("Constant",))
    )
    why = f"not affine ({reason}); " if reason else ""
    if kind == "jacobian":
        how = (
            f"{why}FAM maps its weights through the head's per-sample vector-Jacobian "
            f"product (first non-linear layer: {layer})"
        )
    elif kind == "identity":
        how = f"{why}the output is the mean of the maps (eq. 18 with W = I)"
    else:
        how = f"{why}W mean(A) + b, eq. 16-18 with W found from the dataflow"
    return kind, f"{how}; grafted as the head interpreted in torch ({ops})"
