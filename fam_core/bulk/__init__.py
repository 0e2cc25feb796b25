"""Bulk explanation of whole image sets on Ray Data (``fam bulk``).

The images are listed and cut into fixed shards (:mod:`.plan`), read by Ray Data, explained
by a pool of actors that each load the model once and run the request pipeline every front
door shares (:mod:`.worker`), and written as one Parquet file per shard in ``OUT/shards``
(:mod:`.shards`); the rows of unfinished shards are saved every ``checkpoint_seconds``
(:mod:`.checkpoints`), every file is written atomically (:mod:`.atomic`), and a restarted job
skips what is saved. :mod:`.rows` is the row schema, :mod:`.evaluate` the per-image
faithfulness metrics, :mod:`.summary` the aggregates (mean heatmaps, metric means, the domain
gap, checkpoint montages), :mod:`.job` the driver, :mod:`.stream` its reading of the rows,
:mod:`.session` the Ray session it starts and shuts down, :mod:`.pause` the points where a
test can stop it.

Example:
    >>> from fam_core.bulk import BulkOptions
    >>> BulkOptions(models=("default-classifier",), images="pics/").shard_size
    256
"""

from fam_core.bulk.job import BulkOptions, BulkReport, run_bulk
from fam_core.bulk.rows import ROW_SCHEMA, decode_heatmap
from fam_core.bulk.shards import read_rows
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
