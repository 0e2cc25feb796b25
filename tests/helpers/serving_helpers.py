"""Helpers of the serving tests: a temporary model folder, images, a server on loopback."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import grpc
import httpx
import pytest
import torch
from model_helpers import conv4_config
from PIL import Image

from fam_core.models.training import save_model
from fam_core.pipeline import ModelRegistry
from fam_core.server import FamServer, ServerConfig
from fam_core.server.stubs import grpc_service_pb2 as oip_pb2
from fam_core.server.stubs import grpc_service_pb2_grpc as oip_grpc

CLASSES = ("tulip", "rose", "daisy", "iris", "lily")
ROOT = Path(__file__).resolve().parents[2]
KSERVE_START_TIMEOUT_S = 180.0
OIP_CLIENT = Path(__file__).with_name("oip_client.py")
HANDLER_FILE = ROOT / "handlers" / "fam_handler.py"


def make_model_dir(root: Path) -> Path:
    """Random-init Conv4 models: an embedding model with 5 prototypes and a 5-class classifier."""
    torch.manual_seed(0)
    embedding = conv4_config(
        "default-embedding", "embedding", class_names=CLASSES, prototypes="prototypes.pt"
    )
    model = embedding.build().eval()
    save_model(model, embedding, root / "default-embedding")
    with torch.no_grad():  # prototypes: embeddings of 5 random images, one per class
        prototypes = model(embedding.normalize(torch.rand(5, 3, 84, 84)))
    torch.save(prototypes, root / "default-embedding" / "prototypes.pt")
    classifier = conv4_config(
        "default-classifier",
        "classifier",
        backbone_kwargs={"num_classes": len(CLASSES)},
        class_names=CLASSES,
    )
    save_model(classifier.build().eval(), classifier, root / "default-classifier")
    return root


TINY_CLASSIFIER = "tiny-classifier"


def make_tiny_classifier_dir(root: Path) -> Path:
    """A random-init 3-class Conv4 classifier at 32x32 in ``root/tiny-classifier``: small
    enough that a Score-FAM step is short, for the scheduling and drain tests."""
    torch.manual_seed(0)
    config = conv4_config(
        TINY_CLASSIFIER,
        "classifier",
        backbone_kwargs={"num_classes": 3},
        input_size=32,
        class_names=("a", "b", "c"),
    )
    save_model(config.build().eval(), config, root / TINY_CLASSIFIER)
    return root


def png_bytes(seed: int, size: tuple[int, int] = (96, 120)) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[0], size[1], 3, generator=generator) * 255).to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels, with one empty data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process, from /proc."""
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def default_sigint_in_children() -> Iterator[None]:
    """Children started inside get Ctrl-C's default action even where the suite itself ignores
    SIGINT (a background job of a shell without job control), which a Python child would
    otherwise inherit and keep: a handled signal is reset to its default by ``exec``. (A
    ``preexec_fn`` would do it in the child, but makes ``subprocess`` fork instead of vfork,
    which runs gRPC's fork handlers there: they can abort the child.)"""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def free_port() -> int:
    """A loopback port nothing listens on (yet)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback(port: int) -> grpc.Channel:
    """A plaintext gRPC channel to ``port`` on 127.0.0.1 (a context manager that closes it)."""
    return grpc.insecure_channel(f"127.0.0.1:{port}")


@contextmanager
def running_server(
    registry: ModelRegistry, config: ServerConfig, *, grace: float = 2.0
) -> Iterator[FamServer]:
    """``FamServer(registry, config)``, started; on exit stopped with ``grace`` seconds for the
    calls in flight."""
    server = FamServer(registry, config)
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=grace)


def wait_until(
    condition: Callable[[], bool], what: str, timeout_s: float = 60.0, poll_s: float = 0.01
) -> None:
    """Poll ``condition`` every ``poll_s`` until it holds; fail after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"waited {timeout_s:g} s for {what}"
        time.sleep(poll_s)


def sigterm_until_not_ready(
    process: subprocess.Popen, channel: grpc.Channel, timeout: float, poll_s: float = 0.01
) -> float:
    """Check that the server behind ``channel`` is ready (OIP ``ServerReady``), send ``process``
    SIGTERM and wait until it is not; returns the ``time.monotonic()`` of the signal."""
    oip = oip_grpc.GRPCInferenceServiceStub(channel)

    def ready() -> bool:
        return oip.ServerReady(oip_pb2.ServerReadyRequest(), timeout=timeout).ready

    assert ready()
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    wait_until(lambda: not ready(), "ServerReady false", poll_s=poll_s)
    return signalled


@contextmanager
def kserve_server(models: Path, log_path: Path) -> Iterator[tuple[str, str]]:
    """``(http base URL, gRPC address)`` of ``fam serve --engine kserve --models models`` in
    a subprocess on free ports, its output in ``log_path``; stopped on exit."""
    http_port, grpc_port = free_port(), free_port()
    log = log_path.open("w+")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "fam_core", "serve", "--engine", "kserve", "--models", str(models)]
        + ["--port", str(http_port), "--grpc-port", str(grpc_port), "--workers", "4"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + KSERVE_START_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"the KServe server exited with {process.returncode}:\n{log.read()}")
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(
                    f"the KServe server was not ready in {KSERVE_START_TIMEOUT_S} s:\n{log.read()}"
                )
            time.sleep(0.5)
        yield base, f"127.0.0.1:{grpc_port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def oip_client_report(scenario: str, *args: str, timeout: float) -> dict:
    """The JSON report of ``oip_client.py scenario *args``, run in a process of its own (its
    tritonclient stubs clash with fam's in one process); fails the test if the client fails."""
    done = subprocess.run(
        [sys.executable, str(OIP_CLIENT), scenario, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_handler(module_name: str) -> ModuleType:
    """``handlers/fam_handler.py`` imported afresh as ``module_name``, as TorchServe loads it
    (from its file, not as part of a package)."""
    spec = importlib.util.spec_from_file_location(module_name, HANDLER_FILE)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class HandlerContext:
    """The parts of TorchServe's context the FAM handler uses, for the handler in process:
    ``statuses`` holds ``(code, phrase)`` by request index, for the answers that set one."""

    def __init__(self, model_dir: Path) -> None:
        self.system_properties = {"model_dir": str(model_dir)}
        self.statuses: dict[int, tuple[int, str]] = {}
        self.metrics = type(
            "Metrics", (), {"add_time": lambda *a: None, "add_counter": lambda *a: None}
        )()

    def get_request_header(self, idx: int, name: str) -> None:
        return None

    def get_all_request_header(self, idx: int) -> dict[str, str]:
        return {}

    def set_response_header(self, idx: int, name: str, value: str) -> None:
        pass

    def set_response_content_type(self, idx: int, value: str) -> None:
        pass

    def set_response_status(self, code: int, phrase: str, idx: int) -> None:
        self.statuses[idx] = (code, phrase)
