"""Shard files: written atomically, found again on restart, checked against the job's plan.

Whole shards live in ``OUT/shards/`` and nothing else does, so the folder reads as one Parquet
data set (``pandas.read_parquet("OUT/shards")``, DuckDB on ``OUT/shards/*.parquet``). A
shard is written to a temporary name and renamed (:mod:`fam_core.bulk.atomic`), so a killed
job leaves whole shards or none; ``OUT/job.json`` records the plan's fingerprint and the
settings, and a restart with another plan or other settings into the same folder is refused
instead of mixing results. An output folder of the earlier layout (shards beside
``job.json``) has its shards moved into ``shards/`` when its job runs again.

Example:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> check_job(out, {"plan": "abc"}); check_job(out, {"plan": "abc"})
    >>> check_job(out, {"plan": "xyz"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --out /tmp/... holds another job (its plan differs); use a new --out folder
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from fam_core.bulk.atomic import remove_temporaries, write_atomically, write_bytes_atomically
from fam_core.bulk.rows import Row, to_table

JOB_FILE = "job.json"
SHARDS_FOLDER = "shards"
"""The folder of an output that holds the whole shards, and only them."""
SHARD_GLOB = "shard-*.parquet"


def check_job(out: Path, settings: dict[str, Any]) -> None:
    """Record ``settings`` in ``out`` (new folder) or check they are the recorded ones."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / JOB_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        differ = sorted(
            k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k)
        )
        if differ:
            raise ValueError(
                f"--out {out} holds another job (its {', '.join(differ)} differs); use a new --out folder"
            )
        return
    write_bytes_atomically(path, json.dumps(settings, indent=1, sort_keys=True).encode())


def prepare_output(out: Path) -> None:
    """Remove what a killed job left half written and move shards of the earlier layout."""
    folder = out / SHARDS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for old in sorted(out.glob(SHARD_GLOB)):
        os.replace(old, folder / old.name)
    for place in (out, folder, out / "montage"):
        if place.is_dir():
            remove_temporaries(place)


def shard_files(out: Path) -> list[Path]:
    """The shard files of an output folder, in shard order (either layout)."""
    files = sorted((Path(out) / SHARDS_FOLDER).glob(SHARD_GLOB))
    return files or sorted(Path(out).glob(SHARD_GLOB))


def done_shards(out: Path, names: list[str]) -> set[int]:
    """Indices of the shards in ``names`` whose files are written."""
    folder = out / SHARDS_FOLDER
    return {index for index, name in enumerate(names) if (folder / name).is_file()}


def write_shard(out: Path, name: str, rows: list[Row]) -> Path:
    """Write ``rows`` to ``out/shards/name`` atomically; rows sorted by id and model."""
    rows = sorted(rows, key=lambda r: (r["id"], r["model"]))
    folder = out / SHARDS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    table = to_table(rows)
    return write_atomically(folder / name, lambda temporary: pq.write_table(table, temporary))


def read_rows(out: str | Path, columns: list[str] | None = None) -> list[Row]:
    """Every row of a bulk job's output folder, ordered by shard, id and model."""
    files = shard_files(Path(out))
    rows = [row for file in files for row in pq.read_table(file, columns=columns).to_pylist()]
    if columns is None or {"shard", "id", "model"} <= set(columns):
        rows.sort(key=lambda r: (r["shard"], r["id"], r["model"]))
    return rows
