"""The rows a Ray dataset streams back, read by a thread so the driver can wait with a timeout.

Ray Data's iterator blocks until the next batch; read in a thread into a small queue, the
batches reach the main thread, which waits with a timeout (to checkpoint on time while no row
comes back) and handles signals at once.

Example:
    >>> class Batch:
    ...     def __init__(self, rows): self.rows = rows
    ...     def to_pylist(self): return self.rows
    >>> class Dataset:
    ...     def iter_batches(self, **options): return iter([Batch([{"id": "a"}])])
    >>> with RowStream(Dataset()) as stream:
    ...     stream.get(timeout=5), stream.get(timeout=5)
    ([{'id': 'a'}], None)
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from fam_core.bulk.rows import Row

_END = object()


class RowStream:
    """The rows of ``dataset`` read by a thread into a queue, so the main thread waits with a
    timeout (to checkpoint on time) and handles signals at once.

    Leaving the ``with`` block stops the thread at its next row; a thread still waiting on Ray
    ends when Ray is shut down.
    """

    def __init__(self, dataset: Any) -> None:
        self._batches: queue.Queue[object] = queue.Queue(maxsize=8)
        self._stop = threading.Event()
        self.thread = threading.Thread(
            target=self._read, args=(dataset,), name="fam-bulk-rows", daemon=True
        )

    def __enter__(self) -> RowStream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def get(self, timeout: float | None) -> list[Row] | None:
        """The next batch of rows (``None`` at the end); ``queue.Empty`` after ``timeout``."""
        item = self._batches.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return None if item is _END else item  # type: ignore[return-value]

    def drain(self) -> list[list[Row]]:
        """The batches that came back and are still queued (on a stop: to be saved too)."""
        batches = []
        while True:
            try:
                item = self._batches.get_nowait()
            except queue.Empty:
                return batches
            if isinstance(item, list):
                batches.append(item)

    def _read(self, dataset: Any) -> None:
        try:
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                if not self._put(batch.to_pylist()):
                    return
            self._put(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            self._put(error)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._batches.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False
