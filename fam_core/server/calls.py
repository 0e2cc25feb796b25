"""Every RPC goes through :meth:`Calls.run`: errors to status codes, metrics, one log line.

A request stopped unfinished (:class:`~fam_core.pipeline.errors.Cancelled` when a drain's
grace ends, or a call no longer active when its body returns) is logged with
``"cancelled": true`` and counted in ``fam_cancelled_total``, never as ``OK``. A request
refused because its model's expensive lane is full carries a retry hint: trailing metadata
:data:`RETRY_AFTER_KEY` (milliseconds).

Names and messages that come from a request are bounded before they reach a metric label, a
log line or a status message: a metric is labelled by a served model's name, or
:data:`UNKNOWN_MODEL` for any other; logged names are cut to :data:`MAX_LOGGED_NAME`
characters and messages to :data:`MAX_MESSAGE`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import grpc

from fam_core.pipeline.errors import Cancelled, LaneFull, PipelineError
from fam_core.server.logs import LOGGER, log_event
from fam_core.server.metrics import ServerMetrics
from fam_core.server.status import status_code

T = TypeVar("T")
UNKNOWN_MODEL = "_unknown"
"""The ``model`` label of requests naming a model this server does not have."""
MAX_LOGGED_NAME = 128
MAX_MESSAGE = 1024
RETRY_AFTER_KEY = "retry-after-ms"
"""Trailing metadata of a RESOURCE_EXHAUSTED answer: when retrying may succeed (ms)."""


def shorten(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` characters, saying how long it was.

    Example:
        >>> shorten("x" * 10, 4)
        'xxxx...(10 chars)'
    """
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


class Calls:
    """Runs RPC bodies: a :class:`PipelineError` aborts with its status, anything else INTERNAL.

    ``models``: the names a metric may carry as its ``model`` label (served and failed models).
    """

    def __init__(self, metrics: ServerMetrics, models: Iterable[str] = ()) -> None:
        self.metrics = metrics
        self.models = frozenset(models)

    def label(self, model: str) -> str:
        """The metric label of a requested model name."""
        return model if model in self.models or model == "" else UNKNOWN_MODEL

    def run(self, rpc: str, model: str, context: grpc.ServicerContext, body: Callable[[], T]) -> T:
        started = time.perf_counter()
        code = "OK"
        message = ""
        cancelled = False
        logged = shorten(model, MAX_LOGGED_NAME)
        try:
            answer = body()
            if not context.is_active():  # the client went away, or the grace cut the call
                code, cancelled = "CANCELLED", True
            return answer
        except PipelineError as error:
            code, message = error.code, shorten(str(error), MAX_MESSAGE)
            cancelled = isinstance(error, Cancelled)
            if isinstance(error, LaneFull):
                context.set_trailing_metadata(((RETRY_AFTER_KEY, str(1000 * error.retry_after_s)),))
            context.abort(status_code(error), message)
        except Exception as error:
            code = "INTERNAL"
            message = shorten(f"{type(error).__name__}: {error}", MAX_MESSAGE)
            LOGGER.exception({"event": "internal_error", "rpc": rpc, "model": logged})
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {message}")
        finally:
            seconds = time.perf_counter() - started
            self.metrics.observe(rpc, self.label(model), code, seconds, cancelled=cancelled)
            log_event(
                "rpc", rpc=rpc, model=logged, code=code, ms=round(1000 * seconds, 2),
                **({"error": message} if message else {}),
                **({"cancelled": True} if cancelled else {}),
            )  # fmt: skip
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
