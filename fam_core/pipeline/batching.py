"""Micro-batching: concurrent jobs for one model run together, up to a size and a delay.

One worker thread per model owns the model: it takes the first waiting job, gathers more
until ``max_batch_size`` images are collected or ``max_delay_ms`` has passed, groups them by
:meth:`~fam_core.pipeline.engine.Job.batch_key` and runs each group in one pass. Jobs whose
deadline has passed are dropped unrun. The queue is bounded: a full queue is
:class:`~fam_core.pipeline.errors.ResourceExhausted`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from fam_core.pipeline.engine import run_jobs
from fam_core.pipeline.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from fam_core.pipeline.jobs import Computed, Job
from fam_core.pipeline.models import ServedModel


@dataclass(frozen=True)
class BatchingConfig:
    """Micro-batching settings.

    Attributes:
        max_batch_size: images in one pass (1 turns batching off).
        max_delay_ms: how long the first job of a batch waits for others.
        max_queue: jobs waiting per model before new ones are refused.

    Example:
        >>> BatchingConfig(max_batch_size=1).max_delay_ms
        2.0
    """

    max_batch_size: int = 32
    max_delay_ms: float = 2.0
    max_queue: int = 1024

    def __post_init__(self) -> None:
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int):
            raise TypeError(f"max_batch_size must be an int, got {self.max_batch_size!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not 0 <= self.max_delay_ms <= 10_000:
            raise ValueError(f"max_delay_ms must be in [0, 10000], got {self.max_delay_ms}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")


@dataclass
class _Pending:
    job: Job
    deadline: float | None  # time.monotonic()
    future: Future[Computed]


BatchObserver = Callable[[str, int], None]
"""Called with ``(model name, images in the pass)`` after every pass."""


class MicroBatcher:
    """The worker thread that runs one model's jobs in batches."""

    def __init__(
        self,
        served: ServedModel,
        config: BatchingConfig = BatchingConfig(),
        observer: BatchObserver | None = None,
    ) -> None:
        self.served = served
        self.config = config
        self._observer = observer
        self._queue: queue.Queue[_Pending | None] = queue.Queue(maxsize=config.max_queue)
        self._closed = False
        self._thread = threading.Thread(
            target=self._work, name=f"batcher-{served.name}", daemon=True
        )
        self._thread.start()

    def submit(self, job: Job, deadline: float | None = None) -> Future[Computed]:
        """Queue ``job``; the future holds its :class:`~fam_core.pipeline.engine.Computed`."""
        if self._closed:
            raise Unavailable("the server is shutting down")
        pending = _Pending(job, deadline, Future())
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            raise ResourceExhausted(
                f"model {self.served.name!r} has {self.config.max_queue} jobs waiting; retry later"
            ) from None
        return pending.future

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish the queued ones, stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)

    def _gather(self, first: _Pending) -> tuple[list[_Pending], bool]:
        batch, images = [first], len(first.job)
        end = time.monotonic() + self.config.max_delay_ms / 1000.0
        while images < self.config.max_batch_size:
            remaining = end - time.monotonic()
            try:
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
            images += len(item.job)
        return batch, False

    def _work(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch, stopping = self._gather(first)
            groups: dict[tuple[str, bool, int], list[_Pending]] = {}
            now = time.monotonic()
            for pending in batch:
                if not pending.future.set_running_or_notify_cancel():
                    continue
                if pending.deadline is not None and now >= pending.deadline:
                    pending.future.set_exception(
                        DeadlineExceeded("the deadline passed while the request was queued")
                    )
                    continue
                groups.setdefault(pending.job.batch_key(), []).append(pending)
            for group in groups.values():
                self._run(group)
        while True:  # refuse anything that raced with close()
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(Unavailable("the server is shutting down"))

    def _run(self, group: list[_Pending]) -> None:
        try:
            results = run_jobs(self.served, [pending.job for pending in group])
        except BaseException as error:  # noqa: BLE001 - every failure goes to its caller
            if len(group) > 1:  # isolate the job that failed
                for pending in group:
                    self._run_alone(pending)
                return
            group[0].future.set_exception(error)
            return
        if self._observer is not None:
            self._observer(self.served.name, sum(len(p.job) for p in group))
        for pending, result in zip(group, results, strict=True):
            pending.future.set_result(result)

    def _run_alone(self, pending: _Pending) -> None:
        try:
            (result,) = run_jobs(self.served, [pending.job])
        except BaseException as error:  # noqa: BLE001
            pending.future.set_exception(error)
            return
        if self._observer is not None:
            self._observer(self.served.name, len(pending.job))
        pending.future.set_result(result)
