"""Every RPC goes through :meth:`Calls.run`: errors to status codes, metrics, one log line."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from fam_core.pipeline.errors import PipelineError
from fam_core.server.logs import LOGGER, log_event
from fam_core.server.metrics import ServerMetrics
from fam_core.server.status import status_code

T = TypeVar("T")


class Calls:
    """Runs RPC bodies: a :class:`PipelineError` aborts with its status, anything else INTERNAL."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def run(self, rpc: str, model: str, context: grpc.ServicerContext, body: Callable[[], T]) -> T:
        started = time.perf_counter()
        code = "OK"
        message = ""
        try:
            return body()
        except PipelineError as error:
            code, message = error.code, str(error)
            context.abort(status_code(error), message)
        except Exception as error:
            code, message = "INTERNAL", f"{type(error).__name__}: {error}"
            LOGGER.exception({"event": "internal_error", "rpc": rpc, "model": model})
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {message}")
        finally:
            seconds = time.perf_counter() - started
            self.metrics.observe(rpc, model, code, seconds)
            log_event(
                "rpc", rpc=rpc, model=model, code=code, ms=round(1000 * seconds, 2),
                **({"error": message} if message else {}),
            )  # fmt: skip
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
