"""Map pipeline errors to gRPC status codes."""

from __future__ import annotations

import time

import grpc

from fam_core.pipeline.errors import PipelineError

NO_DEADLINE_S = 7 * 24 * 3600.0


def status_code(error: PipelineError) -> grpc.StatusCode:
    """The gRPC status of a pipeline error, e.g. ``InvalidArgument`` -> ``INVALID_ARGUMENT``."""
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The call's deadline as a ``time.monotonic()`` instant (``None``: the client set none)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_S:  # some clients send "infinite" deadlines
        return None
    return time.monotonic() + remaining
