"""Micro-batching in cost lanes: cheap jobs never wait behind expensive ones.

One worker thread per model owns the model. Jobs wait in one of two lanes, by the cost class
their method declares (:func:`fam_core.explainers.registry.cost_class`; predicting only is
cheap):

* the **cheap** lane (CAM, FAM, Grad-CAM, ...) always goes first;
* the **expensive** lane (Score-FAM, Score-CAM, Ablation-CAM, L2-CAF, ...) runs when no cheap
  job waits, one batch at a time per model and at most ``expensive_concurrency`` batches at
  once over all models; while one runs, every forward pass of the model is a step
  (:mod:`fam_core.pipeline.steps`) at which waiting cheap jobs run first, so a cheap job waits
  at most one step of an expensive one.

Batches form within a lane only: the worker takes the first waiting job of the lane, gathers
more of the same lane until ``max_batch_size`` images are collected or ``max_delay_ms`` has
passed, groups them by :meth:`~fam_core.pipeline.jobs.Job.batch_key` and runs each group in one
pass. Jobs whose deadline has passed are dropped unrun; a running group whose every deadline
has passed stops at its next step.

Bounds: ``max_queue`` jobs wait per model (more: :class:`~fam_core.pipeline.errors.ResourceExhausted`);
``max_queued_expensive`` images of expensive work wait per model (more:
:class:`~fam_core.pipeline.errors.LaneFull`, with a retry hint from the lane's recent speed).
:meth:`MicroBatcher.cancel` ends a drain: queued jobs and the running one (at its next step)
fail with :class:`~fam_core.pipeline.errors.Cancelled`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

from fam_core.explainers.registry import CostClass
from fam_core.pipeline.engine import run_jobs
from fam_core.pipeline.errors import (
    Cancelled,
    DeadlineExceeded,
    LaneFull,
    PipelineError,
    ResourceExhausted,
    Unavailable,
)
from fam_core.pipeline.jobs import Computed, Job
from fam_core.pipeline.models import ServedModel
from fam_core.pipeline.steps import StepControl, stepping, watch_steps

CANCELLED_MESSAGE = "cancelled: the server is shutting down and the drain's grace period ended"
SLOT_POLL_S = 0.01  # how often a model waiting for an expensive slot looks at its cheap lane


@dataclass(frozen=True)
class BatchingConfig:
    """Micro-batching and cost-lane settings.

    Attributes:
        max_batch_size: images in one pass (1 turns batching off).
        max_delay_ms: how long the first job of a batch waits for others.
        max_queue: jobs waiting per model before new ones are refused.
        max_queued_expensive: images of expensive work waiting per model (not counting the
            running batch) before new expensive requests are refused with
            RESOURCE_EXHAUSTED (HTTP 429) and a retry hint; a request larger than this is
            taken only when no expensive work waits.
        expensive_concurrency: expensive batches running at once, all models together (each
            model runs one at a time).

    Example:
        >>> BatchingConfig(max_batch_size=1).max_delay_ms
        2.0
        >>> BatchingConfig().max_queued_expensive, BatchingConfig().expensive_concurrency
        (16, 1)
    """

    max_batch_size: int = 32
    max_delay_ms: float = 2.0
    max_queue: int = 1024
    max_queued_expensive: int = 16
    expensive_concurrency: int = 1

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "max_queue",
            "max_queued_expensive",
            "expensive_concurrency",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= self.max_delay_ms <= 10_000:
            raise ValueError(f"max_delay_ms must be in [0, 10000], got {self.max_delay_ms}")


@dataclass
class _Pending:
    job: Job
    deadline: float | None  # time.monotonic()
    future: Future[Computed]


BatchObserver = Callable[[str, int], None]
"""Called with ``(model name, images in the pass)`` after every pass."""
StepObserver = Callable[[str, float], None]
"""Called with ``(model name, seconds)`` for each step of an expensive batch: the time since
the batch began or since the cheap work run at its previous step ended; a cheap request waits
at most about this long."""


class MicroBatcher:
    """The worker thread that runs one model's jobs in batches, cheap lane first.

    ``expensive_slots`` is shared by the batchers of one pipeline: it caps the expensive
    batches running at once (default: a semaphore of ``config.expensive_concurrency``).
    """

    def __init__(
        self,
        served: ServedModel,
        config: BatchingConfig = BatchingConfig(),
        observer: BatchObserver | None = None,
        *,
        expensive_slots: threading.Semaphore | None = None,
        step_observer: StepObserver | None = None,
    ) -> None:
        self.served = served
        self.config = config
        self._observer = observer
        self._step_observer = step_observer
        self._slots = expensive_slots or threading.BoundedSemaphore(config.expensive_concurrency)
        self._lanes: dict[CostClass, deque[_Pending]] = {"cheap": deque(), "expensive": deque()}
        self._queued_expensive_images = 0
        self._seconds_per_expensive_image: float | None = None
        # the groups running: an expensive one, and a cheap one during the expensive one's step
        self._running: list[tuple[CostClass, list[_Pending]]] = []
        self._changed = threading.Condition()
        self._closed = False
        self._cancelled = False
        if served.model is not None:
            watch_steps(served.model)
        self._thread = threading.Thread(
            target=self._work, name=f"batcher-{served.name}", daemon=True
        )
        self._thread.start()

    # -- callers
    def submit(self, job: Job, deadline: float | None = None) -> Future[Computed]:
        """Queue ``job`` in its cost lane; the future holds its
        :class:`~fam_core.pipeline.jobs.Computed`."""
        lane = job.cost_class()
        pending = _Pending(job, deadline, Future())
        with self._changed:
            if self._closed or self._cancelled:
                raise Unavailable("the server is shutting down")
            if sum(len(queued) for queued in self._lanes.values()) >= self.config.max_queue:
                raise ResourceExhausted(
                    f"model {self.served.name!r} has {self.config.max_queue} jobs waiting; "
                    "retry later"
                )
            if lane == "expensive":
                queued = self._queued_expensive_images
                if queued and queued + len(job) > self.config.max_queued_expensive:
                    raise LaneFull(
                        f"model {self.served.name!r} already has {queued} images of expensive "
                        f"work waiting, its limit is {self.config.max_queued_expensive} "
                        f"(method {job.method!r} is expensive): retry later, or use a cheap "
                        "method",
                        retry_after_s=self._retry_after(),
                    )
                self._queued_expensive_images += len(job)
            self._lanes[lane].append(pending)
            self._changed.notify_all()
        return pending.future

    def queued(self) -> dict[CostClass, int]:
        """Jobs waiting in each lane (not the running batch)."""
        with self._changed:
            return {lane: len(jobs) for lane, jobs in self._lanes.items()}

    def running(self) -> dict[CostClass, int]:
        """Images running in each lane now."""
        counts: dict[CostClass, int] = {"cheap": 0, "expensive": 0}
        for lane, group in list(self._running):
            counts[lane] += sum(len(pending.job) for pending in group)
        return counts

    def cancel(self) -> None:
        """End a drain: queued jobs fail with :class:`Cancelled` at once, the running batch at
        its next step; new jobs are refused."""
        with self._changed:
            self._cancelled = True
            waiting = [p for lane in self._lanes.values() for p in lane]
            for lane in self._lanes.values():
                lane.clear()
            self._queued_expensive_images = 0
            self._changed.notify_all()
        for pending in waiting:
            _settle(pending.future, error=Cancelled(CANCELLED_MESSAGE))

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish the queued ones, stop the worker (waiting up to
        ``timeout`` seconds for it); jobs still unanswered then fail with :class:`Cancelled`."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.cancel()
            for pending in [p for _, group in list(self._running) for p in group]:
                _settle(pending.future, error=Cancelled(CANCELLED_MESSAGE))

    # -- the worker
    def _retry_after(self) -> int:
        """Seconds until the queued expensive work is likely done, at the recent speed."""
        per_image = self._seconds_per_expensive_image or 1.0
        return max(1, math.ceil(per_image * self._queued_expensive_images))

    def _work(self) -> None:
        while True:
            with self._changed:
                while not (self._closed or any(self._lanes.values())):
                    self._changed.wait()
                if not any(self._lanes.values()):  # closed and nothing left
                    return
                cheap_waiting = bool(self._lanes["cheap"])
            if cheap_waiting:
                self._run_batch(self._gather("cheap", self.config.max_delay_ms), "cheap")
            elif self._slots.acquire(timeout=SLOT_POLL_S):
                try:
                    self._run_batch(
                        self._gather("expensive", self.config.max_delay_ms), "expensive"
                    )
                finally:
                    self._slots.release()

    def _gather(self, lane: CostClass, delay_ms: float) -> list[_Pending]:
        """The lane's first job and more of the same lane, up to the batch size or delay."""
        queue = self._lanes[lane]
        batch: list[_Pending] = []
        images = 0
        end = time.monotonic() + delay_ms / 1000.0
        with self._changed:
            while images < self.config.max_batch_size:
                if queue:
                    pending = queue.popleft()
                    batch.append(pending)
                    images += len(pending.job)
                    if lane == "expensive":
                        self._queued_expensive_images -= len(pending.job)
                    continue
                remaining = end - time.monotonic()
                if not batch or remaining <= 0 or self._closed or self._cancelled:
                    break
                self._changed.wait(remaining)
        return batch

    def _run_batch(self, batch: list[_Pending], lane: CostClass) -> None:
        groups: dict[tuple[str, bool, int], list[_Pending]] = {}
        now = time.monotonic()
        for pending in batch:
            if not pending.future.set_running_or_notify_cancel():
                continue
            if pending.deadline is not None and now >= pending.deadline:
                _settle(
                    pending.future,
                    error=DeadlineExceeded("the deadline passed while the request was queued"),
                )
                continue
            groups.setdefault(pending.job.batch_key(), []).append(pending)
        for group in groups.values():
            started = time.perf_counter()
            self._run(group, lane)
            if lane == "expensive":
                seconds = (time.perf_counter() - started) / sum(len(p.job) for p in group)
                previous = self._seconds_per_expensive_image
                self._seconds_per_expensive_image = (
                    seconds if previous is None else 0.7 * previous + 0.3 * seconds
                )

    def _control(self, group: list[_Pending], lane: CostClass) -> StepControl:
        def stop_reason() -> PipelineError | None:
            if self._cancelled:
                return Cancelled(CANCELLED_MESSAGE)
            now = time.monotonic()
            if all(p.deadline is not None and now >= p.deadline for p in group):
                return DeadlineExceeded("the deadline passed while the request was running")
            return None

        if lane == "cheap":
            return StepControl(stop_reason)
        last_step = [time.perf_counter()]

        def between() -> None:
            if self._step_observer is not None:
                self._step_observer(self.served.name, time.perf_counter() - last_step[0])
            self._serve_cheap()
            last_step[0] = time.perf_counter()

        return StepControl(stop_reason, between)

    def _serve_cheap(self) -> None:
        """At a step of an expensive batch: run the cheap jobs waiting now, no delay."""
        with self._changed:
            waiting = bool(self._lanes["cheap"])
        if waiting:
            self._run_batch(self._gather("cheap", 0.0), "cheap")

    def _run(self, group: list[_Pending], lane: CostClass) -> None:
        self._running.append((lane, group))
        control = self._control(group, lane)
        try:
            with stepping(control):
                results = run_jobs(self.served, [pending.job for pending in group])
        except (Cancelled, DeadlineExceeded) as error:
            for pending in group:
                _settle(pending.future, error=error)
            return
        except BaseException as error:  # noqa: BLE001 - every failure goes to its caller
            if len(group) > 1:  # isolate the job that failed
                for pending in group:
                    self._run_alone(pending, control)
                return
            _settle(group[0].future, error=error)
            return
        finally:
            self._running = [item for item in self._running if item[1] is not group]
        if self._observer is not None:
            self._observer(self.served.name, sum(len(p.job) for p in group))
        for pending, result in zip(group, results, strict=True):
            _settle(pending.future, result=result)

    def _run_alone(self, pending: _Pending, control: StepControl) -> None:
        try:
            with stepping(control):
                (result,) = run_jobs(self.served, [pending.job])
        except BaseException as error:  # noqa: BLE001
            _settle(pending.future, error=error)
            return
        if self._observer is not None:
            self._observer(self.served.name, len(pending.job))
        _settle(pending.future, result=result)


def _settle(
    future: Future[Computed],
    *,
    result: Computed | None = None,
    error: BaseException | None = None,
) -> None:
    """Answer ``future`` unless it already has an answer (a drain may have given it one)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:
        pass
