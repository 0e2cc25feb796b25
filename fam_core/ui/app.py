"""The viewer's HTTP server: the page, the model's description, and one answer per dropped
image, on the standard library's threading HTTP server (no web framework to install).

Routes: ``GET /`` the page; ``GET /api/model`` the model (name, task, methods, what the
gallery shows); ``POST /api/explain?method=NAME`` with the image bytes as the body: the JSON
of :func:`~fam_core.ui.views.explain_view`. A refused request gets its 4xx status and
``{"error": ONE LINE}``: a body over the request limit is refused (413) before it is read, an
undecodable image or unknown method by the pipeline's own checks; the server serves on.

Example:
    >>> import json, urllib.request
    >>> from fam_core.ui.backends import LocalBackend
    >>> viewer = ViewerServer(LocalBackend.load("default-classifier"), port=0)
    >>> viewer.start()
    >>> json.load(urllib.request.urlopen(viewer.url + "api/model"))["task"]
    'classifier'
    >>> viewer.stop()
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fam_core.messages import first_line
from fam_core.pipeline import PipelineError
from fam_core.ui.backends import ViewerBackend
from fam_core.ui.views import DEFAULT_TOP_K, GalleryImage, explain_view, view_kind

PAGE = "page.html"


class ViewerServer:
    """Serve the viewer for ``backend`` on ``host:port`` (``port=0``: a free one).

    Args:
        backend: the model, in-process or on a server.
        host: the interface (default: loopback only).
        port: the port.
        top_k: embedding models: neighbours shown (``None``: the model config's ``top_k``
            with an index, else :data:`~fam_core.ui.views.DEFAULT_TOP_K`).
        gallery: embedding models: a small gallery to search instead of the model's index
            (neither: the model's prototypes are shown).
    """

    def __init__(
        self,
        backend: ViewerBackend,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        top_k: int | None = None,
        gallery: Sequence[GalleryImage] = (),
    ) -> None:
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.backend = backend
        self.top_k = top_k
        self.gallery = tuple(gallery)
        self.page = resources.files("fam_core.ui").joinpath(PAGE).read_bytes()
        self._http = ThreadingHTTPServer((host, port), _handler(self))
        self._http.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._http.server_address[1])

    @property
    def url(self) -> str:
        host = self._http.server_address[0]
        return f"http://{host}:{self.port}/"

    def model_json(self) -> dict[str, Any]:
        """``GET /api/model``."""
        described = self.backend.describe()
        return {
            "name": described.name,
            "task": described.task,
            "kind": view_kind(described, bool(self.gallery)),
            "methods": list(described.methods),
            "default_method": described.default_method,
            "top_k": self.top_k or described.top_k or DEFAULT_TOP_K,
            "index": described.index,
            "gallery_size": len(self.gallery),
            "max_request_bytes": self.backend.max_request_bytes,
        }

    def explain_json(self, image: bytes, method: str | None) -> dict[str, Any]:
        """``POST /api/explain``."""
        return explain_view(
            self.backend, image, method=method, top_k=self.top_k, gallery=self.gallery
        )

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted."""
        self._http.serve_forever()

    def stop(self) -> None:
        """Stop serving and release the port and the backend."""
        self._http.shutdown()
        self._http.server_close()
        if self._thread is not None:
            self._thread.join()
        self.backend.close()


class RequestRefused(Exception):
    """A request the viewer answers with ``status`` and one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _handler(viewer: ViewerServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fam-ui"

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = urlsplit(self.path).path
            if path in ("/", "/index.html"):
                self._send(200, viewer.page, "text/html; charset=utf-8")
            elif path == "/api/model":
                self._answer(viewer.model_json)
            else:
                self._refuse(RequestRefused(404, f"no page {path}"))

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            parts = urlsplit(self.path)
            if parts.path != "/api/explain":
                self._refuse(RequestRefused(404, f"no endpoint {parts.path}"))
                return
            try:
                image = self._body()
            except RequestRefused as refused:
                self._refuse(refused)
                return
            method = (parse_qs(parts.query).get("method") or [""])[0] or None
            self._answer(lambda: viewer.explain_json(image, method))

        def _body(self) -> bytes:
            """The request body, its size checked before it is read."""
            length_header = self.headers.get("Content-Length")
            if length_header is None:
                raise RequestRefused(411, "send the image as the body, with a Content-Length")
            try:
                length = int(length_header)
            except ValueError:
                raise RequestRefused(400, "Content-Length is not a number") from None
            if length < 1:
                raise RequestRefused(400, "the body is empty: send a PNG, JPEG or WebP image")
            limit = viewer.backend.max_request_bytes
            if length > limit:
                raise RequestRefused(
                    413, f"the image has {length} bytes, over the limit of {limit} bytes"
                )
            return self.rfile.read(length)

        def _answer(self, body: Any) -> None:
            try:
                answer = body()
            except PipelineError as error:
                self._refuse(RequestRefused(error.http_status, first_line(error)))
                return
            except (ValueError, TypeError) as error:
                self._refuse(RequestRefused(400, first_line(error)))
                return
            self._send(200, json.dumps(answer).encode(), "application/json")

        def _refuse(self, refused: RequestRefused) -> None:
            # an unread body is not read: the connection closes after the answer
            self.close_connection = True
            body = json.dumps({"error": str(refused)}).encode()
            self._send(refused.status, body, "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base's name
            pass  # the CLI prints the address; per-request lines would drown it

    return Handler
