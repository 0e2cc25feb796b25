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
    analyse_graph,
    head_graph,
    resolve_target,
    sample_value,
)
from fam_core.exporters.onnx_head import AffineHead, NotAffine, analyse_graph_head
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

    def __str__(self) -> str:
        height, width = self.input_size
        lines = [
            f"ONNX graph {self.source}",
            *(f"normalised: {step}" for step in self.normalisation),
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


def inspect_onnx(
    model: str | Path | onnx.ModelProto,
    *,
    input_size: int | Sequence[int] | None = None,
    output_name: str | None = None,
    target_tensor: str | None = None,
    layout: InputLayout | None = None,
) -> Inspection:
    """Candidate target tensors, the chosen one and the head after it (``fam inspect``).

    ``str()`` of the result is the printable report; a head that cannot be grafted is
    reported (``head_error``), not raised.

    Example:
        >>> print(inspect_onnx("resnet18.onnx"))  # doctest: +SKIP
        ONNX graph resnet18
        ...
    """
    graph = analyse_graph(model, input_size, output_name, layout)
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
    )


def _describe_interpreted(graph: Graph, target: Candidate, reason: str | None) -> tuple[str, str]:
    """``(kind, description)`` of a head the graft interprets in torch."""
    from fam_core.exporters.interpreted import head_explainer, head_kind

    proto = head_graph(graph, target.name)
    explainer = head_explainer(proto, "fam", target.layout, "embedding")
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
