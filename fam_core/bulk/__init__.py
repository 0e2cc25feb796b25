"""Bulk explanation of whole image sets on Ray Data (``fam bulk``).

The images are listed and cut into fixed shards (:mod:`.plan`), read by Ray Data, explained
by a pool of actors that each load the model once and run the request pipeline every front
door shares (:mod:`.worker`), and written as one Parquet file per shard, atomically
(:mod:`.shards`); a restarted job skips the shards already written. :mod:`.rows` is the row
schema, :mod:`.evaluate` the per-image faithfulness metrics, :mod:`.summary` the aggregates
(mean heatmaps, metric means, the domain gap, checkpoint montages), :mod:`.job` the driver.

Example:
    >>> from fam_core.bulk import BulkOptions
    >>> BulkOptions(models=("default-classifier",), images="pics/").shard_size
    256
"""

from fam_core.bulk.job import BulkOptions, BulkReport, run_bulk
from fam_core.bulk.rows import ROW_SCHEMA, decode_heatmap, read_rows
from fam_core.bulk.worker import ExplainSettings

__all__ = [
    "ROW_SCHEMA",
    "BulkOptions",
    "BulkReport",
    "ExplainSettings",
    "decode_heatmap",
    "read_rows",
    "run_bulk",
]
