"""What a bulk job explains: the image list, in a fixed order, cut into fixed shards.

An image set is a folder (every image file under it), a glob, or Parquet files with an ``id``
and an ``image`` (encoded bytes) column. Items are sorted by id and shard ``k`` holds items
``[k * size, (k + 1) * size)``, so the same input and shard size always give the same shards,
whatever the number of actors or the batch size; a restarted job finds which are written.

Example:
    >>> plan = Plan.of([Item(f"{i}.png", f"/d/{i}.png") for i in range(5)], shard_size=2)
    >>> [len(s) for s in plan.shards], plan.shards[2][0].id, plan.shard_name(2)
    ([2, 2, 1], '4.png', 'shard-00002-of-00003.parquet')
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
)
"""Files a folder or glob contributes (by suffix, case-insensitive); content is checked later."""
PARQUET_COLUMNS: tuple[str, str] = ("id", "image")
"""The columns a Parquet image set must have: a unique string id and the encoded image."""


@dataclass(frozen=True)
class Item:
    """One image: its id (path relative to the set's root, or the Parquet ``id``) and where it
    is read from (the file; ``""`` for Parquet rows)."""

    id: str
    path: str = ""


@dataclass(frozen=True)
class Plan:
    """The items of a job cut into shards; ``parquet`` lists the input files of a Parquet set."""

    shards: tuple[tuple[Item, ...], ...]
    parquet: tuple[str, ...] = ()

    @classmethod
    def of(cls, items: list[Item], shard_size: int, parquet: tuple[str, ...] = ()) -> Plan:
        """Sort ``items`` by id and cut them into shards of ``shard_size``."""
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard size must be a positive int, got {shard_size!r}")
        ordered = sorted(items, key=lambda item: item.id)
        ids = [item.id for item in ordered]
        duplicates = sorted({i for i, j in zip(ids, ids[1:], strict=False) if i == j})
        if duplicates:
            raise ValueError(f"image ids must be unique; repeated: {duplicates[:3]}")
        shards = tuple(
            tuple(ordered[start : start + shard_size])
            for start in range(0, len(ordered), shard_size)
        )
        return cls(shards, parquet)

    def __len__(self) -> int:
        return sum(len(shard) for shard in self.shards)

    def shard_name(self, index: int) -> str:
        """The output file of shard ``index``."""
        return f"shard-{index:05d}-of-{len(self.shards):05d}.parquet"

    def fingerprint(self) -> str:
        """A digest of the ids in their shards: a restart must see the same plan."""
        digest = hashlib.sha256()
        for index, shard in enumerate(self.shards):
            for item in shard:
                digest.update(f"{index}\t{item.id}\n".encode())
        return digest.hexdigest()


def list_images(source: str) -> tuple[list[Item], tuple[str, ...]]:
    """The items of a folder, glob or Parquet set, and the Parquet files (empty otherwise).

    Example:
        >>> list_images("/no/such/folder")
        Traceback (most recent call last):
        ...
        ValueError: --images /no/such/folder: no such folder or file, and no file matches it as a glob
    """
    path = Path(source)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and _is_image(p)]
        if not files:
            parquet = sorted(path.glob("*.parquet"))
            if parquet:
                return _parquet_items([str(p) for p in parquet])
            raise ValueError(f"--images {source}: the folder holds no image or Parquet file")
        return [Item(p.relative_to(path).as_posix(), str(p.resolve())) for p in files], ()
    if path.is_file() and path.suffix == ".parquet":
        return _parquet_items([str(path)])
    matches = sorted(Path(m) for m in glob.glob(source, recursive=True) if Path(m).is_file())
    if not matches:
        raise ValueError(
            f"--images {source}: no such folder or file, and no file matches it as a glob"
        )
    if all(m.suffix == ".parquet" for m in matches):
        return _parquet_items([str(m) for m in matches])
    files = [m for m in matches if _is_image(m)]
    if not files:
        raise ValueError(f"--images {source}: no image file matches")
    root = Path(os.path.commonpath([str(m.resolve().parent) for m in files]))
    return [Item(m.resolve().relative_to(root).as_posix(), str(m.resolve())) for m in files], ()


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _parquet_items(files: list[str]) -> tuple[list[Item], tuple[str, ...]]:
    import pyarrow.parquet as pq

    items: list[Item] = []
    for file in files:
        schema = pq.read_schema(file)
        missing = [c for c in PARQUET_COLUMNS if c not in schema.names]
        if missing:
            raise ValueError(
                f"--images {file}: a Parquet image set needs columns {list(PARQUET_COLUMNS)}; "
                f"missing {missing}"
            )
        ids = pq.read_table(file, columns=["id"]).column("id").to_pylist()
        if any(not isinstance(i, str) or not i for i in ids):
            raise ValueError(f"--images {file}: the id column must hold non-empty strings")
        items.extend(Item(i) for i in ids)
    return items, tuple(files)
