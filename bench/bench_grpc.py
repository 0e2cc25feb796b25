"""gRPC serving: Explain throughput over predict-only, latency, micro-batching over none.

Run: .venv/bin/python bench/bench_grpc.py [--rounds 5] [--requests 400] [--clients 16]

Two `fam serve` processes on loopback serve the same models: one micro-batches (32 images,
2 ms), one does not (`--max-batch-size 1`). 16 client threads send single-image Explain
requests; rounds alternate Explain, predict-only (`skip_heatmap`) and the unbatched server so
machine noise hits all alike. Reported: medians of per-round throughput ratios, and p50/p99
latency of Explain on the batching server. Uses the default models when they are in the
model store, else random-init models of the same architecture (same cost).
Targets: Explain / predict-only >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
from serving_helpers import make_model_dir, png_bytes  # noqa: E402

from fam_core.models.store import available_models  # noqa: E402
from fam_core.server.stubs import fam_pb2, fam_pb2_grpc  # noqa: E402

SERVE = (
    "import sys, fam_core.cli as cli; cli.COMMAND_MODULES = ('fam_core.commands.serve',); "
    "raise SystemExit(cli.main(sys.argv[1:]))"
)


def start_server(models: list[str], batch: int) -> tuple[subprocess.Popen[str], int]:
    return start_fam_serve("--max-batch-size", str(batch), *models)


def start_fam_serve(*options: str) -> tuple[subprocess.Popen[str], int]:
    """``fam serve --port 0 OPTIONS`` in a subprocess: (the process, the port it listens on)."""
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", "--port", "0", *options],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    line = process.stdout.readline()  # type: ignore[union-attr]
    if "listening on" not in line:
        raise RuntimeError(f"server did not start: {line!r}")
    return process, int(line.rsplit(":", 1)[1])


def shut_down(
    channels: list[grpc.Channel],
    processes: tuple[subprocess.Popen[str], ...],
    scratch: tempfile.TemporaryDirectory[str],
) -> None:
    """Close the channels, stop the servers, remove the scratch folder."""
    for channel in channels:
        channel.close()
    for process in processes:
        process.terminate()
        process.wait(60)
    scratch.cleanup()


def run_round(
    stubs: list[fam_pb2_grpc.FamServiceStub], requests: list[fam_pb2.ExplainRequest]
) -> tuple[float, list[float]]:
    """Send ``requests`` from ``len(stubs)`` threads; (requests per second, latencies)."""
    cursor = iter(range(len(requests)))
    lock = threading.Lock()
    latencies: list[float] = []

    def client(stub: fam_pb2_grpc.FamServiceStub) -> None:
        while True:
            with lock:
                index = next(cursor, None)
            if index is None:
                return
            started = time.perf_counter()
            stub.Explain(requests[index], timeout=60)
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=client, args=(stub,)) for stub in stubs]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(requests) / (time.perf_counter() - started), latencies


def parse_options(description: str | None) -> argparse.Namespace:
    """The options of the serving benchmarks: rounds, requests per round, clients, model."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=400, help="requests per round")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--model", default="default-classifier")
    return parser.parse_args()


def served_models(scratch: Path) -> tuple[list[str], str]:
    """``fam serve`` options naming the models, and what they are: the default models when
    they are in the model store, else random-init models of the same architecture in
    ``scratch``."""
    if {"default-embedding", "default-classifier"} <= set(available_models()):
        return [], "default models"
    return ["--models", str(make_model_dir(scratch))], "random-init Conv4"


def main() -> None:
    args = parse_options(__doc__)
    scratch = tempfile.TemporaryDirectory()
    models, source = served_models(Path(scratch.name))
    images = [png_bytes(seed, (84, 84)) for seed in range(64)]
    explain = [
        fam_pb2.ExplainRequest(model=args.model, images=[fam_pb2.Image(encoded=images[i % 64])])
        for i in range(args.requests)
    ]
    predict = [
        fam_pb2.ExplainRequest(model=r.model, images=r.images, skip_heatmap=True) for r in explain
    ]

    batched, batched_port = start_server(models, 32)
    unbatched, unbatched_port = start_server(models, 1)
    channels = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in (batched_port, unbatched_port)]
    stubs = [[fam_pb2_grpc.FamServiceStub(c)] * args.clients for c in channels]
    try:
        for stub_set in stubs:  # warm-up
            run_round(stub_set, explain[: 4 * args.clients])
        heatmap_ratio, batching_ratio, latencies = [], [], []
        rates: dict[str, list[float]] = {"explain": [], "predict": [], "unbatched": []}
        for r in range(args.rounds):
            order = ["explain", "predict", "unbatched"]
            if r % 2:
                order.reverse()
            round_rates = {}
            for kind in order:
                stub_set = stubs[1] if kind == "unbatched" else stubs[0]
                rate, lat = run_round(stub_set, predict if kind == "predict" else explain)
                round_rates[kind] = rate
                rates[kind].append(rate)
                if kind == "explain":
                    latencies.extend(lat)
            heatmap_ratio.append(round_rates["explain"] / round_rates["predict"])
            batching_ratio.append(round_rates["explain"] / round_rates["unbatched"])
    finally:
        shut_down(channels, (batched, unbatched), scratch)

    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(
        f"model {args.model} ({source}), {args.clients} clients, {args.requests} requests x {args.rounds} rounds"
    )
    print(f"throughput (median req/s): explain {statistics.median(rates['explain']):.0f}, "
          f"predict-only {statistics.median(rates['predict']):.0f}, "
          f"explain without micro-batching {statistics.median(rates['unbatched']):.0f}")  # fmt: skip
    print(
        f"explain / predict-only throughput: {statistics.median(heatmap_ratio):.3f} (target >= 0.9)"
    )
    print(f"micro-batching / none throughput:  {statistics.median(batching_ratio):.2f}")
    print(f"explain latency: p50 {1000 * p50:.1f} ms, p99 {1000 * p99:.1f} ms")


if __name__ == "__main__":
    main()
