"""gRPC front door: ``fam.v1.FamService`` and the Open Inference Protocol over one pipeline.

Example:
    >>> from fam_core.server import FamServer, ServerConfig
    >>> server = FamServer.with_default_models(ServerConfig(port=0))  # doctest: +SKIP
    >>> port = server.start()  # doctest: +SKIP
"""

from fam_core.extras import require

require(
    "serve",
    "grpc",
    "grpc_health.v1",
    "grpc_reflection.v1alpha",
    "google.protobuf",
    "prometheus_client",
)

from fam_core.server.app import FamServer, ServerConfig  # noqa: E402

__all__ = ["FamServer", "ServerConfig"]
