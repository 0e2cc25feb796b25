"""TorchServe: our handler's /predictions with heatmap vs without, vs TorchServe's Captum path.

Run: .venv/bin/python bench/bench_torchserve.py [--rounds 5] [--requests 64] [--clients 8]

One TorchServe (token authorisation off, loopback, one worker per model, ``batchSize`` 8,
``maxBatchDelay`` 5 ms) serves the default classifier twice: with ``handlers/fam_handler.py``
(``default-classifier``) and with TorchServe's ``VisionHandler`` Captum explain path
(``bench/torchserve_captum_handler.py``: ``IntegratedGradients``, ``n_steps=15``, attributions
``[3, 84, 84]`` as nested JSON lists; ``default-classifier-captum``). The same 84x84 PNGs are
sent as raw bodies by ``--clients`` threads. Modes, interleaved round by round (the order
rotates) so machine noise hits all alike:

- ``heatmap``: ``POST /predictions/default-classifier`` (prediction, 48 scores, CAM heatmap
  84x84 float16 base64);
- ``heatmap-feature``: the same with ``X-Fam-Resolution: feature`` (the 5x5 CAM map, min-max
  scaled; the client upsamples);
- ``predict-only``: the same with ``X-Fam-Heatmap: false`` (prediction and scores);
- ``captum``: ``POST /explanations/default-classifier-captum`` (TorchServe's explain path).

Reported: median per-round requests/s ratio against predict-only, medians of requests/s, and
response bytes per image (the body's length). Targets: heatmap / predict-only
>= 0.8; captum bytes / heatmap bytes >= 50.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
from test_torchserve import Server, _missing, http, png_bytes  # noqa: E402

CAPTUM_HANDLER = ROOT / "bench" / "torchserve_captum_handler.py"
MODES = ("heatmap", "heatmap-feature", "predict-only", "captum")


def request_for(server: Server, mode: str) -> tuple[str, dict[str, str]]:
    headers = {"Content-Type": "image/png"}
    if mode == "captum":
        return f"{server.inference}/explanations/default-classifier-captum", headers
    if mode == "predict-only":
        headers["X-Fam-Heatmap"] = "false"
    if mode == "heatmap-feature":
        headers["X-Fam-Resolution"] = "feature"
    return f"{server.inference}/predictions/default-classifier", headers


def run_round(
    server: Server, mode: str, images: list[bytes], clients: int
) -> tuple[float, list[int]]:
    """``(requests per second, response sizes)`` for one round of ``mode``."""
    url, headers = request_for(server, mode)

    def send(body: bytes) -> int:
        status, raw, _ = http("POST", url, body, headers)
        if status != 200:
            raise RuntimeError(f"{mode}: HTTP {status}: {raw[:300]!r}")
        return len(raw)

    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        sizes = list(pool.map(send, images))
        elapsed = time.perf_counter() - start
    return len(images) / elapsed, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=64, help="requests per round and mode")
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    reason = _missing()
    if reason is not None:
        raise SystemExit(f"cannot run: {reason}")
    images = [png_bytes(seed) for seed in range(args.requests)]
    with tempfile.TemporaryDirectory(prefix="bench-torchserve-") as root:
        captum = {
            "name_or_config": "default-classifier",
            "handler": CAPTUM_HANDLER,
            "archive_name": "default-classifier-captum",
        }
        server = Server(
            Path(root),
            (("default-classifier", "torch"),),
            extra=(captum,),
            batch_size=8,
            max_batch_delay_ms=5,
        )
        try:
            server.wait_ready()
            for mode in MODES:  # warm-up
                run_round(server, mode, images[: args.clients * 2], args.clients)
            rps: dict[str, list[float]] = {mode: [] for mode in MODES}
            sizes: dict[str, list[int]] = {mode: [] for mode in MODES}
            ratios: dict[str, list[float]] = {mode: [] for mode in MODES}
            for index in range(args.rounds):
                order = MODES[index % len(MODES) :] + MODES[: index % len(MODES)]
                measured = {}
                for mode in order:
                    measured[mode], got = run_round(server, mode, images, args.clients)
                    rps[mode].append(measured[mode])
                    sizes[mode].extend(got)
                for mode in MODES:
                    ratios[mode].append(measured[mode] / measured["predict-only"])
        finally:
            server.stop()
    print(
        f"TorchServe, default-classifier, {args.rounds} rounds x {args.requests} requests, "
        f"{args.clients} clients, batchSize 8"
    )
    print("| mode | requests/s (median) | ratio to predict-only (median) | bytes per image |")
    print("|---|---|---|---|")
    for mode in MODES:
        print(
            f"| {mode} | {statistics.median(rps[mode]):.1f} | "
            f"{statistics.median(ratios[mode]):.2f}x | {statistics.median(sizes[mode]):,.0f} |"
        )
    for mode in ("heatmap", "heatmap-feature"):
        smaller = statistics.median(sizes["captum"]) / statistics.median(sizes[mode])
        print(f"captum bytes / {mode} bytes: {smaller:.1f}x")


if __name__ == "__main__":
    main()
