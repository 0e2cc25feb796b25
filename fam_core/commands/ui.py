"""``fam ui``: the browser viewer (:mod:`fam_core.ui`) for one model, run in-process or on a
running ``fam.v1`` server."""

from __future__ import annotations

import argparse
import sys


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add the ``ui`` subcommand."""
    parser = commands.add_parser(
        "ui", help="a web page: drop an image, see its classes or neighbours with their heatmaps"
    )
    parser.add_argument(
        "--model",
        default="default-embedding",
        metavar="CONFIG",
        help="a model name, folder, config.yaml or .onnx file; with --server: a served model's "
        "name (default: default-embedding)",
    )
    parser.add_argument(
        "--server", metavar="HOST:PORT", help="ask this fam.v1 server instead of loading the model"
    )
    parser.add_argument("--token-file", help="with --server: file with its bearer token")
    parser.add_argument(
        "--references",
        metavar="DIR",
        help="embedding models: a small gallery (images, sub-folders as labels) to search "
        "instead of the model's index; without either the model's prototypes are shown",
    )
    parser.add_argument(
        "--top-k", type=int, help="neighbours shown (default: the model's top_k, else 10)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: loopback)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000, 0: any)")
    parser.set_defaults(run=_ui)


def _ui(args: argparse.Namespace) -> int:
    from fam_core.pipeline import PipelineError
    from fam_core.ui.app import ViewerServer
    from fam_core.ui.backends import LocalBackend, RemoteBackend, ViewerBackend
    from fam_core.ui.views import load_gallery

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.token_file and not args.server:
        raise ValueError("--token-file needs --server")
    gallery = load_gallery(args.references) if args.references else ()
    backend: ViewerBackend
    if args.server:
        token = None
        if args.token_file:
            with open(args.token_file, encoding="utf-8") as file:
                token = file.read().strip()
        try:
            backend = RemoteBackend(args.server, args.model, token=token)
        except PipelineError as error:
            raise ValueError(str(error)) from None
    else:
        backend = LocalBackend.load(args.model)
    task = backend.describe().task
    if gallery and task != "embedding":
        backend.close()
        raise ValueError(f"--references needs an embedding model; {args.model} is a {task} model")
    viewer = ViewerServer(
        backend, host=args.host, port=args.port, top_k=args.top_k, gallery=gallery
    )
    print(f"fam ui: {viewer.url} ({backend.model}; Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        viewer.serve_forever()
    finally:
        viewer.stop()
    return 0
