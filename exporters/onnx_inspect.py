"""What ``fam inspect`` reports on a foreign ONNX graph: candidates, target and head.

Example:
    >>> print(inspect_onnx("resnet18.onnx"))  # doctest: +SKIP
    ONNX graph resnet18
    ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from fam_core.exporters.onnx_dataflow import (
    Candidate,
    Graph,
    OutputChoice,
    analyse_graph,
    format_shape,
    head_graph,
    resolve_target,
    sample_value,
)
from fam_core.exporters.onnx_head import AffineHead, NotAffine, analyse_graph_head
from fam_core.exporters.onnx_load import fixed_batch, input_channels
from fam_core.exporters.onnx_normalise import InputLayout

__all__ = ["Inspection", "inspect_onnx"]


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
    normalisation: tuple[str, ...] = ()  # the steps that read the file (onnx_normalise)
    channels: int = 3  # of the image input; 1: greyscale, given the images' luminance
    choice: OutputChoice | None = None  # the graph output and the value explained
    outputs: tuple[tuple[str, tuple[int | None, ...] | None], ...] = ()  # every graph output

    def __str__(self) -> str:
        height, width = self.input_size
        declared = self.choice.declared if self.choice is not None else self.output_name
        lines = [
            f"ONNX graph {self.source}",
            *(f"normalised: {step}" for step in self.normalisation),
            f"input   {self.input_name}  [B, {self.channels}, {height}, {width}]"
            + ("  greyscale: images are given as their luminance" if self.channels == 1 else ""),
        ]
        if len(self.outputs) > 1:
            lines.append(f"graph outputs ({len(self.outputs)}, * the one explained):")
            for name, shape in self.outputs:
                mark = "*" if name == declared else " "
                lines.append(f"  {mark} {name}  {format_shape(shape)}")
        if self.choice is not None and self.choice.activation is not None:
            lines.append(f"output  {declared}  [B, {self.output_dim}]")
            lines.append(
                f"explained  {self.output_name}  [B, {self.output_dim}]: {self._explained_note()}"
            )
        else:
            note = self.choice.note if self.choice is not None else ""
            lines.append(
                f"output  {self.output_name}  [B, {self.output_dim}]"
                + (f"  {note}" if note else "")
            )
        lines.append(f"candidate target tensors ({len(self.candidates)}, in dataflow order):")
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

    def _explained_note(self) -> str:
        choice = self.choice
        assert choice is not None and choice.activation is not None
        served = {
            "softmax": "its softmax (the graph's probabilities)",
            "log_softmax": "its softmax (the probabilities whose log the graph writes)",
            "sigmoid": "its sigmoid (the graph's per-class probabilities)",
        }[choice.activation]
        return (
            f"{choice.note}; CAM, Grad-CAM and the gradient methods explain the logits, "
            f"served scores are {served}"
        )


def inspect_onnx(
    model: str | Path | onnx.ModelProto,
    *,
    input_size: int | Sequence[int] | None = None,
    output_name: str | None = None,
    target_tensor: str | None = None,
    layout: InputLayout | None = None,
    task: str | None = None,
) -> Inspection:
    """Candidate target tensors, the chosen one and the head after it (``fam inspect``).

    ``str()`` of the result is the printable report: the graph's outputs (when there are
    several), the output explained (the logits before a trailing Softmax / LogSoftmax /
    Sigmoid unless ``task="embedding"``; an L2 normalisation in the graph is named), the
    candidates, the target and the head. A head that cannot be grafted is reported
    (``head_error``), not raised; an output that is no image-level score ``[B, D]`` raises
    the one-line ``ValueError`` of :func:`~fam_core.exporters.onnx_output.describe_output`.

    Example:
        >>> print(inspect_onnx("resnet18.onnx"))  # doctest: +SKIP
        ONNX graph resnet18
        ...
    """
    graph = analyse_graph(model, input_size, output_name, layout, walk_back=task != "embedding")
    chosen = resolve_target(graph, target_tensor)
    head, error, reason = None, None, None
    if chosen.layout.kind == "channels_first":
        try:
            head = analyse_graph_head(graph, chosen)
        except NotAffine as problem:
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
        normalisation=graph.normalised.steps,
        channels=input_channels(graph.image),
        choice=graph.choice,
        outputs=graph.outputs,
    )


def _describe_interpreted(graph: Graph, target: Candidate, reason: str | None) -> tuple[str, str]:
    """``(kind, description)`` of a head the graft interprets in torch."""
    from fam_core.exporters.interpreted import head_explainer, head_kind

    proto = head_graph(graph, target.name)
    # a graph that fixes its batch may bake it into the head's shapes: run chunks of that batch
    batch = fixed_batch(graph.image)
    explainer = head_explainer(proto, "fam", target.layout, "embedding", batch=batch)
    kind, layer = head_kind(explainer, sample_value(graph, target.name))
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
