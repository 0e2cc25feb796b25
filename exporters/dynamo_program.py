"""The ``torch.export``-based ONNX exporter on a traced explanation, with what it lacks.

:func:`export_program` turns the ``make_fx`` graph of
:class:`~fam_core.exporters.export.TracedExplanation` into an ONNX model:

- ``aten.as_strided_scatter`` (what functionalisation makes of an in-place ``as_strided_``,
  e.g. adaptive average pooling of a channels-last tensor, as in Swin V2's pooler, and of its
  backward) becomes a flat ``index_put`` (ONNX ``ScatterND``): the exporter has no
  translation for it;
- the graph's inputs and outputs get the names of :mod:`fam_core.graphs.onnx_format`, and a value
  inside the graph that already holds one of them (the exporter names a node after its
  operator: ``embedding`` for a position embedding's lookup, as in CLIP) is renamed first;
- an operator with no ONNX translation is refused in one line that names it.

Example:
    >>> flat = as_strided_scatter(torch.zeros(6), torch.ones(2, 2), [2, 2], [3, 1], 1)
    >>> flat.tolist()
    [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import torch
from torch import nn

aten = torch.ops.aten

__all__ = ["UnsupportedOperatorError", "as_strided_scatter", "export_program", "name_values"]

_RESTRIDES = (aten.as_strided.default, aten.as_strided_.default)
_MISSING_FUNCTION = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'")


class UnsupportedOperatorError(ValueError):
    """An operator of the traced graph that the ONNX exporter cannot translate."""

    def __init__(self, operator: str, message: str | None = None) -> None:
        self.operator = operator
        super().__init__(message or f"the ONNX exporter has no translation for {operator}")


def as_strided_scatter(
    source: torch.Tensor,
    values: torch.Tensor,
    size: Sequence[int],
    stride: Sequence[int],
    storage_offset: int | None = None,
) -> torch.Tensor:
    """``source`` with ``source.as_strided(size, stride, storage_offset)`` replaced by
    ``values``, for a contiguous ``source``: the elements' flat indices, then ``index_put``.
    Returns ``NotImplemented`` for another layout (the stride is then not the flat one).
    """
    if not source.is_contiguous():
        return NotImplemented  # type: ignore[return-value]
    index = torch.full((), storage_offset or 0, dtype=torch.long, device=source.device)
    for axis, (extent, step) in enumerate(zip(size, stride, strict=True)):
        shape = [1] * len(size)
        shape[axis] = -1
        index = index + (torch.arange(extent, device=source.device) * step).view(shape)
    flat = source.reshape(-1).index_put((index.reshape(-1),), values.reshape(-1))
    return flat.view(source.shape)


def name_values(model: object, input_names: Sequence[str], output_names: Sequence[str]) -> None:
    """Name the graph's inputs and outputs (an ``onnx_ir`` model, in place); a value inside
    the graph that holds one of those names gets a fresh one first."""
    graph = model.graph  # type: ignore[attr-defined]
    ends = [*graph.inputs, *graph.outputs]
    wanted = set(input_names) | set(output_names)
    taken = {value.name for value in _values(graph)}
    for value in _values(graph):
        if value.name in wanted and not any(value is end for end in ends):
            fresh, count = value.name, 0
            while fresh in taken or fresh in wanted:
                count += 1
                fresh = f"{value.name}_{count}"
            taken.add(fresh)
            value.name = fresh
    for value, name in zip(graph.inputs, input_names, strict=True):
        value.name = name
    for value, name in zip(graph.outputs, output_names, strict=True):
        value.name = name


def _values(graph: object) -> list[object]:
    import onnx_ir

    values = [*graph.inputs, *graph.initializers.values()]  # type: ignore[attr-defined]
    for node in onnx_ir.traversal.RecursiveGraphIterator(graph):
        values.extend(node.outputs)
    return values


def export_program(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    *,
    dynamic_shapes: tuple[dict[int, object], ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int,
) -> object:
    """``module`` (a traced graph of ``args``) as an ONNX ``ModelProto``, named as above.

    Raises :class:`UnsupportedOperatorError` for an operator with no ONNX translation.
    """
    program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    if any(node.target in _RESTRIDES for node in program.graph.nodes):
        # functionalised, a restride becomes as_strided_scatter: decomposed here, since the
        # exporter's own decomposition of it has no translation (a second pass over the
        # graph, so only where it is needed)
        table = torch.export.default_decompositions()
        table[aten.as_strided_scatter.default] = as_strided_scatter
        program = program.run_decompositions(table)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            onnx_program = torch.onnx.export(
                program, args, dynamo=True, opset_version=opset, optimize=True, verbose=False
            )
        except Exception as error:
            missing = _MISSING_FUNCTION.search(_chain_text(error))
            if missing is None:
                raise
            raise UnsupportedOperatorError(missing.group(1)) from None
    name_values(onnx_program.model, input_names, output_names)  # type: ignore[union-attr]
    return onnx_program.model_proto  # type: ignore[union-attr]


def _chain_text(error: BaseException) -> str:
    """The messages of ``error`` and of the errors that caused it."""
    texts = []
    seen: BaseException | None = error
    while seen is not None:
        texts.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    return "\n".join(texts)
