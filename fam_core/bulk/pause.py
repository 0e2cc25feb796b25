"""Named points where a test can stop a bulk job: it pauses there until it is killed.

A test sets ``FAM_BULK_PAUSE_AT`` to a point's name and ``FAM_BULK_PAUSE_FILE`` to a path; the
job that reaches that point writes the file (a barrier the test waits on) and sleeps until a
signal ends it. Kills then land at a known moment instead of after a guessed delay. Unset,
nothing pauses.

Example:
    >>> pause_at("checkpoint-1")  # FAM_BULK_PAUSE_AT unset: returns at once
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_AT_VARIABLE = "FAM_BULK_PAUSE_AT"
"""The environment variable naming the point to pause at."""
PAUSE_FILE_VARIABLE = "FAM_BULK_PAUSE_FILE"
"""The environment variable naming the file written on pausing (it holds the point's name)."""


def pause_at(point: str) -> None:
    """Pause for ever here if ``FAM_BULK_PAUSE_AT`` names ``point``; else return."""
    if os.environ.get(PAUSE_AT_VARIABLE) != point:
        return
    barrier = Path(os.environ[PAUSE_FILE_VARIABLE])
    temporary = barrier.with_name(f".{barrier.name}.{os.getpid()}.tmp")
    temporary.write_text(point)
    os.replace(temporary, barrier)  # the waiting test never reads it half written
    while True:  # a signal's handler raises out of the sleep
        time.sleep(3600)
