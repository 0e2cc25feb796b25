"""The head between a target tensor and the output: affine, or interpreted in torch.

For a channel-first target the head is probed with onnxruntime: invariant to a
permutation of the spatial positions and affine (``h(A + B) - h(B) = h(A) - h(0)`` and
``h(-A) - h(0) = h(0) - h(A)`` to 1e-4 relative), on the real activations and on random
maps at unit scale (real maps that are all zeros, or small enough for an activation after
them to act linearly, test nothing), i.e. global average pooling then an
affine map ``z = W mean(A) + b`` (:class:`AffineHead`); ``W`` ``[J, N]`` and ``b`` come
from running it on constant-per-channel maps. Any other head is interpreted in torch
(:mod:`fam_core.exporters.onnx_torch`, :mod:`fam_core.exporters.interpreted`);
:class:`NotAffine` names its first non-affine node.

Example:
    >>> head = AffineHead(np.eye(2, dtype=np.float32), np.zeros(2, np.float32), ("GlobalAveragePool",))
    >>> head.is_identity
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from fam_core.exporters.onnx_dataflow import (
    Candidate,
    Graph,
    analyse_graph,
    head_graph,
    resolve_target,
)
from fam_core.exporters.onnx_graph import (
    NO_DATA_OPS,
    elem_types,
    make_session,
    producers_of,
    run_batch,
    sample_image,
    with_inferred_shapes,
)
from fam_core.exporters.onnx_load import fixed_batch, input_channels
from fam_core.exporters.onnx_output import describe_node

RTOL = 1e-4  # relative tolerance of the head probes

__all__ = [
    "AffineHead",
    "NotAffine",
    "RTOL",
    "analyse_graph_head",
    "analyse_head",
    "first_nonaffine_node",
    "layout_probes",
]


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
    graph = analyse_graph(model, input_size, output_name)
    return analyse_graph_head(graph, resolve_target(graph, target_tensor))


def analyse_graph_head(graph: Graph, target: Candidate) -> AffineHead:
    sample = run_batch(
        make_session(graph.proto, [target.name]),
        graph.image.name,
        sample_image(
            graph.size, fixed_batch(graph.image) or 1, channels=input_channels(graph.image)
        ),
        [target.name],
    )[0]
    head = head_graph(graph, target.name)
    session = make_session(head)
    probes = _probes(sample)
    unit = np.random.default_rng(3).standard_normal(sample[:1].shape).astype(np.float32)
    both = np.concatenate([probes, _probes(unit)[1:]])  # one zero map for both groups
    outputs = run_batch(session, target.name, both)[0]
    zero, a, b, ab, minus_a = outputs[:5]
    if _affine_error(zero, a, b, ab, minus_a) > RTOL:
        raise NotAffine(*_nonlinear_message(graph, head, target, probes))
    if _affine_error(zero, *outputs[5:9]) > RTOL:
        raise NotAffine(*_nonlinear_message(graph, head, target, _probes(unit)))
    flat = sample[:1].reshape(1, target.shape[0], -1)
    permuted = flat[:, :, np.random.default_rng(2).permutation(flat.shape[2])].reshape(
        sample[:1].shape
    )
    moved = run_batch(session, target.name, permuted)[0][0]
    if np.abs(moved - a).max() > RTOL * max(float(np.abs(a).max()), 1e-12):
        raise NotAffine(
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
    responses = run_batch(session, target.name, basis)[0]
    bias = responses[0]
    matrix = (responses[1:] - bias).T.astype(np.float32)  # [J, N]
    predicted = flat.mean(axis=2) @ matrix.T + bias
    if np.abs(predicted[0] - a).max() > RTOL * max(float(np.abs(a).max()), 1.0):
        raise NotAffine(
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
        if node.op_type not in NO_DATA_OPS and reached.intersection(node.input):
            reached.update(node.output)
            ordered.extend(name for name in node.output if name)
    return ordered


class NotAffine(ValueError):
    """The head is not global average pooling + an affine map; ``reason`` in a few words."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def layout_probes(activations: np.ndarray, seed: int = 1) -> np.ndarray:
    """``[0, A, B, A + B, -A]`` for a value of any layout: ``A`` its first item, ``B``
    noise of its scale (maps, tokens or channel-last maps alike)."""
    generator = np.random.default_rng(seed)
    a = activations[:1].astype(np.float32)
    spread = float(a.std()) or 1.0
    b = (generator.standard_normal(a.shape) * spread + a.mean()).astype(np.float32)
    return np.concatenate([np.zeros_like(a), a, b, a + b, -a]).astype(np.float32)


def first_nonaffine_node(
    head: onnx.ModelProto, source: str, probes: np.ndarray
) -> onnx.NodeProto | None:
    """The first node of ``head`` whose output is not affine in ``source`` on ``probes``
    (``[0, A, B, A + B, -A]``), in topological order; ``None`` when every float value is.

    Every value computed from ``source``'s data is run, typed by shape inference or not
    (a Reshape whose shape comes from Shape -> Slice -> Concat leaves the rest of the head
    untyped): the node named is the real operator, a Softmax rather than the Identity
    after it.

    Example:
        >>> from onnx import helper, TensorProto
        >>> nodes = [helper.make_node("Softmax", ["x"], ["p"], name="soft"),
        ...          helper.make_node("Identity", ["p"], ["y"], name="out")]
        >>> graph = helper.make_graph(nodes, "h",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])])
        >>> head = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        >>> x = np.array([[1.0, 2.0, 3.0]], np.float32)
        >>> first_nonaffine_node(head, "x", np.concatenate([0 * x, x, x, 2 * x, -x])).name
        'soft'
    """
    types = elem_types(with_inferred_shapes(head))
    names = [
        name
        for name in _descendants(head, source)
        if types.get(name, 0) in (0, onnx.TensorProto.FLOAT)
    ]
    if not names:
        return None
    try:
        results = run_batch(make_session(head, names), source, probes, names)
    except Exception:  # noqa: BLE001 - a value onnxruntime cannot return: name no node
        return None
    producers = producers_of(head)
    for name, values in zip(names, results, strict=True):
        if (
            isinstance(values, np.ndarray)
            and values.dtype == np.float32
            and values.ndim > 0
            and values.shape[0] == len(probes)
            and _affine_error(*values) > RTOL
        ):
            return producers[name]
    return None


def _nonlinear_message(
    graph: Graph, head: onnx.ModelProto, target: Candidate, probes: np.ndarray
) -> tuple[str, str]:
    """``(message, reason)`` naming the first node of ``head`` whose output is not affine
    in the target tensor."""
    culprit = first_nonaffine_node(head, target.name, probes)
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
    computed = set(_descendants(head, target.name))
    before = next((name for name in culprit.input if name in computed), None)
    suggestion = f" (output_name={before!r} is the value before it)" if before else ""
    node = describe_node(culprit)
    return (
        f"the head between {target.name!r} and {graph.output!r} is not affine: its first "
        f"non-affine node is {node}{suggestion}; {advice}",
        f"first non-affine node {node}",
    )
