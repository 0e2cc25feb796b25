"""Atomic file writes: a file is whole or absent, never half written.

Every file of a bulk job is written to a hidden temporary name in its folder
(``.NAME.PID.tmp``) and renamed over its final name (``os.replace``, atomic on one file
system), so a job killed at any moment leaves the previous version or the new one. A
temporary that a killed job left behind is removed by :func:`remove_temporaries` when the job
runs again.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_bytes_atomically(folder / "a.json", b"{}").read_bytes()
    b'{}'
    >>> sorted(p.name for p in folder.iterdir())
    ['a.json']
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from fam_core.bulk.pause import pause_at

_TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp$")


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before its rename: hidden, in the same folder, with our pid."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary)`` then rename the temporary to ``path``; return ``path``.

    On an exception (a signal's included) the temporary is removed and ``path`` is unchanged.
    """
    path = Path(path)
    temporary = temporary_path(path)
    try:
        write(temporary)
        pause_at(f"replace {path.name}")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomically(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return write_atomically(path, lambda temporary: temporary.write_bytes(data))


def remove_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries in ``folder`` whose writer is no longer running; return them."""
    removed = []
    for path in sorted(Path(folder).glob(".*.tmp")):
        match = _TEMPORARY.match(path.name)
        if match and not _running(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier job in this process: no longer written
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
