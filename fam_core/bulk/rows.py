"""The rows a bulk job writes: one per image and model, results or the error's reason.

The heatmap is the pipeline's wire format (float16 little-endian bytes of ``[H, W]``, see
:func:`fam_core.pipeline.heatmap_bytes`) with its shape; the embedding float32 bytes.

Example:
    >>> from fam_core.pipeline import ExplainResult, Match
    >>> row = error_row("a.png", "m", 3, "image 0: not an image")
    >>> row["error"], row["shard"], row["heatmap"]
    ('image 0: not an image', 3, None)
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
import torch

from fam_core.pipeline import ExplainResult, heatmap_from_bytes

METRIC_COLUMNS: tuple[str, ...] = (
    "average_drop",
    "increase_confidence",
    "deletion_auc",
    "insertion_auc",
)
"""Per-image faithfulness metrics (``--eval``; see :mod:`fam_core.bulk.evaluate`)."""

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("shard", pa.int32()),
        ("model", pa.string()),
        ("error", pa.string()),  # "" when the image was explained
        ("label", pa.string()),
        ("class_index", pa.int32()),
        ("score", pa.float32()),
        ("explained_score", pa.float32()),
        ("scores", pa.list_(pa.float32())),
        ("method", pa.string()),
        ("target_layer", pa.string()),
        ("resolution", pa.string()),
        ("heatmap", pa.binary()),  # float16 little-endian [H, W]
        ("heatmap_shape", pa.list_(pa.int32())),
        ("embedding", pa.binary()),  # float32 little-endian [D]
        ("overlay_png", pa.binary()),
        *((name, pa.float32()) for name in METRIC_COLUMNS),
    ]
)
"""The columns of every shard; absent values are nulls."""

Row = dict[str, Any]


def result_row(
    image_id: str, model: str, shard: int, result: ExplainResult, metrics: dict[str, float]
) -> Row:
    """The row of an explained image."""
    heatmap = result.heatmap
    row = error_row(image_id, model, shard, "")
    row.update(
        label=result.prediction.label,
        class_index=result.prediction.index,
        score=result.prediction.score,
        explained_score=result.explained_score,
        scores=list(result.scores),
        embedding=result.embedding,
        overlay_png=result.overlay_png,
    )
    if heatmap is not None:
        row.update(
            method=heatmap.method,
            target_layer=heatmap.target_layer,
            resolution=heatmap.resolution,
            heatmap=heatmap.data,
            heatmap_shape=list(heatmap.shape),
        )
    for name, value in metrics.items():
        row[name] = None if math.isnan(value) else value
    return row


def error_row(image_id: str, model: str, shard: int, reason: str) -> Row:
    """The row of an image that could not be explained, with the one-line reason."""
    row: Row = dict.fromkeys(ROW_SCHEMA.names)
    row.update(id=image_id, model=model, shard=shard, error=reason)
    return row


def to_table(rows: list[Row]) -> pa.Table:
    """Rows as a table of :data:`ROW_SCHEMA`."""
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def decode_heatmap(row: Row) -> torch.Tensor:
    """The ``[H, W]`` float32 heatmap of a row.

    Example:
        >>> from fam_core.pipeline import heatmap_bytes
        >>> decode_heatmap({"heatmap": heatmap_bytes(torch.ones(1, 2)), "heatmap_shape": [1, 2]})
        tensor([[1., 1.]])
    """
    if row.get("heatmap") is None:
        raise ValueError(f"row {row.get('id')!r} has no heatmap: {row.get('error') or 'none'}")
    return heatmap_from_bytes(row["heatmap"], tuple(row["heatmap_shape"]))
