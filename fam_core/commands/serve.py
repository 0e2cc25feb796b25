"""``fam serve``: the gRPC server; ``fam serve-demo``: one request through it, then stop."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fam_core.pipeline import ModelRegistry


def add_command(commands) -> None:  # type: ignore[no-untyped-def]
    serve = commands.add_parser(
        "serve", help="serve predictions with heatmaps over gRPC (fam.v1 and the OIP)"
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
    serve.add_argument("--port", type=int, default=50051, help="port (default 50051, 0: any)")
    serve.add_argument("--max-batch-size", type=int, default=32, help="images per pass (1: off)")
    serve.add_argument("--max-delay-ms", type=float, default=2.0, help="batching delay")
    serve.add_argument("--workers", type=int, default=32, help="RPC threads")
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics on this port")
    serve.add_argument("--token-file", help="file with the bearer token clients must send")
    serve.add_argument("--tls-cert", help="PEM certificate (with --tls-key: serve TLS)")
    serve.add_argument("--tls-key", help="PEM private key")
    serve.add_argument(
        "--grace", type=float, default=30.0, help="seconds in-flight RPCs get on stop"
    )
    serve.set_defaults(run=_serve)

    demo = commands.add_parser(
        "serve-demo", help="start the server, explain one image through a gRPC client, stop"
    )
    demo.add_argument("--out", default="out/serve-demo", help="folder for the overlay PNG")
    demo.add_argument("--model", default="default-classifier")
    demo.set_defaults(run=_serve_demo)


def _serve(args: argparse.Namespace) -> int:
    from fam_core.pipeline import BatchingConfig
    from fam_core.server import FamServer, ServerConfig
    from fam_core.server.logs import configure_logging

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    token = None
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise ValueError(f"token file {args.token_file} is empty")
    configure_logging()
    registry = load_registry(args.models, args.model)
    for failed in registry.failed():
        print(f"fam serve: model {failed.name!r} is not ready: {failed.reason}", flush=True)
    server = FamServer(
        registry,
        ServerConfig(
            host=args.host,
            port=args.port,
            max_workers=args.workers,
            batching=BatchingConfig(args.max_batch_size, args.max_delay_ms),
            token=token,
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
            metrics_port=args.metrics_port,
            grace_s=args.grace,
        ),
    )
    port = server.start()
    print(f"fam serve: listening on {args.host}:{port}", flush=True)

    def stop(_signum: int, _frame: object) -> None:
        import threading

        threading.Thread(target=server.stop, name="fam-stop", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.wait()
    server.stop()  # returns once the stop thread's work is done
    return 0


def load_registry(models_dir: str | None, models: list[str]) -> ModelRegistry:
    """The models of ``--models DIR`` and each ``--model CONFIG`` (default: the default models).

    A model that fails to load is reported not ready while the others serve; when none
    loads, the first reason is raised as a one-line ``ValueError``.
    """
    from fam_core.pipeline import DEFAULT_MODELS, ModelRegistry
    from fam_core.pipeline.models import directory_sources

    sources: list[str | Path] = []
    if models_dir:
        sources += directory_sources(models_dir)
    sources += models
    registry = ModelRegistry.load(sources or list(DEFAULT_MODELS), keep_going=True)
    if len(registry) == 0:
        failed = registry.failed()
        raise ValueError(f"no model loaded: {failed[0].name}: {failed[0].reason}")
    return registry


def _serve_demo(args: argparse.Namespace) -> int:
    from fam_core.server.demo import run_serve_demo

    run_serve_demo(Path(args.out), model=args.model)
    return 0
