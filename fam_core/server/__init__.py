"""gRPC front door: ``fam.v1.FamService`` and the Open Inference Protocol over one pipeline.

:class:`FamServer` and :class:`ServerConfig` are imported on first use, so that the package's
stub-free modules (:mod:`.status`, :mod:`.kserve_model`) can be imported in a process that
holds another set of OIP stubs (KServe's): both declare the protobuf package ``inference``.

Example:
    >>> from fam_core.server import FamServer, ServerConfig
    >>> server = FamServer.with_default_models(ServerConfig(port=0))  # doctest: +SKIP
    >>> port = server.start()  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fam_core.extras import require

require(
    "serve",
    "grpc",
    "grpc_health.v1",
    "grpc_reflection.v1alpha",
    "google.protobuf",
    "prometheus_client",
)

if TYPE_CHECKING:
    from fam_core.server.app import FamServer, ServerConfig

__all__ = ["FamServer", "ServerConfig"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fam_core.server import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
