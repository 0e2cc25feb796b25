"""The gRPC server: both services, health, reflection, optional TLS and bearer token, metrics."""

from __future__ import annotations

import hmac
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fam_core.pipeline import BatchingConfig, Limits, ModelRegistry, Pipeline
from fam_core.server.calls import Calls
from fam_core.server.fam_service import FamServicer
from fam_core.server.logs import log_event
from fam_core.server.metrics import ServerMetrics
from fam_core.server.oip import InferenceServicer, ReadinessServicer
from fam_core.server.stubs import fam_pb2, fam_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc

MESSAGE_OVERHEAD = 1 << 20  # room for everything in a message besides the image bytes
FAM_SERVICE = fam_pb2.DESCRIPTOR.services_by_name["FamService"].full_name
OIP_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_PUBLIC_PREFIXES = ("/grpc.health.v1.Health/",)
HEALTH_WORKERS = 2
HEALTH_AUTO: Literal["auto"] = "auto"
"""``ServerConfig.health_port``'s default: the port after the main one."""
ANSWER_MARGIN_S = 1.0
"""After the grace, how long a cancelled request has to answer UNAVAILABLE itself (it stops at
its next model pass) before gRPC cuts the call."""
CLOSE_WAIT_S = 0.5
"""How long :meth:`FamServer.stop` then waits for each model's worker thread."""


def resolve_health_port(health_port: int | str | None, port: int) -> int | None:
    """The health port to bind for ``health_port`` and the main ``port`` (``None``: off).

    Example:
        >>> resolve_health_port("auto", 50051), resolve_health_port("auto", 0)
        (50052, 0)
        >>> resolve_health_port(None, 50051) is None, resolve_health_port(9000, 50051)
        (True, 9000)
    """
    if health_port is None:
        return None
    if health_port == HEALTH_AUTO:
        if port == 65535:
            raise ValueError("health_port 'auto' is the main port + 1: choose one below 65535")
        return port + 1 if port else 0
    if isinstance(health_port, bool) or not isinstance(health_port, int):
        raise ValueError(f"health_port must be a port, 'auto' or None, got {health_port!r}")
    if not 0 <= health_port <= 65535 or (health_port and health_port == port):
        raise ValueError(
            f"health_port must be in [0, 65535] and differ from the main port {port}, "
            f"got {health_port}"
        )
    return health_port


@dataclass(frozen=True)
class ServerConfig:
    """How the server listens and what it accepts.

    Attributes:
        host: interface; loopback by default.
        port: ``0`` picks a free port (see :meth:`FamServer.start`).
        max_workers: threads handling RPCs.
        max_concurrent_rpcs: RPCs in progress; more are refused with RESOURCE_EXHAUSTED.
        limits: request limits; messages larger than ``max_request_bytes`` plus 1 MiB are
            refused by gRPC itself with RESOURCE_EXHAUSTED.
        batching: micro-batching and cost lanes (``None``: none):
            :class:`~fam_core.pipeline.BatchingConfig` holds the limits of the expensive lane.
        token: bearer token every RPC but health checks must carry.
        tls_cert, tls_key: PEM files; both set serves TLS.
        metrics_port: ``/metrics`` over HTTP on this port (``None``: off, ``0``: a free port).
        metrics_host: the interface of ``/metrics`` (``None``: ``host``).
        metrics_token: bearer token ``/metrics`` requires (``None``: open).
        health_port: also answer gRPC health checks and the OIP ``ServerLive``,
            ``ServerReady`` and ``ModelReady`` on this port, from a small thread pool of their
            own that request load cannot starve; point liveness and readiness probes at it.
            ``"auto"`` (default): ``port + 1`` (a free port when ``port`` is ``0``);
            ``0``: a free port; ``None``: off (health then shares the request threads).
        grace_s: how long in-flight RPCs may take to finish on :meth:`FamServer.stop`; a
            request still running then is cancelled at its next model pass and answered
            UNAVAILABLE; the stop returns within about ``grace_s + 1.5`` seconds.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    max_workers: int = 32
    max_concurrent_rpcs: int = 256
    limits: Limits = field(default_factory=Limits)
    batching: BatchingConfig | None = field(default_factory=BatchingConfig)
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_port: int | None = None
    metrics_host: str | None = None
    metrics_token: str | None = None
    health_port: int | Literal["auto"] | None = HEALTH_AUTO
    grace_s: float = 30.0


class _BearerToken(grpc.ServerInterceptor):
    """Refuses RPCs without ``authorization: Bearer <token>`` (health checks stay open)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_PUBLIC_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(given, self._expected):
            return handler

        def deny(_request, context):  # type: ignore[no-untyped-def]
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        def deny_stream(_request, context):  # type: ignore[no-untyped-def]
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
            yield  # pragma: no cover

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny_stream)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny)


class FamServer:
    """A running gRPC server over a :class:`~fam_core.pipeline.Pipeline`.

    Health: the whole server (``""``), each service, and each model under its own name
    (``NOT_SERVING`` for a model that failed to load; its requests are ``UNAVAILABLE``).

    Example:
        >>> server = FamServer(ModelRegistry.from_names(), ServerConfig(port=0))  # doctest: +SKIP
        >>> port = server.start()  # doctest: +SKIP
        >>> server.stop()  # doctest: +SKIP
    """

    def __init__(self, registry: ModelRegistry, config: ServerConfig = ServerConfig()) -> None:
        if (config.tls_cert is None) != (config.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key file")
        self.config = config
        self.metrics = ServerMetrics()
        self.pipeline = Pipeline(
            registry,
            config.limits,
            config.batching,
            batch_observer=self.metrics.observe_batch,
            step_observer=self.metrics.observe_step,
        )
        self.metrics.watch_lanes(self.pipeline)
        self.health = health.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._stopped = False
        self._stop_lock = threading.Lock()
        self.health_port: int | None = None
        self._health_server: grpc.Server | None = None
        calls = Calls(
            self.metrics, registry.names() + [failed.name for failed in registry.failed()]
        )
        max_message = config.limits.max_request_bytes + MESSAGE_OVERHEAD
        self._server = grpc.server(
            futures.ThreadPoolExecutor(config.max_workers, thread_name_prefix="fam-rpc"),
            interceptors=[_BearerToken(config.token)] if config.token else [],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", max_message),
                ("grpc.max_send_message_length", max_message),
            ],
        )
        fam_pb2_grpc.add_FamServiceServicer_to_server(
            FamServicer(self.pipeline, calls), self._server
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.pipeline, calls), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (FAM_SERVICE, OIP_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self._health_bind = resolve_health_port(config.health_port, config.port)
        if self._health_bind is not None:
            self._health_server = grpc.server(
                futures.ThreadPoolExecutor(HEALTH_WORKERS, thread_name_prefix="fam-health"),
                maximum_concurrent_rpcs=64,
                options=[("grpc.max_receive_message_length", 64 * 1024)],
            )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
                ReadinessServicer(self.pipeline), self._health_server
            )

    @classmethod
    def with_default_models(cls, config: ServerConfig = ServerConfig()) -> FamServer:
        """Serve the default models (:data:`fam_core.package_data.DEFAULT_MODEL_NAMES`)."""
        return cls(ModelRegistry.from_names(), config)

    def start(self) -> int:
        """Bind, start serving, mark healthy; returns the bound port."""
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls_cert is not None and self.config.tls_key is not None:
            credentials = grpc.ssl_server_credentials(
                [(Path(self.config.tls_key).read_bytes(), Path(self.config.tls_cert).read_bytes())]
            )
            port = self._server.add_secure_port(address, credentials)
        else:
            port = self._server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        if self._health_server is not None:
            health_address = f"{self.config.host}:{self._health_bind}"
            self.health_port = (
                self._health_server.add_secure_port(health_address, credentials)
                if self.config.tls_cert is not None
                else self._health_server.add_insecure_port(health_address)
            )
            if self.health_port == 0:
                raise OSError(
                    f"cannot listen on {health_address} for health checks: choose another "
                    "health port (fam serve --health-port N) or turn it off (--health-port off)"
                )
            self._health_server.start()
        self._server.start()
        self.port = port
        for service in ("", FAM_SERVICE, OIP_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        registry = self.pipeline.registry
        for name in registry.names():  # one health service per model, named as the model
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        for failed in registry.failed():
            self.health.set(failed.name, health_pb2.HealthCheckResponse.NOT_SERVING)
            log_event("model_failed", model=failed.name, source=failed.source, error=failed.reason)
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(
                self.config.metrics_port,
                self.config.metrics_host or self.config.host,
                token=self.config.metrics_token,
            )
        log_event(
            "started", address=f"{self.config.host}:{port}", models=registry.names(),
            failed=[failed.name for failed in registry.failed()],
            tls=self.config.tls_cert is not None, auth=self.config.token is not None,
            metrics_port=self.metrics_port, health_port=self.health_port,
        )  # fmt: skip
        return port

    def stop(self, grace: float | None = None) -> None:
        """Drain: not ready at once (gRPC health ``NOT_SERVING``, OIP ``ServerReady`` false),
        refuse new RPCs, let in-flight ones finish for up to ``grace`` seconds, then cancel
        what still runs (it stops at its next model pass, answers UNAVAILABLE and is counted
        in ``fam_cancelled_total``) and release everything."""
        with self._stop_lock:  # a second caller waits until the first one has finished
            if self._stopped:
                return
            self.pipeline.start_drain()
            self.health.enter_graceful_shutdown()
            grace = self.config.grace_s if grace is None else grace
            log_event("stopping", grace_s=grace)
            end_of_grace = threading.Timer(grace, self._end_grace)
            end_of_grace.daemon = True
            end_of_grace.start()
            self._server.stop(grace + ANSWER_MARGIN_S).wait()
            end_of_grace.cancel()
            self.pipeline.cancel()  # nothing runs on after the calls are gone
            if self._health_server is not None:
                self._health_server.stop(0).wait()
            self.pipeline.close(CLOSE_WAIT_S)
            self.metrics.close()
            self._stopped = True
            log_event("stopped")

    def _end_grace(self) -> None:
        running = {
            name: lanes["running"]
            for name in self.pipeline.registry.names()
            if any((lanes := self.pipeline.lanes(name))["running"].values())
        }
        log_event("grace_ended", cancelling=running)
        self.pipeline.cancel()

    def wait(self) -> None:
        """Block until :meth:`stop` has finished."""
        self._server.wait_for_termination()

    def __enter__(self) -> FamServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(grace=5.0)
