"""``fam serve``: the gRPC server (or, with ``--engine kserve``, the KServe model server);
``fam serve-demo``: one request through the gRPC server, then stop."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fam_core.pipeline import BatchingConfig, Limits, ModelRegistry


def add_command(commands) -> None:  # type: ignore[no-untyped-def]
    serve = commands.add_parser(
        "serve",
        help="serve predictions with heatmaps over gRPC (fam.v1 and the OIP), or on KServe",
    )
    serve.add_argument(
        "--engine",
        choices=ENGINES,
        default="grpc",
        help="grpc (default): fam's gRPC server; kserve: a KServe model server (REST v1 and "
        "v2 on --port, default 8080; gRPC v2 on --grpc-port; pip install 'fam-core[kserve]')",
    )
    serve.add_argument(
        "--models", help="folder of */config.yaml and *.onnx (default: the default models)"
    )
    serve.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="CONFIG",
        help="a model name, folder, config.yaml or .onnx file (repeatable; with --models too)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface (default: loopback)")
    serve.add_argument(
        "--port", type=int, help="port (default 50051, 0: any; kserve: the HTTP port, 8080)"
    )
    serve.add_argument(
        "--grpc-port", type=int, default=8081, help="kserve: the gRPC v2 port (default 8081)"
    )
    serve.add_argument("--max-batch-size", type=int, default=32, help="images per pass (1: off)")
    serve.add_argument("--max-delay-ms", type=float, default=2.0, help="batching delay")
    serve.add_argument(
        "--max-queued-expensive",
        type=int,
        default=16,
        metavar="IMAGES",
        help="images of expensive work (Score-FAM, Score-CAM, Ablation-CAM, L2-CAF, ...) that "
        "may wait per model; more are refused with RESOURCE_EXHAUSTED / HTTP 429 and a retry "
        "hint (default 16)",
    )
    serve.add_argument(
        "--expensive-concurrency",
        type=int,
        default=1,
        metavar="N",
        help="expensive batches running at once, all models together (default 1); cheap "
        "requests never wait behind them",
    )
    serve.add_argument("--workers", type=int, default=32, help="RPC threads")
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics on this port")
    serve.add_argument("--metrics-host", help="interface of /metrics (default: --host)")
    serve.add_argument("--metrics-token-file", help="file with the bearer token /metrics requires")
    serve.add_argument(
        "--health-port",
        type=_health_port,
        default="auto",
        metavar="PORT|auto|off",
        help="gRPC health and OIP ServerLive/ServerReady/ModelReady from threads of their own "
        "that request load cannot starve: point probes here (default auto: --port + 1, "
        "any free port with --port 0; 0: any free port; off: none)",
    )
    serve.add_argument(
        "--formats",
        default="png,jpeg,webp",
        help="image formats accepted (default png,jpeg,webp; also bmp, gif, tiff, ico)",
    )
    serve.add_argument("--max-pixels", type=int, default=16_000_000, help="pixels per image")
    serve.add_argument("--max-decoded-mb", type=int, default=512, help="decoded MiB per request")
    serve.add_argument(
        "--max-inflight-decoded-mb",
        type=int,
        default=1024,
        help="decoded MiB of all requests being decoded at once",
    )
    serve.add_argument("--token-file", help="file with the bearer token clients must send")
    serve.add_argument("--tls-cert", help="PEM certificate (with --tls-key: serve TLS)")
    serve.add_argument("--tls-key", help="PEM private key")
    serve.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds in-flight requests get on SIGTERM (readiness turns false at once); "
        "requests still running then are cancelled and answered UNAVAILABLE",
    )
    serve.set_defaults(run=_serve)

    demo = commands.add_parser(
        "serve-demo", help="start the server, explain one image through a gRPC client, stop"
    )
    demo.add_argument("--out", default="out/serve-demo", help="folder for the overlay PNG")
    demo.add_argument("--model", default="default-classifier")
    demo.set_defaults(run=_serve_demo)


ENGINES = ("grpc", "kserve")
DEFAULT_PORTS = {"grpc": 50051, "kserve": 8080}
_GRPC_ONLY = ("token_file", "tls_cert", "tls_key", "metrics_port", "metrics_token_file")
"""Options KServe does not take (its ingress authenticates and terminates TLS; it serves
``/metrics`` on the HTTP port and health on ``/v2/health/*``)."""


def _serve(args: argparse.Namespace) -> int:
    from fam_core.pipeline import BatchingConfig, Limits
    from fam_core.pipeline.models import load_registry

    if args.port is None:
        args.port = DEFAULT_PORTS[args.engine]
    for name, port in (("--port", args.port), ("--grpc-port", args.grpc_port)):
        if not 0 <= port <= 65535:
            raise ValueError(f"{name} must be in [0, 65535], got {port}")
    if args.engine == "kserve":
        given = [
            f"--{name.replace('_', '-')}" for name in _GRPC_ONLY if getattr(args, name) is not None
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)}: not with --engine kserve (KServe's ingress does auth and "
                "TLS; /metrics is on its HTTP port)"
            )
        if args.port == args.grpc_port:
            raise ValueError(f"--port and --grpc-port must differ, both are {args.port}")
    formats = tuple(f.strip().upper().replace("JPG", "JPEG") for f in args.formats.split(","))
    limits = Limits(
        max_pixels=args.max_pixels,
        max_decoded_bytes=args.max_decoded_mb * 1024 * 1024,
        max_inflight_decoded_bytes=args.max_inflight_decoded_mb * 1024 * 1024,
        formats=tuple(f for f in formats if f),
    )
    if args.grace < 0:
        raise ValueError(f"--grace must be >= 0 seconds, got {args.grace}")
    for option in ("max_queued_expensive", "expensive_concurrency"):
        if getattr(args, option) < 1:
            name = "--" + option.replace("_", "-")
            raise ValueError(f"{name} must be >= 1, got {getattr(args, option)}")
    batching = BatchingConfig(
        args.max_batch_size,
        args.max_delay_ms,
        max_queued_expensive=args.max_queued_expensive,
        expensive_concurrency=args.expensive_concurrency,
    )
    registry = load_registry(args.models, args.model)
    for failed in registry.failed():
        print(f"fam serve: model {failed.name!r} is not ready: {failed.reason}", flush=True)
    if args.engine == "kserve":
        from fam_core.server.kserve_model import serve as serve_kserve

        print(
            f"fam serve: KServe REST on port {args.port}, gRPC v2 on port {args.grpc_port} "
            "(all interfaces)",
            flush=True,
        )
        serve_kserve(
            registry,
            http_port=args.port,
            grpc_port=args.grpc_port,
            limits=limits,
            batching=batching,
            workers=args.workers,
            grace_s=args.grace,
        )
        _exit_at_once(0)
        return 0  # pragma: no cover
    return _serve_grpc(args, registry, limits, batching)


def _serve_grpc(
    args: argparse.Namespace, registry: ModelRegistry, limits: Limits, batching: BatchingConfig
) -> int:
    from fam_core.server import FamServer, ServerConfig
    from fam_core.server.logs import configure_logging

    token = _read_token(args.token_file)
    metrics_token = _read_token(args.metrics_token_file)
    configure_logging()
    server = FamServer(
        registry,
        ServerConfig(
            host=args.host,
            port=args.port,
            max_workers=args.workers,
            limits=limits,
            batching=batching,
            token=token,
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            metrics_token=metrics_token,
            health_port=args.health_port,
            grace_s=args.grace,
        ),
    )
    port = server.start()
    print(f"fam serve: listening on {args.host}:{port}", flush=True)
    if server.health_port is not None:
        print(f"fam serve: health and readiness on {args.host}:{server.health_port}", flush=True)

    def stop(_signum: int, _frame: object) -> None:
        import threading

        threading.Thread(target=server.stop, name="fam-stop", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.wait()
    server.stop()  # returns once the stop thread's work is done
    _exit_at_once(0)
    return 0  # pragma: no cover


def _exit_at_once(code: int) -> None:
    """End the process now that the server has stopped: Python's own teardown of torch, gRPC
    and their modules takes another second or more on a busy machine, and a drain promises
    to exit within the grace period plus 2 seconds."""
    import logging
    import os
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _health_port(text: str) -> int | str | None:
    """``--health-port``: a port, ``auto`` or ``off``."""
    if text in ("auto", "off"):
        return None if text == "off" else text
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port, auto or off, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535], got {port}")
    return port


def _read_token(path: str | None) -> str | None:
    if not path:
        return None
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def _serve_demo(args: argparse.Namespace) -> int:
    from fam_core.server.demo import run_serve_demo

    run_serve_demo(Path(args.out), model=args.model)
    return 0
