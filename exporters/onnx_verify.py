"""Checks of a grafted graph before it is served, and the optimisations it gets.

:func:`runs_batched` tells whether the grafted graph takes a batch (a foreign graph may fix
batch 1); :func:`slimmed` folds the head's shape arithmetic and drops what no output needs
with onnxslim, and :func:`leaned` applies the rewrites of
:mod:`~fam_core.exporters.onnx_lean`; each keeps its result only where it computes the same
outputs as the graph it came from on sample inputs.

Example:
    >>> runs_batched(grafted, 10)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from fam_core.exporters.onnx_graph import make_session, prune_graph
from fam_core.exporters.onnx_lean import lean_rewrites
from fam_core.graphs import onnx_format as fmt

__all__ = ["leaned", "runs_batched", "slimmed"]

_LOG = logging.getLogger(__name__)


def sample_feeds(merged: onnx.ModelProto, batch: int, dimension: int) -> dict[str, np.ndarray]:
    """Inputs for a grafted graph: images of its input's shape, one reference, class 0."""
    image = next(value for value in merged.graph.input if value.name == fmt.INPUT_IMAGE)
    extents = [d.dim_value for d in image.type.tensor_type.shape.dim[1:]]
    generator = np.random.default_rng(0)
    feeds = {fmt.INPUT_IMAGE: generator.standard_normal((batch, *extents)).astype(np.float32)}
    names = {value.name for value in merged.graph.input}
    if fmt.INPUT_REFERENCES in names:
        feeds[fmt.INPUT_REFERENCES] = np.ones((1, dimension), dtype=np.float32)
    if fmt.INPUT_CLASS_INDEX in names:
        feeds[fmt.INPUT_CLASS_INDEX] = np.zeros(batch, dtype=np.int64)
    return feeds


def runs_batched(merged: onnx.ModelProto, dimension: int) -> bool:
    """Whether the grafted graph runs a batch of 2 (a foreign graph may fix batch 1)."""
    try:
        make_session(merged).run(None, sample_feeds(merged, 2, dimension))  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - any failure means: keep the graph's own batch
        return False
    return True


def slimmed(merged: onnx.ModelProto, dimension: int) -> onnx.ModelProto:
    """``merged`` after onnxslim (constant and shape folding, dead-node removal), where it
    gives the same outputs (``rtol`` 1e-5) on a sample batch; ``merged`` otherwise, or where
    onnxslim is not installed (the ``export`` extra has it).

    The head exported from torch computes its reshapes from ``Shape`` nodes of dynamic-batch
    tensors; on a small model those few dozen scalar nodes cost as much as the backbone.
    """
    try:
        import onnxslim
    except ImportError:
        return merged
    try:
        candidate = onnxslim.slim(merged)
    except Exception as error:  # noqa: BLE001 - the graph as grafted is kept
        _LOG.debug("onnxslim did not run on the grafted graph: %s", error)
        return merged
    return _kept_if_same(merged, candidate, dimension)


def leaned(merged: onnx.ModelProto, dimension: int) -> onnx.ModelProto:
    """``merged`` with the rewrites of :mod:`~fam_core.exporters.onnx_lean` (bilinear
    upsampling as matrix products, no copy to pick a channel, uint8 activation pairs),
    where it gives the same outputs (``rtol`` 1e-5) on a sample batch; ``merged``
    otherwise."""
    candidate = onnx.ModelProto()
    candidate.CopyFrom(merged)
    graph = candidate.graph
    names = [value.name for value in graph.output]
    read = {  # the values whose shapes the rewrites look at, besides the outputs
        name
        for node in graph.node
        if node.op_type in ("Resize", "Gather", "DequantizeLinear")
        for name in (node.input[0], node.output[0])
    }
    watched = sorted(read - set(names))
    try:
        feeds = sample_feeds(merged, _sample_batch(merged), dimension)
        values = make_session(merged, watched).run(names + watched, feeds)  # type: ignore[attr-defined]
    except Exception as error:  # noqa: BLE001 - the graph as grafted is kept
        _LOG.debug("the grafted graph's shapes could not be read: %s", error)
        return merged
    shapes = {name: value.shape for name, value in zip(names + watched, values, strict=True)}
    if not lean_rewrites(candidate, shapes):
        return merged
    prune_graph(graph)
    return _kept_if_same(merged, candidate, dimension, before=values[: len(names)])


def _sample_batch(merged: onnx.ModelProto) -> int:
    image = next(value for value in merged.graph.input if value.name == fmt.INPUT_IMAGE)
    return image.type.tensor_type.shape.dim[0].dim_value or 2


def _kept_if_same(
    merged: onnx.ModelProto,
    candidate: onnx.ModelProto,
    dimension: int,
    before: list[np.ndarray] | None = None,
) -> onnx.ModelProto:
    """``candidate`` with ``merged``'s metadata and declared inputs and outputs, where it
    computes the same outputs as ``merged`` (``before``, where already computed) on a sample
    batch; ``merged`` otherwise."""
    try:
        feeds = sample_feeds(merged, _sample_batch(merged), dimension)
        if before is None:
            before = make_session(merged).run(None, feeds)  # type: ignore[attr-defined]
        after = make_session(candidate).run(None, feeds)  # type: ignore[attr-defined]
    except Exception as error:  # noqa: BLE001 - the graph as grafted is kept
        _LOG.debug("a rewrite of the grafted graph does not run: %s", error)
        return merged
    names = [value.name for value in merged.graph.output]
    if names != [value.name for value in candidate.graph.output] or not all(
        a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(before, after, strict=True)
    ):
        return merged
    del candidate.metadata_props[:]
    candidate.metadata_props.extend(merged.metadata_props)
    candidate.doc_string = merged.doc_string
    declared = {value.name: value for value in (*merged.graph.input, *merged.graph.output)}
    for value in (*candidate.graph.input, *candidate.graph.output):  # types and doc strings
        if value.name in declared:
            value.CopyFrom(declared[value.name])
    return candidate
