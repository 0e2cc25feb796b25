"""Typed request errors: each front door maps them to its own status.

===================  ======================  =========
error                gRPC code               HTTP
===================  ======================  =========
InvalidArgument      INVALID_ARGUMENT        400
UnsupportedFormat    INVALID_ARGUMENT        415
NotFound             NOT_FOUND               404
FailedPrecondition   FAILED_PRECONDITION     400
ResourceExhausted    RESOURCE_EXHAUSTED      413 / 429 / 503
LaneFull             RESOURCE_EXHAUSTED      429 (with a retry hint)
DeadlineExceeded     DEADLINE_EXCEEDED       504
Unavailable          UNAVAILABLE             503
Cancelled            UNAVAILABLE             503
===================  ======================  =========

A method name that names no method at all (a typo: names match ignoring case, and the message
names the closest) is ``InvalidArgument``, like any bad option; a method that exists but that
the model does not serve (not in its ONNX graph, needs fitting, its extra not installed) is
``NotFound``, like an unknown model.

``InvalidArgument``, ``NotFound`` and ``FailedPrecondition`` are ``ValueError`` subclasses, so library callers that
catch ``ValueError`` keep working.
"""

from __future__ import annotations

from typing import ClassVar


class PipelineError(Exception):
    """Base of every error a request can cause; ``code`` names the gRPC status."""

    code: ClassVar[str] = "INTERNAL"
    http_status: ClassVar[int] = 500


class InvalidArgument(PipelineError, ValueError):
    """The request is malformed: undecodable image, wrong shape or dtype, empty batch, an
    option out of range, a method name that names no method."""

    code = "INVALID_ARGUMENT"
    http_status = 400


class UnsupportedFormat(InvalidArgument):
    """An image in a format the server does not accept (``Limits.formats``)."""

    http_status = 415


class NotFound(PipelineError, ValueError):
    """The request names a model the server does not have, or a method its model does not
    serve."""

    code = "NOT_FOUND"
    http_status = 404


class FailedPrecondition(PipelineError, ValueError):
    """The model cannot do what the request asks as it is configured: a search of a model
    without an ``index``."""

    code = "FAILED_PRECONDITION"
    http_status = 400


# One class per status (and a subclass where the HTTP status differs): callers catch by type,
# so the classes below repeat the same two-line shape on purpose.
class ResourceExhausted(PipelineError):
    """The request is over a size limit, or the server's queue is full."""

    code = "RESOURCE_EXHAUSTED"
    http_status = 413


class Overloaded(ResourceExhausted):
    """The server is busy (its in-flight decode budget is spent); retrying later may work."""

    http_status = 503


class LaneFull(ResourceExhausted):
    """A model has as much expensive work queued as it may: retry after ``retry_after_s``.

    Example:
        >>> LaneFull("busy", retry_after_s=3).retry_after_s
        3
    """

    http_status = 429

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(PipelineError):
    """The request's deadline passed before its result was ready."""

    code = "DEADLINE_EXCEEDED"
    http_status = 504


class Unavailable(PipelineError):
    """The pipeline is shutting down, or the model failed to load (the reason says why)."""

    code = "UNAVAILABLE"
    http_status = 503


class Cancelled(Unavailable):
    """The request was running when the server's drain grace ended: its work was stopped."""


BY_CODE: dict[str, type[PipelineError]] = {
    error.code: error
    for error in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        DeadlineExceeded,
        Unavailable,
    )
}
"""The most general error of each gRPC code: what a client raises for a refusal.

Example:
    >>> BY_CODE["NOT_FOUND"].__name__
    'NotFound'
"""
