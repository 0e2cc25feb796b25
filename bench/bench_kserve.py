"""KServe: REST v2 explain throughput over ``fam serve``'s OIP gRPC explain throughput.

Run: .venv/bin/python bench/bench_kserve.py [--rounds 5] [--requests 400] [--clients 16]

Two servers on loopback serve the same models with the same pipeline and micro-batching
(32 images, 2 ms): ``fam serve`` (gRPC) and ``fam serve --engine kserve``. 16 client threads
send single-image explain requests (the four outputs: scores, label, embedding, heatmap) of
the same images to:

* ``fam serve``'s OIP gRPC ``ModelInfer`` (the baseline);
* KServe REST v2 ``/v2/models/{name}/infer``, JSON (image base64, heatmap as a JSON list);
* KServe REST v2 with the binary extension for outputs (``binary_data_output``: FP16 bytes);
* KServe gRPC v2 ``ModelInfer`` (the same message as the baseline's).

Rounds rotate the order so that machine noise hits all alike. Reported: median throughputs
and the medians of per-round ratios over the baseline. Uses the default models when they are
in the model store, else random-init models of the same architecture (same cost). There is no
target: the ratio tells users what the platform costs.
"""

from __future__ import annotations

import base64
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
sys.path.insert(0, str(ROOT / "bench"))
from bench_grpc import parse_options, served_models, shut_down, start_server  # noqa: E402
from serving_helpers import png_bytes  # noqa: E402

from fam_core.pipeline.oip_codec import pack_bytes  # noqa: E402
from fam_core.server.stubs import grpc_service_pb2 as pb  # noqa: E402
from fam_core.server.stubs import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

KINDS = ("fam-oip-grpc", "kserve-rest-v2-json", "kserve-rest-v2-binary", "kserve-grpc-v2")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_kserve(models: list[str]) -> tuple[subprocess.Popen[bytes], int, int]:
    http_port, grpc_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "fam_core", "serve", "--engine", "kserve", *models,
         "--port", str(http_port), "--grpc-port", str(grpc_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the KServe server exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/v2/health/ready").status_code == 200:
                return process, http_port, grpc_port
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the KServe server was not ready in 180 s")


def run_round(clients: int, count: int, send: Callable[[int], None]) -> float:
    """``count`` calls of ``send(index)`` from ``clients`` threads; requests per second."""
    cursor = iter(range(count))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                index = next(cursor, None)
            if index is None:
                return
            send(index)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return count / (time.perf_counter() - started)


def main() -> None:
    args = parse_options(__doc__)
    scratch = tempfile.TemporaryDirectory()
    models, source = served_models(Path(scratch.name))
    images = [png_bytes(seed, (84, 84)) for seed in range(64)]

    def infer_request(index: int) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=args.model)
        request.inputs.add(name="image", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(pack_bytes([images[index % 64]]))
        return request

    grpc_requests = [infer_request(i) for i in range(64)]

    def rest_body(index: int, binary: bool) -> dict:
        data = base64.b64encode(images[index % 64]).decode()
        body: dict = {
            "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [data]}]
        }
        if binary:
            body["parameters"] = {"binary_data_output": True}
        return body

    fam, fam_port = start_server(models, 32)
    kserve, http_port, grpc_port = start_kserve(models)
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for port in (fam_port, grpc_port)]
    fam_stub, kserve_stub = (pb_grpc.GRPCInferenceServiceStub(c) for c in channels)
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{http_port}",
        timeout=60,
        limits=httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients),
    )
    url = f"/v2/models/{args.model}/infer"

    def check(response: httpx.Response) -> None:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.text[:200]}")

    senders: dict[str, Callable[[int], None]] = {
        "fam-oip-grpc": lambda i: fam_stub.ModelInfer(grpc_requests[i % 64], timeout=60),
        "kserve-rest-v2-json": lambda i: check(http.post(url, json=rest_body(i, False))),
        "kserve-rest-v2-binary": lambda i: check(http.post(url, json=rest_body(i, True))),
        "kserve-grpc-v2": lambda i: kserve_stub.ModelInfer(grpc_requests[i % 64], timeout=60),
    }
    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    ratios: dict[str, list[float]] = {kind: [] for kind in KINDS[1:]}
    try:
        for kind in KINDS:  # warm-up
            run_round(args.clients, 4 * args.clients, senders[kind])
        for r in range(args.rounds):
            order = KINDS[r % len(KINDS) :] + KINDS[: r % len(KINDS)]
            round_rates = {
                kind: run_round(args.clients, args.requests, senders[kind]) for kind in order
            }
            for kind in KINDS:
                rates[kind].append(round_rates[kind])
            for kind in KINDS[1:]:
                ratios[kind].append(round_rates[kind] / round_rates["fam-oip-grpc"])
    finally:
        http.close()
        shut_down(channels, (fam, kserve), scratch)

    print(
        f"model {args.model} ({source}), {args.clients} clients, "
        f"{args.requests} single-image explain requests x {args.rounds} rounds"
    )
    for kind in KINDS:
        line = f"{kind:24s} {statistics.median(rates[kind]):7.1f} req/s"
        if kind in ratios:
            line += f"   / fam-oip-grpc: {statistics.median(ratios[kind]):.3f}"
        print(line)


if __name__ == "__main__":
    main()
