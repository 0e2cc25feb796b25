"""Prometheus metrics of one server, in a registry of its own."""

from __future__ import annotations

import hmac
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from fam_core.pipeline import Pipeline

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


LANES = ("cheap", "expensive")


class ServerMetrics:
    """Requests, latency, batch sizes, errors by status, cancelled requests and cost lanes.

    ``fam_cancelled_total`` counts requests stopped unfinished (answered ``UNAVAILABLE``
    when the drain's grace ended, or abandoned by their client): never counted ``OK``.

    Example:
        >>> metrics = ServerMetrics()
        >>> metrics.observe("Explain", "m", "OK", 0.01)
        >>> metrics.registry.get_sample_value(
        ...     "fam_requests_total", {"rpc": "Explain", "model": "m", "code": "OK"})
        1.0
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fam_requests", "Requests by RPC, model and status code",
            ["rpc", "model", "code"], registry=self.registry,
        )  # fmt: skip
        self.errors = Counter(
            "fam_errors", "Failed requests by RPC and status code",
            ["rpc", "code"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "fam_request_latency_seconds", "Request latency by RPC",
            ["rpc"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "fam_batch_size", "Images per model pass",
            ["model"], buckets=BATCH_BUCKETS, registry=self.registry,
        )  # fmt: skip

        self.step = Histogram(
            "fam_expensive_step_seconds",
            "Seconds per step of an expensive batch: how long a cheap request may wait",
            ["model"], buckets=STEP_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.cancelled = Counter(
            "fam_cancelled", "Requests stopped unfinished (drain grace ended, client gone)",
            ["rpc", "model"], registry=self.registry,
        )  # fmt: skip
        self.lane_queued, self.lane_running = lane_gauges(self.registry)

    def observe(
        self, rpc: str, model: str, code: str, seconds: float, *, cancelled: bool = False
    ) -> None:
        self.requests.labels(rpc, model, code).inc()
        self.latency.labels(rpc).observe(seconds)
        if code != "OK":
            self.errors.labels(rpc, code).inc()
        if cancelled:
            self.cancelled.labels(rpc, model).inc()

    def watch_lanes(self, pipeline: Pipeline) -> None:
        """``fam_lane_queued`` and ``fam_lane_running`` read from ``pipeline`` at scrape."""
        watch_lanes(pipeline, self.lane_queued, self.lane_running)

    def observe_batch(self, model: str, images: int) -> None:
        self.batch_size.labels(model).observe(images)

    def observe_step(self, model: str, seconds: float) -> None:
        self.step.labels(model).observe(seconds)

    def serve_http(self, port: int, host: str = "127.0.0.1", token: str | None = None) -> int:
        """Expose ``/metrics`` over HTTP; returns the port (``0`` picks a free one).

        With ``token``, a request without ``Authorization: Bearer <token>`` gets 401.
        """
        registry = self.registry
        expected = None if token is None else f"Bearer {token}".encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] not in ("/", "/metrics"):
                    self._reply(404, b"not found\n", "text/plain")
                    return
                given = self.headers.get("Authorization", "").encode()
                if expected is not None and not hmac.compare_digest(given, expected):
                    self._reply(401, b"missing or wrong bearer token\n", "text/plain")
                    return
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                if status == 401:
                    self.send_header("WWW-Authenticate", "Bearer")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # quiet: the server logs JSON
                return

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="fam-metrics", daemon=True).start()
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()


def lane_gauges(registry: CollectorRegistry) -> tuple[Gauge, Gauge]:
    """``fam_lane_queued`` (jobs waiting) and ``fam_lane_running`` (images running) gauges,
    by model and cost lane, in ``registry``."""
    queued = Gauge(
        "fam_lane_queued", "Jobs waiting per model and cost lane",
        ["model", "lane"], registry=registry,
    )  # fmt: skip
    running = Gauge(
        "fam_lane_running", "Images running per model and cost lane",
        ["model", "lane"], registry=registry,
    )  # fmt: skip
    return queued, running


def watch_lanes(pipeline: Pipeline, queued: Gauge, running: Gauge) -> None:
    """Make the :func:`lane_gauges` read ``pipeline``'s lanes at each scrape."""
    for name in pipeline.registry.names():
        for lane in LANES:
            queued.labels(name, lane).set_function(
                lambda name=name, lane=lane: pipeline.lanes(name)["queued"][lane]
            )
            running.labels(name, lane).set_function(
                lambda name=name, lane=lane: pipeline.lanes(name)["running"][lane]
            )
