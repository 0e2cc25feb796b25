"""Mixed load on one model: CAM's latency and Score-FAM's throughput, alone and together.

Run: .venv/bin/python bench/bench_mixed_load.py [--rounds 2] [--scorefam-requests 2]
     [--cam-requests 40]

One `fam serve` process on loopback serves a random-init Conv4 classifier (84 x 84 inputs, 64
channels at the target layer; the serving tests' model, nothing downloaded). Each round runs,
in turn:

* CAM alone: 1 client sends ``--cam-requests`` single-image CAM requests, one after another;
* Score-FAM alone: 8 clients each send ``--scorefam-requests`` single-image Score-FAM requests;
* mixed: the same 8 Score-FAM clients, and 1 CAM client sending CAM requests until they finish.

Score-FAM requests of the 8 clients run batched together in the expensive lane.

Reported over all rounds: CAM's p95 latency mixed and alone, and Score-FAM's throughput
(requests per second) mixed and alone. A Score-FAM batch step (one forward pass of 32 masked
inputs, the unit at which cheap requests overtake expensive ones) is timed by the server
itself (``fam_expensive_step_seconds`` on ``/metrics``) during the mixed phases: its mean, and
the bucket bound under which 95 % of the steps fell. Targets: CAM p95 mixed <= 2 x CAM p95
alone + one step; Score-FAM throughput mixed >= 0.9 x alone.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
sys.path.insert(0, str(ROOT / "bench"))
from bench_grpc import start_fam_serve  # noqa: E402
from serving_helpers import make_model_dir, png_bytes  # noqa: E402

from fam_core.server.stubs import fam_pb2, fam_pb2_grpc  # noqa: E402

MODEL = "default-classifier"
SCOREFAM_CLIENTS = 8


def request(method: str, seed: int) -> fam_pb2.ExplainRequest:
    return fam_pb2.ExplainRequest(
        model=MODEL, method=method, images=[fam_pb2.Image(encoded=png_bytes(seed))]
    )


def step_histogram(metrics_port: int) -> dict[float, float]:
    """The server's ``fam_expensive_step_seconds`` buckets ``{upper bound: count}``, and the
    sum of the seconds under the key ``-1``."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    page = urllib.request.urlopen(url, timeout=60).read().decode()
    name = "fam_expensive_step_seconds"
    found = re.findall(name + r'_bucket\{le="([^"]+)",model="' + MODEL + r'"\} (\S+)', page)
    buckets = {float(bound): float(count) for bound, count in found}
    total = re.search(name + r'_sum\{model="' + MODEL + r'"\} (\S+)', page)
    buckets[-1.0] = float(total.group(1)) if total else 0.0
    return buckets


def step_summary(counts: dict[float, float]) -> tuple[float, float, int]:
    """(mean seconds, bucket bound under which 95 % fell, steps) of histogram ``counts``."""
    counts = dict(counts)
    steps = counts.pop(float("inf"), 0.0)
    seconds = counts.pop(-1.0, 0.0)
    bounds = sorted(counts) + [float("inf")]
    p95_bound = next(b for b in bounds if counts.get(b, steps) >= 0.95 * steps)
    return seconds / max(steps, 1.0), p95_bound, int(steps)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(models: Path, metrics_port: int) -> tuple[subprocess.Popen[str], int]:
    return start_fam_serve(
        "--health-port", "off", "--metrics-port", str(metrics_port), "--models", str(models)
    )


def scorefam_clients(
    stubs: list[fam_pb2_grpc.FamServiceStub], per_client: int
) -> tuple[list[threading.Thread], list[float]]:
    """Started threads sending Score-FAM; the list gets (start, end) of the whole run."""
    span: list[float] = []

    def client(stub: fam_pb2_grpc.FamServiceStub, index: int) -> None:
        for n in range(per_client):
            stub.Explain(request("scorefam", 100 * index + n), timeout=600)

    threads = [threading.Thread(target=client, args=(s, i)) for i, s in enumerate(stubs)]
    span.append(time.perf_counter())
    for thread in threads:
        thread.start()
    return threads, span


def cam_latencies(stub: fam_pb2_grpc.FamServiceStub, keep_going, limit: int) -> list[float]:
    latencies = []
    for n in range(limit):
        if not keep_going(n):
            break
        started = time.perf_counter()
        stub.Explain(request("cam", n), timeout=600)
        latencies.append(time.perf_counter() - started)
    return latencies


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scorefam-requests", type=int, default=2, help="per Score-FAM client")
    parser.add_argument("--cam-requests", type=int, default=40, help="CAM alone, per round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        models = make_model_dir(Path(folder))
        metrics_port = free_port()
        process, port = start_server(models, metrics_port)
        try:
            channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(9)]
            stubs = [fam_pb2_grpc.FamServiceStub(channel) for channel in channels]
            cam_stub, scorefam_stubs = stubs[0], stubs[1:]
            for stub in stubs[:2]:  # warm up both methods
                stub.Explain(request("cam", 0), timeout=600)
                stub.Explain(request("scorefam", 0), timeout=600)
            cam_alone, cam_mixed = [], []
            mixed_steps: dict[float, float] = {}
            throughput_alone, throughput_mixed = [], []
            total = SCOREFAM_CLIENTS * args.scorefam_requests
            for _ in range(args.rounds):
                cam_alone += cam_latencies(cam_stub, lambda n: True, args.cam_requests)

                threads, span = scorefam_clients(scorefam_stubs, args.scorefam_requests)
                for thread in threads:
                    thread.join()
                throughput_alone.append(total / (time.perf_counter() - span[0]))

                before = step_histogram(metrics_port)
                threads, span = scorefam_clients(scorefam_stubs, args.scorefam_requests)
                cam_mixed += cam_latencies(
                    cam_stub, lambda n, running=threads: any(t.is_alive() for t in running), 100_000
                )
                for thread in threads:
                    thread.join()
                throughput_mixed.append(total / (time.perf_counter() - span[0]))
                for bound, count in step_histogram(metrics_port).items():  # mixed phase only
                    mixed_steps[bound] = mixed_steps.get(bound, 0.0) + count - before.get(bound, 0)
            for channel in channels:
                channel.close()
        finally:
            process.terminate()
            process.wait(60)
    alone, mixed = p95(cam_alone), p95(cam_mixed)
    step, step_p95, steps = step_summary(mixed_steps)
    scorefam_alone, scorefam_mixed = sum(throughput_alone), sum(throughput_mixed)
    print(
        f"Score-FAM step (32 masked forwards) in the mixed phases: mean {1000 * step:.0f} ms, "
        f"95 % under {1000 * step_p95:.0f} ms ({steps} steps)"
    )
    print(
        f"CAM p95: alone {1000 * alone:.1f} ms ({len(cam_alone)} requests), "
        f"mixed {1000 * mixed:.1f} ms ({len(cam_mixed)} requests); "
        f"mixed / (2 x alone + mean step) = {mixed / (2 * alone + step):.2f} (target <= 1); "
        f"mixed / (2 x alone + p95 step bound) = {mixed / (2 * alone + step_p95):.2f}"
    )
    print(
        f"Score-FAM throughput: alone {scorefam_alone / args.rounds:.2f} req/s, mixed "
        f"{scorefam_mixed / args.rounds:.2f} req/s ({total} requests per round, "
        f"{args.rounds} rounds); mixed / alone = {scorefam_mixed / scorefam_alone:.2f} "
        "(target >= 0.9)"
    )


if __name__ == "__main__":
    main()
