"""Checkpoints within a shard: the rows of an unfinished shard saved every few seconds.

The driver keeps the rows of each unfinished shard as they come back from the actors and,
once the oldest unsaved row is ``seconds`` old, writes every unsaved row as a part file,
``OUT/checkpoints/shard-KKKKK/part-NNNNN.parquet`` (atomically). When a shard's last row comes
back the whole shard is written (:func:`fam_core.bulk.shards.write_shard`) and its parts are
removed, so the shard files, their rows and their order do not depend on when checkpoints
fell. A restarted job reads the parts of its unfinished shards back (:func:`saved_rows`) and
explains only the images they lack: a kill loses at most ``seconds`` of returned work.

Example:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> collector = ShardCollector(out, {0: 2}, seconds=60.0)
    >>> collector.add({"id": "a.png", "model": "m", "shard": 0}), collector.unsaved
    (None, 1)
    >>> collector.checkpoint(), [p.name for p in checkpoint_folder(out, 0).iterdir()]
    (1, ['part-00000.parquet'])
    >>> sorted(saved_rows(out, 0, models=1))
    [('a.png', 'm')]
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from fam_core.bulk.atomic import remove_temporaries, write_atomically
from fam_core.bulk.pause import pause_at
from fam_core.bulk.rows import Row, to_table

CHECKPOINTS_FOLDER = "checkpoints"
DEFAULT_CHECKPOINT_SECONDS = 60.0
RowKey = tuple[str, str]
"""A row's image id and model."""


def checkpoint_folder(out: Path, shard: int) -> Path:
    """The folder of shard ``shard``'s part files."""
    return Path(out) / CHECKPOINTS_FOLDER / f"shard-{shard:05d}"


def saved_rows(out: Path, shard: int, models: int) -> dict[RowKey, Row]:
    """The rows the parts of ``shard`` hold, for the images with a row of every one of
    ``models`` models (an image is explained by all models in one pass, so all or none)."""
    folder = checkpoint_folder(out, shard)
    if not folder.is_dir():
        return {}
    remove_temporaries(folder)
    rows: dict[RowKey, Row] = {}
    for part in sorted(folder.glob("part-*.parquet")):
        for row in pq.read_table(part).to_pylist():
            rows[row["id"], row["model"]] = row
    per_image: dict[str, int] = {}
    for image_id, _ in rows:
        per_image[image_id] = per_image.get(image_id, 0) + 1
    return {key: row for key, row in rows.items() if per_image[key[0]] == models}


def remove_checkpoints(out: Path, shard: int) -> None:
    """Remove the parts of ``shard`` (once the whole shard is written), and the checkpoints
    folder once it is empty."""
    folder = checkpoint_folder(out, shard)
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()


class ShardCollector:
    """The rows of the unfinished shards, checkpointed every ``seconds``.

    Args:
        out: the output folder.
        expected: the number of rows of each unfinished shard (images times models).
        seconds: the most time a returned row stays unsaved.
        clock: seconds, monotonic (tests may pass their own).
    """

    def __init__(
        self,
        out: Path,
        expected: dict[int, int],
        seconds: float = DEFAULT_CHECKPOINT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.out, self.expected, self.seconds, self.clock = Path(out), expected, seconds, clock
        self.rows: dict[int, dict[RowKey, Row]] = {shard: {} for shard in expected}
        self._unsaved: dict[int, list[RowKey]] = {}
        self._oldest: float | None = None  # when the oldest unsaved row came back
        self.parts_written = 0

    def restore(self, shard: int, rows: dict[RowKey, Row]) -> None:
        """Start ``shard`` with rows saved by an earlier job (already on disk)."""
        self.rows[shard].update(rows)

    @property
    def unsaved(self) -> int:
        """Rows that came back and are not yet in a part file."""
        return sum(len(keys) for keys in self._unsaved.values())

    def add(self, row: Row) -> int | None:
        """Keep ``row``; return its shard if the shard is now complete, else ``None``.

        A row of a shard already complete, or one already kept (a retried task's), is ignored.
        """
        shard, key = row["shard"], (row["id"], row["model"])
        if shard not in self.rows or key in self.rows[shard]:
            return None
        self.rows[shard][key] = row
        self._unsaved.setdefault(shard, []).append(key)
        if self._oldest is None:
            self._oldest = self.clock()
        return shard if len(self.rows[shard]) == self.expected[shard] else None

    def seconds_to_checkpoint(self) -> float | None:
        """Seconds until the next checkpoint is due (0: now); ``None`` with nothing unsaved."""
        if self._oldest is None:
            return None
        return max(0.0, self._oldest + self.seconds - self.clock())

    def checkpoint(self) -> int:
        """Write every unsaved row as a part file of its shard; the number of rows written."""
        written = 0
        for shard, keys in sorted(self._unsaved.items()):  # a copy: saved shards leave
            folder = checkpoint_folder(self.out, shard)
            folder.mkdir(parents=True, exist_ok=True)
            numbers = [int(p.stem.split("-")[1]) for p in folder.glob("part-*.parquet")]
            table = to_table([self.rows[shard][key] for key in sorted(keys)])
            part = folder / f"part-{max(numbers, default=-1) + 1:05d}.parquet"
            write_atomically(part, lambda temporary, t=table: pq.write_table(t, temporary))
            del self._unsaved[shard]
            written += len(keys)
            self.parts_written += 1
            pause_at(f"checkpoint-{self.parts_written}")
        self._oldest = None
        return written

    def take(self, shard: int) -> list[Row]:
        """The rows of a complete ``shard``, which is then no longer collected."""
        self._unsaved.pop(shard, None)
        if not self._unsaved:
            self._oldest = None
        return list(self.rows.pop(shard).values())
