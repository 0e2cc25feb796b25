"""Checks of a grafted graph before it is served.

Example:
    >>> runs_batched(grafted, (32, 32), 10)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import numpy as np
import onnx

from fam_core import onnx_format as fmt
from fam_core.exporters.onnx_graph import make_session, sample_image

__all__ = ["runs_batched"]


def runs_batched(merged: onnx.ModelProto, size: tuple[int, int], dimension: int) -> bool:
    """Whether the grafted graph runs a batch of 2 (a foreign graph may fix batch 1)."""
    feeds: dict[str, np.ndarray] = {fmt.INPUT_IMAGE: sample_image(size, 2)}
    names = {value.name for value in merged.graph.input}
    if fmt.INPUT_REFERENCES in names:
        feeds[fmt.INPUT_REFERENCES] = np.ones((1, dimension), dtype=np.float32)
    if fmt.INPUT_CLASS_INDEX in names:
        feeds[fmt.INPUT_CLASS_INDEX] = np.zeros(2, dtype=np.int64)
    try:
        make_session(merged).run(None, feeds)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - any failure means: keep the graph's own batch
        return False
    return True
