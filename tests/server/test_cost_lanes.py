"""Cost lanes and the drain, on a real gRPC server on loopback.

The slow method is Score-FAM on a tiny classifier (Conv4, 32 x 32 inputs, 64 channels): one
image costs one forward pass plus 64 masked forwards, run 32 at a time, so a request of many
images runs for seconds in steps of a fraction of a second. Tests wait for states they can
observe (the ``fam_lane_running`` gauge, health ``NOT_SERVING``, a log line), never for a time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import (
    TINY_CLASSIFIER,
    loopback,
    make_tiny_classifier_dir,
    png_bytes,
    running_server,
    sigterm_until_not_ready,
    wait_until,
)

from fam_core.explainers.registry import EXPLAINERS, METHOD_COSTS, cost_class
from fam_core.pipeline import BatchingConfig, Limits, ModelRegistry
from fam_core.server import FamServer, ServerConfig
from fam_core.server.calls import RETRY_AFTER_KEY
from fam_core.server.stubs import fam_pb2, fam_pb2_grpc
from fam_core.server.stubs import grpc_service_pb2 as oip_pb2
from fam_core.server.stubs import grpc_service_pb2_grpc as oip_grpc

TIMEOUT = 120
MODEL = TINY_CLASSIFIER
EXPENSIVE_IMAGES = 32  # a Score-FAM request of this many images runs for seconds (64 steps)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_classifier_dir(tmp_path_factory.mktemp("lanes"))


def explain_request(method: str, images: int = 1) -> fam_pb2.ExplainRequest:
    return fam_pb2.ExplainRequest(
        model=MODEL,
        method=method,
        images=[fam_pb2.Image(encoded=png_bytes(i, (32, 32))) for i in range(images)],
    )


def expensive_runs(server: FamServer) -> Callable[[], bool]:
    """Whether an expensive request runs on ``server`` now (its ``fam_lane_running`` gauge)."""

    def runs() -> bool:
        value = server.metrics.registry.get_sample_value(
            "fam_lane_running", {"model": MODEL, "lane": "expensive"}
        )
        return (value or 0.0) > 0

    return runs


@contextmanager
def serving(model_dir: Path, **batching: object) -> Iterator[FamServer]:
    """A server of the tiny classifier, stopped without grace on exit."""
    config = ServerConfig(
        port=0,
        health_port=0,
        limits=Limits(max_batch=64),
        batching=BatchingConfig(32, 1.0, **batching),  # type: ignore[arg-type]
    )
    with running_server(ModelRegistry.from_directory(model_dir), config, grace=0) as server:
        yield server


@contextmanager
def scorefam_running(
    port: int, images: int, runs: Callable[[], bool], workers: int = 1
) -> Iterator[tuple[fam_pb2_grpc.FamServiceStub, ThreadPoolExecutor, Future]]:
    """A ``fam.v1`` stub on ``port``, a pool of ``workers`` threads, and the future of a
    Score-FAM request of ``images`` images, once ``runs()`` says it runs."""
    with loopback(port) as channel, ThreadPoolExecutor(workers) as pool:
        stub = fam_pb2_grpc.FamServiceStub(channel)
        slow = pool.submit(stub.Explain, explain_request("scorefam", images), timeout=TIMEOUT)
        wait_until(runs, "Score-FAM to run")
        yield stub, pool, slow


def test_every_registered_method_declares_its_cost_class() -> None:
    assert set(EXPLAINERS) <= set(METHOD_COSTS)
    expensive = {name for name in METHOD_COSTS if cost_class(name) == "expensive"}
    assert expensive == {"scorefam", "scorecam", "ablationcam", "l2caf", "relevant-features"}
    for name in ("cam", "fam", "gradcam", "gradfam", "eigencam", "layercam"):
        assert cost_class(name) == "cheap"
    assert cost_class("a-method-nobody-declared") == "expensive"


def test_cam_answers_while_scorefam_runs(model_dir) -> None:
    with serving(model_dir) as server:
        runs = expensive_runs(server)
        with scorefam_running(server.port, EXPENSIVE_IMAGES, runs) as (stub, _, slow):
            for _ in range(3):  # one pass each, between two masked-forward steps
                cam = stub.Explain(explain_request("cam"), timeout=TIMEOUT)
                assert cam.results[0].heatmap.method == "cam"
                assert not slow.done(), "CAM waited for the whole Score-FAM request"
            scorefam = slow.result(TIMEOUT)
        assert len(scorefam.results) == EXPENSIVE_IMAGES
        assert scorefam.results[0].heatmap.method == "scorefam"


def test_expensive_work_beyond_the_limit_is_resource_exhausted_with_a_retry_hint(
    model_dir,
) -> None:
    with serving(model_dir, max_queued_expensive=2) as server:
        runs = expensive_runs(server)
        with scorefam_running(server.port, EXPENSIVE_IMAGES, runs, workers=2) as (
            stub,
            pool,
            running,
        ):
            queued = pool.submit(stub.Explain, explain_request("scorecam", 2), timeout=TIMEOUT)
            wait_until(
                lambda: server.pipeline.lanes(MODEL)["queued"]["expensive"] == 1,
                "the second expensive request to wait",
            )
            with pytest.raises(grpc.RpcError) as refused:
                stub.Explain(explain_request("ablationcam"), timeout=TIMEOUT)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "expensive work" in refused.value.details()
            hint = dict(refused.value.trailing_metadata())[RETRY_AFTER_KEY]
            assert int(hint) >= 1000
            cheap = stub.Explain(explain_request("gradcam"), timeout=TIMEOUT)  # not limited
            assert cheap.results[0].heatmap.method == "gradcam"
            assert not running.done()
            server.stop(grace=0)
            for future in (running, queued):
                with pytest.raises(grpc.RpcError) as cancelled:
                    future.result(TIMEOUT)
                assert cancelled.value.code() == grpc.StatusCode.UNAVAILABLE


def test_drain_is_not_ready_at_once_and_cancels_what_runs_past_the_grace(model_dir) -> None:
    grace = 1.0
    with serving(model_dir) as server, loopback(server.health_port) as side:
        oip = oip_grpc.GRPCInferenceServiceStub(side)
        health = health_pb2_grpc.HealthStub(side)
        assert oip.ServerReady(oip_pb2.ServerReadyRequest(), timeout=TIMEOUT).ready
        runs = expensive_runs(server)
        with scorefam_running(server.port, 2 * EXPENSIVE_IMAGES, runs) as (_, _, slow):
            started = time.monotonic()
            stopping = threading.Thread(target=server.stop, args=(grace,))
            stopping.start()
            wait_until(
                lambda: (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                ),
                "health NOT_SERVING",
            )
            assert not oip.ServerReady(oip_pb2.ServerReadyRequest(), timeout=TIMEOUT).ready
            model_ready = oip.ModelReady(oip_pb2.ModelReadyRequest(name=MODEL), timeout=TIMEOUT)
            assert not model_ready.ready
            with pytest.raises(grpc.RpcError) as cancelled:
                slow.result(TIMEOUT)
            answered = time.monotonic() - started
            stopping.join(TIMEOUT)
            stopped = time.monotonic() - started
        assert cancelled.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "grace period ended" in cancelled.value.details()
        assert grace <= answered and stopped <= grace + 2.0
        sample = server.metrics.registry.get_sample_value
        assert sample("fam_cancelled_total", {"rpc": "Explain", "model": MODEL}) == 1.0
        labels = {"rpc": "Explain", "model": MODEL}
        assert sample("fam_requests_total", {**labels, "code": "UNAVAILABLE"}) == 1.0
        assert sample("fam_requests_total", {**labels, "code": "OK"}) is None


def test_sigterm_cancels_the_running_request_and_exits_within_the_grace(model_dir) -> None:
    grace = 1.0
    code = (
        "import fam_core.cli as cli; cli.COMMAND_MODULES = ('fam_core.commands.serve',); "
        "raise SystemExit(cli.main(sys.argv[1:]))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", f"import sys; {code}", "serve", "--models", str(model_dir),
         "--port", "0", "--health-port", "0", "--metrics-port", "0", "--grace", str(grace)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    log: list[str] = []
    try:
        started = json.loads(_read_until(process, log, '"event": "started"'))
        port = int(started["address"].rsplit(":", 1)[1])
        metrics = f"http://127.0.0.1:{started['metrics_port']}/metrics"
        running = re.compile(
            r'fam_lane_running\{lane="expensive",model="' + MODEL + r'"\} ([0-9.]+)'
        )

        def scorefam_runs() -> bool:
            page = urllib.request.urlopen(metrics, timeout=TIMEOUT).read().decode()
            match = running.search(page)
            return match is not None and float(match.group(1)) > 0

        with (
            scorefam_running(port, 2 * EXPENSIVE_IMAGES, scorefam_runs) as (_, _, slow),
            loopback(started["health_port"]) as side,
        ):
            signalled = sigterm_until_not_ready(process, side, TIMEOUT)
            not_ready = time.monotonic() - signalled
            with pytest.raises(grpc.RpcError) as cancelled:
                slow.result(TIMEOUT)
        assert process.wait(TIMEOUT) == 0
        exited = time.monotonic() - signalled
        assert cancelled.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not_ready < grace, "ServerReady stayed true into the grace period"
        log += process.stderr.read().splitlines()
        assert exited <= grace + 2.0, (signalled, time.time(), log[-8:])
        events = [json.loads(line) for line in log if line.startswith("{")]
        explains = [e for e in events if e.get("event") == "rpc" and e.get("rpc") == "Explain"]
        assert [(e["code"], e.get("cancelled")) for e in explains] == [("UNAVAILABLE", True)]
        assert any(e.get("event") == "grace_ended" for e in events)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(TIMEOUT)


def _read_until(process: subprocess.Popen, log: list[str], marker: str) -> str:
    """Lines of the server's stderr up to the first holding ``marker`` (that line)."""
    for _ in range(10_000):
        line = process.stderr.readline()
        if not line:
            raise AssertionError("the server exited:\n" + "\n".join(log))
        log.append(line.rstrip("\n"))
        if marker in line:
            return line
    raise AssertionError(f"no {marker} in the first 10,000 lines")


@pytest.mark.parametrize(
    ("option", "value"),
    [("--max-queued-expensive", "0"), ("--expensive-concurrency", "0"), ("--grace", "-1")],
)
def test_serve_refuses_bad_lane_and_grace_options_in_one_line(option: str, value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fam_core", "serve", "--port", "0", option, value],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"fam: error: {option} must be >= {'0 seconds' if option == '--grace' else '1'}, "
        f"got {float(value) if option == '--grace' else int(value)}"
    ]
