"""Load: 2,000 Explain requests from 16 concurrent clients against `fam serve` on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from serving_helpers import png_bytes, rss_bytes

from fam_core.server.stubs import fam_pb2, fam_pb2_grpc

REQUESTS = 2_000
CLIENTS = 16
WINDOW = 500
SERVE = (
    "import sys, fam_core.cli as cli; cli.COMMAND_MODULES = ('fam_core.commands.serve',); "
    "raise SystemExit(cli.main(sys.argv[1:]))"
)


@pytest.fixture(scope="module")
def served(model_dir):
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", "--models", str(model_dir), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        line = process.stdout.readline()
        assert "listening on" in line
        yield process, int(line.rsplit(":", 1)[1])
    finally:
        process.terminate()
        process.wait(60)


DEFAULT_METHODS = {"default-embedding": "fam", "default-classifier": "cam"}


def valid_heatmap(result, model: str) -> bool:  # type: ignore[no-untyped-def]
    heatmap = result.heatmap
    if (
        list(heatmap.shape) != [84, 84]
        or heatmap.dtype != "float16"
        or heatmap.method != DEFAULT_METHODS[model]
    ):
        return False
    values = np.frombuffer(heatmap.data, dtype="<f2")
    return (
        values.size == 84 * 84
        and bool(np.isfinite(values).all())
        and float(values.min()) == 0.0
        and float(values.max()) == 1.0
    )


def test_2000_requests_from_16_clients(served) -> None:
    process, port = served
    images = [png_bytes(seed) for seed in range(32)]
    models = ("default-classifier", "default-embedding")
    counter = iter(range(REQUESTS))
    lock = threading.Lock()
    errors: list[str] = []
    invalid: list[int] = []
    done = [0]
    rss: dict[str, int] = {}

    def client() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = fam_pb2_grpc.FamServiceStub(channel)
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                request = fam_pb2.ExplainRequest(
                    model=models[index % 2], images=[fam_pb2.Image(encoded=images[index % 32])]
                )
                try:
                    response = stub.Explain(request, timeout=60)
                except grpc.RpcError as error:
                    with lock:
                        errors.append(f"{error.code()}: {error.details()}")
                    continue
                ok = len(response.results) == 1 and valid_heatmap(
                    response.results[0], models[index % 2]
                )
                with lock:
                    if not ok:
                        invalid.append(index)
                    done[0] += 1
                    if done[0] == WINDOW:
                        rss["first"] = rss_bytes(process.pid)

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    seconds = time.monotonic() - started
    rss["last"] = rss_bytes(process.pid)
    print(f"{REQUESTS} requests in {seconds:.1f} s ({REQUESTS / seconds:.0f}/s); RSS {rss}")
    assert errors == []
    assert invalid == []
    assert done[0] == REQUESTS
    assert rss["last"] - rss["first"] < 50 * 1024 * 1024
