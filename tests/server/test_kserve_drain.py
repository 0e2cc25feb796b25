"""``fam serve --engine kserve``: the expensive lane's limit (429 with ``Retry-After``) and the
drain on SIGTERM (not ready at once, the running request cancelled and answered 503 at the end
of the grace, the process gone within grace + 2 s), in a subprocess on loopback.

This process never imports kserve (its OIP stubs clash with fam's): the server runs in a
subprocess; the gRPC v2 readiness is asked with fam's own OIP stubs.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from serving_helpers import (
    TINY_CLASSIFIER,
    free_port,
    loopback,
    make_tiny_classifier_dir,
    png_bytes,
    sigterm_until_not_ready,
    wait_until,
)

if importlib.util.find_spec("kserve") is None or importlib.util.find_spec("httpx") is None:
    pytest.skip("needs the kserve extra", allow_module_level=True)

import httpx  # noqa: E402

MODEL = TINY_CLASSIFIER
GRACE_S = 1.0
TIMEOUT = 120
START_TIMEOUT_S = 120
POLL_S = 0.02


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_classifier_dir(tmp_path_factory.mktemp("lanes"))


def predict_body(method: str, images: int) -> dict:
    encoded = [base64.b64encode(png_bytes(i, (32, 32))).decode() for i in range(images)]
    return {"instances": encoded, "parameters": {"method": method}}


def test_kserve_lane_limit_and_drain(model_dir, tmp_path) -> None:
    http_port, grpc_port = free_port(), free_port()
    log = (tmp_path / "server.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "fam_core", "serve", "--engine", "kserve", "--models",
         str(model_dir), "--port", str(http_port), "--grpc-port", str(grpc_port),
         "--workers", "4", "--max-queued-expensive", "1", "--grace", str(GRACE_S)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    base = f"http://127.0.0.1:{http_port}"
    lane = re.compile(r'fam_lane_(running|queued)\{lane="expensive",model="' + MODEL + r'"\} (\S+)')

    def expensive(kind: str) -> float:
        found = dict(lane.findall(httpx.get(f"{base}/metrics", timeout=TIMEOUT).text))
        return float(found.get(kind, 0))

    def ready() -> bool:
        try:
            return httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        end = time.monotonic() + START_TIMEOUT_S
        while not ready():
            assert process.poll() is None and time.monotonic() < end, log.read()
            time.sleep(0.5)
        url = f"{base}/v1/models/{MODEL}:predict"
        with (
            httpx.Client(timeout=TIMEOUT) as client,
            ThreadPoolExecutor(2) as pool,
            loopback(grpc_port) as channel,
        ):
            running = pool.submit(client.post, url, json=predict_body("scorefam", 64))
            wait_until(lambda: expensive("running") > 0, "Score-FAM to run", poll_s=POLL_S)
            queued = pool.submit(client.post, url, json=predict_body("scorefam", 1))
            wait_until(
                lambda: expensive("queued") == 1, "the second request to wait", poll_s=POLL_S
            )
            refused = client.post(url, json=predict_body("scorecam", 1))
            assert refused.status_code == 429, refused.text
            assert refused.json()["code"] == "RESOURCE_EXHAUSTED"
            assert int(refused.headers["Retry-After"]) >= 1
            cheap = client.post(url, json=predict_body("cam", 1))
            assert cheap.status_code == 200 and cheap.json()["predictions"][0]["heatmap"]
            assert not running.done()

            signalled = sigterm_until_not_ready(process, channel, TIMEOUT, poll_s=POLL_S)
            assert time.monotonic() - signalled < GRACE_S
            assert not ready()  # REST: refused, or answered not ready
            answers = [running.result(TIMEOUT), queued.result(TIMEOUT)]
        assert process.wait(TIMEOUT) == 0
        exited = time.monotonic() - signalled
        for answer in answers:
            assert answer.status_code == 503, answer.text
            assert answer.json()["code"] == "UNAVAILABLE"
        assert "grace period ended" in answers[0].json()["error"]
        assert exited <= GRACE_S + 2.0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(TIMEOUT)
        log.close()
