"""fam.v1 over a real gRPC server on loopback: bad input, deadlines, limits, auth, health, shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serving_helpers import CLASSES, png_bytes, png_header_only, running_server

from fam_core.pipeline import (
    BatchingConfig,
    EncodedImage,
    ExplainRequest,
    Limits,
    ModelRegistry,
    Pipeline,
    heatmap_from_bytes,
)
from fam_core.server import FamServer, ServerConfig
from fam_core.server.stubs import fam_pb2, fam_pb2_grpc

TIMEOUT = 30
LIMITS = Limits(max_batch=8, max_pixels=16_000_000, max_request_bytes=1_000_000)


@pytest.fixture(scope="module")
def server(model_dir):
    config = ServerConfig(port=0, limits=LIMITS, batching=BatchingConfig(8, 1.0))
    with running_server(ModelRegistry.from_directory(model_dir), config) as server:
        yield server


def image(data: bytes) -> fam_pb2.Image:
    return fam_pb2.Image(encoded=data)


def tensor(data: bytes, dtype: str, shape: list[int]) -> fam_pb2.Image:
    return fam_pb2.Image(tensor=fam_pb2.Tensor(data=data, dtype=dtype, shape=shape))


def good_request(model: str = "default-classifier") -> fam_pb2.ExplainRequest:
    return fam_pb2.ExplainRequest(model=model, images=[image(png_bytes(0))])


def assert_still_answering(stub) -> None:
    response = stub.Explain(good_request(), timeout=TIMEOUT)
    assert len(response.results) == 1 and len(response.results[0].heatmap.data) == 84 * 84 * 2


BAD_INPUTS = {
    "corrupt image bytes": (
        {"images": [image(b"\x89PNG but not really")]}, grpc.StatusCode.INVALID_ARGUMENT,
        "cannot decode the image",
    ),
    "empty batch": ({"images": []}, grpc.StatusCode.INVALID_ARGUMENT, "no images"),
    "wrong tensor shape": (
        {"images": [tensor(bytes(4 * 84 * 84), "uint8", [4, 84, 84])]},
        grpc.StatusCode.INVALID_ARGUMENT, "must be [3, H, W]",
    ),
    "wrong tensor dtype": (
        {"images": [tensor(bytes(8 * 3 * 4 * 4), "float64", [3, 4, 4])]},
        grpc.StatusCode.INVALID_ARGUMENT, "dtype 'float64' is not supported",
    ),
    "tensor bytes do not match the shape": (
        {"images": [tensor(bytes(10), "uint8", [3, 4, 4])]},
        grpc.StatusCode.INVALID_ARGUMENT, "needs 48",
    ),
    "zero-size tensor": (
        {"images": [tensor(b"", "uint8", [3, 0, 84])]}, grpc.StatusCode.INVALID_ARGUMENT,
        "zero size",
    ),
    "zero-size png": (
        {"images": [image(png_header_only(0, 84))]}, grpc.StatusCode.INVALID_ARGUMENT,
        "cannot decode the image",
    ),
    "50-megapixel png": (
        {"images": [image(png_header_only(10_000, 5_000))]}, grpc.StatusCode.INVALID_ARGUMENT,
        "10000x5000 pixels, more than the limit of 16000000",
    ),
    "unknown model": ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    "unknown method": (
        {"method": "gradcm"}, grpc.StatusCode.INVALID_ARGUMENT,
        "unknown method 'gradcm' (did you mean 'gradcam'?)",
    ),
    "too many images": (
        {"images": [image(png_bytes(0))] * 9}, grpc.StatusCode.RESOURCE_EXHAUSTED, "limit of 8",
    ),
    "image bytes over the request limit": (
        {"images": [image(bytes(1_000_001))]}, grpc.StatusCode.RESOURCE_EXHAUSTED,
        "more than the limit of 1000000 bytes",
    ),
    "message over gRPC's size limit": (
        {"images": [image(bytes(2_200_000))]}, grpc.StatusCode.RESOURCE_EXHAUSTED, "",
    ),
    "target class out of range": (
        {"target_class": 99}, grpc.StatusCode.INVALID_ARGUMENT, "target_class must be in [0, 5)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_its_status_and_the_server_keeps_answering(stub, server, case) -> None:
    fields, code, message = BAD_INPUTS[case]
    request = good_request()
    request.ClearField("images")
    request.MergeFrom(fam_pb2.ExplainRequest(**{"images": [image(png_bytes(0))], **fields}))
    if "images" in fields:
        del request.images[:]
        request.images.extend(fields["images"])
    with pytest.raises(grpc.RpcError) as caught:
        stub.Explain(request, timeout=TIMEOUT)
    assert caught.value.code() == code
    assert message in caught.value.details()
    assert_still_answering(stub)


def test_expired_deadline_is_deadline_exceeded(stub, server) -> None:
    before = (
        server.metrics.registry.get_sample_value(
            "fam_batch_size_count", {"model": "default-classifier"}
        )
        or 0
    )
    request = fam_pb2.ExplainRequest(model="default-classifier", images=[image(png_bytes(0))] * 8)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Explain(request, timeout=0.000_001)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_still_answering(stub)
    after = server.metrics.registry.get_sample_value(
        "fam_batch_size_count", {"model": "default-classifier"}
    )
    assert after == before + 1  # only the good request ran the model


def test_explain_matches_the_pipeline_result(stub, model_dir) -> None:
    data = [png_bytes(11), png_bytes(12)]
    response = stub.Explain(
        fam_pb2.ExplainRequest(
            model="default-embedding", images=[image(d) for d in data], return_embedding=True,
            return_overlay=True, top_k=2, request_id="r1",
        ),
        timeout=TIMEOUT,
    )  # fmt: skip
    expected = Pipeline(ModelRegistry.from_directory(model_dir), batching=None).explain(
        ExplainRequest("default-embedding", tuple(EncodedImage(d) for d in data), top_k=2)
    )
    assert response.request_id == "r1" and response.model == "default-embedding"
    for got, want in zip(response.results, expected.results, strict=True):
        assert [m.label for m in got.top_k] == [m.label for m in want.top_k]
        assert got.prediction.label in CLASSES
        assert got.heatmap.dtype == "float16" and got.heatmap.method == "fam"
        assert got.heatmap.target_layer == "block4" and list(got.heatmap.shape) == [84, 84]
        assert torch.allclose(
            heatmap_from_bytes(got.heatmap.data, (84, 84)),
            heatmap_from_bytes(want.heatmap.data, (84, 84)),
            atol=1e-3,
        )
        assert list(got.embedding.shape) == [64] and len(got.embedding.data) == 64 * 4
        assert got.overlay_png.startswith(b"\x89PNG")


def test_feature_resolution_and_predict_only(stub) -> None:
    feature = stub.Explain(
        fam_pb2.ExplainRequest(
            model="default-classifier", images=[image(png_bytes(1))],
            resolution=fam_pb2.RESOLUTION_FEATURE,
        ),
        timeout=TIMEOUT,
    )  # fmt: skip
    heatmap = heatmap_from_bytes(feature.results[0].heatmap.data, (5, 5))
    assert list(feature.results[0].heatmap.shape) == [5, 5]
    assert float(heatmap.min()) == 0.0 and float(heatmap.max()) == 1.0  # min-max normalised
    plain = stub.Explain(
        fam_pb2.ExplainRequest(
            model="default-classifier", images=[image(png_bytes(1))], skip_heatmap=True
        ),
        timeout=TIMEOUT,
    )
    assert not plain.results[0].HasField("heatmap")
    assert plain.results[0].prediction.label == feature.results[0].prediction.label
    assert sum(plain.results[0].scores) == pytest.approx(1.0, abs=1e-5)  # softmax


def test_stream_answers_in_order_and_reports_errors_per_message(stub) -> None:
    requests = [
        fam_pb2.ExplainRequest(
            model="default-embedding", images=[image(png_bytes(i))], request_id=str(i)
        )
        for i in range(3)
    ]
    requests.insert(
        1, fam_pb2.ExplainRequest(model="nope", images=[image(png_bytes(0))], request_id="bad")
    )
    responses = list(stub.ExplainStream(iter(requests), timeout=TIMEOUT))
    assert [r.request_id for r in responses] == ["0", "bad", "1", "2"]
    assert responses[1].error.code == "NOT_FOUND" and "nope" in responses[1].error.message
    assert all(len(r.results) == 1 and not r.error.code for i, r in enumerate(responses) if i != 1)


def test_list_models_and_model_info(stub) -> None:
    listed = stub.ListModels(fam_pb2.ListModelsRequest(), timeout=TIMEOUT)
    assert [(m.name, m.task) for m in listed.models] == [
        ("default-classifier", "classifier"),
        ("default-embedding", "embedding"),
    ]
    info = stub.ModelInfo(fam_pb2.ModelInfoRequest(model="default-embedding"), timeout=TIMEOUT)
    assert (info.task, info.input_size, info.target_layer) == ("embedding", 84, "block4")
    assert list(info.feature_shape) == [5, 5] and info.output_dim == 64
    assert list(info.class_names) == list(CLASSES) and info.num_prototypes == 5
    assert info.default_method == "fam" and "fam" in info.methods
    assert list(info.mean) == pytest.approx([0.485, 0.456, 0.406])
    assert info.max_batch == 8 and info.max_request_bytes == 1_000_000
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfo(fam_pb2.ModelInfoRequest(model="nope"), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection(server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fam.v1.FamService", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT
        )
        names = {s.name for s in answer.list_services_response.service}
        assert {
            "fam.v1.FamService",
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
        } <= names


def test_metrics_count_requests_errors_and_batches(stub, server) -> None:
    registry = server.metrics.registry

    def value(name: str, labels: dict[str, str]) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    ok = {"rpc": "Explain", "model": "default-classifier", "code": "OK"}
    before = (
        value("fam_requests_total", ok),
        value("fam_errors_total", {"rpc": "Explain", "code": "NOT_FOUND"}),
    )
    stub.Explain(good_request(), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError):
        stub.Explain(good_request("nope"), timeout=TIMEOUT)
    assert value("fam_requests_total", ok) == before[0] + 1
    assert value("fam_errors_total", {"rpc": "Explain", "code": "NOT_FOUND"}) == before[1] + 1
    assert value("fam_request_latency_seconds_count", {"rpc": "Explain"}) >= 2
    assert value("fam_batch_size_count", {"model": "default-classifier"}) >= 1


def test_bearer_token_is_required_except_for_health(model_dir) -> None:
    config = ServerConfig(port=0, token="s3cret", batching=None, metrics_port=0)
    with FamServer(ModelRegistry.from_directory(model_dir), config) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = fam_pb2_grpc.FamServiceStub(channel)
            for metadata in ((), (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Explain(good_request(), timeout=TIMEOUT, metadata=metadata)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.ExplainStream(iter([good_request()]), timeout=TIMEOUT))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            answer = stub.Explain(
                good_request(), timeout=TIMEOUT, metadata=(("authorization", "Bearer s3cret"),)
            )
            assert len(answer.results) == 1
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == 1
        import urllib.request

        page = urllib.request.urlopen(
            f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=TIMEOUT
        )
        assert (
            b'fam_requests_total{code="OK",model="default-classifier",rpc="Explain"} 1.0'
            in page.read()
        )


def test_sigterm_lets_the_in_flight_request_finish(model_dir) -> None:
    code = (
        "import fam_core.cli as cli; cli.COMMAND_MODULES = ('fam_core.commands.serve',); "
        "raise SystemExit(cli.main(sys.argv[1:]))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", f"import sys; {code}", "serve", "--models", str(model_dir),
         "--port", "0", "--max-batch-size", "64", "--max-delay-ms", "1500"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        line = process.stdout.readline()  # "fam serve: listening on 127.0.0.1:PORT"
        assert "listening on" in line, process.stderr.read()
        port = int(line.rsplit(":", 1)[1])
        line = process.stdout.readline()  # "fam serve: health and readiness on 127.0.0.1:PORT"
        assert "health and readiness on" in line, line  # on by default
        health_port = int(line.rsplit(":", 1)[1])
        assert health_port not in (0, port)
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as side:
            check = health_pb2_grpc.HealthStub(side).Check
            assert check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == 1
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = fam_pb2_grpc.FamServiceStub(channel)
            stub.ListModels(fam_pb2.ListModelsRequest(), timeout=TIMEOUT)
            with ThreadPoolExecutor(1) as pool:
                started = time.monotonic()
                in_flight = pool.submit(stub.Explain, good_request(), timeout=TIMEOUT)
                time.sleep(0.5)  # the request now waits out the 1.5 s batching delay
                process.send_signal(signal.SIGTERM)
                response = in_flight.result(TIMEOUT)
            assert len(response.results) == 1 and time.monotonic() - started >= 1.4
        assert process.wait(TIMEOUT) == 0
        log = process.stderr.read()
        assert '"event": "stopping"' in log and '"event": "stopped"' in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(TIMEOUT)
