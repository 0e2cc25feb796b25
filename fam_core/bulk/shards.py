"""Shard files: written atomically, found again on restart, checked against the job's plan.

A shard is written to a temporary name in the output folder and renamed over its final name
(``os.replace`` is atomic on one file system), so a killed job leaves whole shards or none;
``job.json`` records the plan's fingerprint and the settings, and a restart with another plan
or other settings into the same folder is refused instead of mixing results.

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

from fam_core.bulk.rows import Row, to_table

JOB_FILE = "job.json"


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
    _write_atomically(path, json.dumps(settings, indent=1, sort_keys=True).encode())


def done_shards(out: Path, names: list[str]) -> set[int]:
    """Indices of the shards in ``names`` whose files are written."""
    return {index for index, name in enumerate(names) if (out / name).is_file()}


def write_shard(out: Path, name: str, rows: list[Row]) -> Path:
    """Write ``rows`` to ``out / name`` atomically; rows sorted by id and model."""
    rows = sorted(rows, key=lambda r: (r["id"], r["model"]))
    path = out / name
    temporary = out / f".{name}.{os.getpid()}.tmp"
    pq.write_table(to_table(rows), temporary)
    os.replace(temporary, path)
    return path


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
