"""Requests that are small on the wire but would cost a lot inside, and wrong answers on valid
images, against each front door: fam.v1, the Open Inference Protocol
(our own stubs, in process) and the TorchServe handler (in process, with a stand-in context).
The same items over a real TorchServe's REST and KServe v1 routes, with the peak RSS measured in
its worker process, are in ``tests/handlers/test_torchserve.py`` (they share its one TorchServe start).

Each test asserts the status, a bound on the growth of this process's peak RSS (the server
runs in it; the peak is reset through ``/proc/self/clear_refs`` before each request), and that
the next good request succeeds. Sizes are bounded: the module takes a few seconds.
"""

from __future__ import annotations

import io
import json
import logging
import math
import struct
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from serving_helpers import (
    HandlerContext,
    load_handler,
    png_bytes,
    png_header_only,
    running_server,
)

from fam_core.images.read import to_rgb8
from fam_core.pipeline import (
    EncodedImage,
    ExplainRequest,
    Limits,
    ModelRegistry,
    Pipeline,
    ResourceExhausted,
)
from fam_core.pipeline.decode import decode_input
from fam_core.server import FamServer, ServerConfig
from fam_core.server.calls import UNKNOWN_MODEL
from fam_core.server.logs import LOGGER
from fam_core.server.stubs import fam_pb2, fam_pb2_grpc
from fam_core.server.stubs import grpc_service_pb2 as oip_pb2
from fam_core.server.stubs import grpc_service_pb2_grpc as oip_pb2_grpc

MiB = 1 << 20
TIMEOUT = 30
LIMITS = Limits(
    max_batch=8,
    max_request_bytes=2_000_000,
    max_decoded_bytes=100 * MiB,
    max_inflight_decoded_bytes=200 * MiB,
    queue_timeout_s=0.3,
)
TOKEN = "metrics-secret"


# -- peak RSS of this process (the server runs here) -------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


class Peak:
    growth = 0


@contextmanager
def peak_rss_growth():
    """``Peak.growth``: how far the peak RSS rose above the RSS at entry, in bytes."""
    peak = Peak()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
    start = _status_kib("VmRSS")
    yield peak
    peak.growth = _status_kib("VmHWM") - start


# -- images ------------------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def flat_png(width: int, height: int) -> bytes:
    """A large PNG that compresses to a few kB (one colour)."""
    return encode(Image.new("RGB", (width, height), (40, 120, 200)))


def grey8() -> np.ndarray:
    """An 8-bit grey picture with structure (a gradient and a square)."""
    values = np.add.outer(np.arange(96), np.arange(120)).astype(np.uint8)
    values[30:60, 40:80] = 250
    return values


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(model_dir):
    config = ServerConfig(port=0, limits=LIMITS, metrics_port=0, metrics_token=TOKEN, health_port=0)
    with running_server(ModelRegistry.from_directory(model_dir), config) as server:
        yield server


@pytest.fixture(scope="module")
def fam(channel):
    return fam_pb2_grpc.FamServiceStub(channel)


@pytest.fixture(scope="module")
def oip(channel):
    return oip_pb2_grpc.GRPCInferenceServiceStub(channel)


def fam_request(*images: bytes, model: str = "default-classifier", **fields):
    return fam_pb2.ExplainRequest(
        model=model, images=[fam_pb2.Image(encoded=data) for data in images], **fields
    )


def oip_bytes_request(*images: bytes, model: str = "default-classifier", **parameters):
    """An OIP request of encoded ``images``; each parameter in the field its type selects."""
    request = oip_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[len(images)])
    del tensor
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(i)) + i for i in images))
    for name, value in parameters.items():
        parameter = request.parameters[name]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, str):
            parameter.string_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        else:
            parameter.int64_param = value
    return request


def send(front: str, fam, oip, *images: bytes, **fields):
    """One request through ``front`` (``"fam"`` or ``"oip"``): ``(code, response or details)``."""
    try:
        if front == "fam":
            return grpc.StatusCode.OK, fam.Explain(fam_request(*images, **fields), timeout=TIMEOUT)
        return grpc.StatusCode.OK, oip.ModelInfer(
            oip_bytes_request(*images, **fields), timeout=TIMEOUT
        )
    except grpc.RpcError as error:
        return error.code(), error.details()


def assert_next_good_request_succeeds(fam, oip) -> None:
    good = png_bytes(0)
    reply = fam.Explain(fam_request(good), timeout=TIMEOUT)
    assert len(reply.results[0].heatmap.data) == 84 * 84 * 2
    reply = oip.ModelInfer(oip_bytes_request(good), timeout=TIMEOUT)
    assert [o.name for o in reply.outputs] == ["scores", "label", "embedding", "heatmap"]


# -- shape bombs: the declared shape is checked before anything is built per element -----------
SHAPE_BOMB_N = 400_000  # before the fix: about +70 MiB and a second of CPU


@pytest.mark.parametrize("datatype", ["UINT8", "FP32", "BYTES"])
def test_oip_shape_bomb_is_refused_from_the_shape(oip, fam, datatype) -> None:
    request = oip_pb2.ModelInferRequest(model_name="default-classifier")
    shape = [SHAPE_BOMB_N] if datatype == "BYTES" else [SHAPE_BOMB_N, 3, 0, 0]
    request.inputs.add(name="image", datatype=datatype, shape=shape)
    if datatype == "BYTES":  # N empty elements: 4 bytes each on the wire
        request.raw_input_contents.append(bytes(4 * SHAPE_BOMB_N))
    with peak_rss_growth() as peak:
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as error:
            oip.ModelInfer(request, timeout=TIMEOUT)
        elapsed = time.perf_counter() - started
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{SHAPE_BOMB_N} images, more than the limit of 8" in error.value.details()
    assert peak.growth < 24 * MiB, peak.growth / MiB
    assert elapsed < 5.0
    assert_next_good_request_succeeds(fam, oip)


@pytest.mark.parametrize(
    "shape, message",
    [
        ([1, 3, 0, 84], "zero size"),
        ([1, 3, 20_000, 20_000], "a side over the limit"),
        ([1, 3, 4, 2_000], "aspect ratio over the limit"),
        ([8, 3, 300, 300], "more than the limit of 2000000 bytes"),
        ([-1, 3, 8, 8], "sizes >= 0"),
    ],
)
def test_oip_pixel_shapes_are_checked_before_the_data(oip, fam, shape, message) -> None:
    request = oip_pb2.ModelInferRequest(model_name="default-classifier")
    request.inputs.add(name="pixels", datatype="FP32", shape=shape)
    with pytest.raises(grpc.RpcError) as error:
        oip.ModelInfer(request, timeout=TIMEOUT)
    assert error.value.code() in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert message in error.value.details()
    assert_next_good_request_succeeds(fam, oip)


def test_fam_many_empty_images_are_refused_by_count(fam, oip) -> None:
    request = fam_pb2.ExplainRequest(
        model="default-classifier", images=[fam_pb2.Image(encoded=b"")] * 50_000
    )
    with peak_rss_growth() as peak, pytest.raises(grpc.RpcError) as error:
        fam.Explain(request, timeout=TIMEOUT)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "50000 images, more than the limit of 8" in error.value.details()
    assert peak.growth < 48 * MiB, peak.growth / MiB
    assert_next_good_request_succeeds(fam, oip)


# -- decode amplification ----------------------------------------------------------------------
@pytest.mark.parametrize("front", ["fam", "oip"])
@pytest.mark.parametrize(
    "data, message",
    [
        (flat_png(1, 10_000), "aspect ratio over the limit of 32"),  # +817 MiB before (README)
        (png_header_only(17_000, 1_000), "a side over the limit of 16384"),
        (png_header_only(5_000, 5_000), "more than the limit of 16000000"),
    ],
    ids=["1x10000", "17000x1000", "25-megapixel"],
)
def test_image_headers_are_checked_before_decoding(fam, oip, front, data, message) -> None:
    with peak_rss_growth() as peak:
        code, details = send(front, fam, oip, data)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert message in details
    assert peak.growth < 16 * MiB, peak.growth / MiB
    assert_next_good_request_succeeds(fam, oip)


@pytest.mark.parametrize("front", ["fam", "oip"])
def test_decoded_bytes_of_a_request_are_limited(fam, oip, front) -> None:
    big = flat_png(3_000, 3_000)  # 36 MB decoded each, a few kB encoded
    with peak_rss_growth() as peak:
        code, details = send(front, fam, oip, big, big, big)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "once decoded, more than the limit of 104857600 bytes per request" in details
    assert peak.growth < 16 * MiB, peak.growth / MiB
    assert_next_good_request_succeeds(fam, oip)


def test_a_large_image_is_decoded_near_the_input_size(fam, oip) -> None:
    """A 9-megapixel PNG: the float tensor is never full size (before: about +240 MiB)."""
    big = flat_png(3_000, 3_000)
    with peak_rss_growth() as peak:
        reply = fam.Explain(fam_request(big), timeout=TIMEOUT)
    assert len(reply.results[0].heatmap.data) == 84 * 84 * 2
    assert peak.growth < 80 * MiB, peak.growth / MiB
    small = flat_png(84, 84)  # the same colour: the same answer
    assert reply.results[0].scores == pytest.approx(
        fam.Explain(fam_request(small), timeout=TIMEOUT).results[0].scores, abs=1e-4
    )


def test_the_in_flight_budget_refuses_when_full(server, fam, oip) -> None:
    budget = server.pipeline.decode_budget
    with budget.reserve(budget.capacity, None, 0.0):  # another request holds it all
        code, details = send("fam", fam, oip, png_bytes(1))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "retry later" in details
    assert budget.in_use == 0
    assert_next_good_request_succeeds(fam, oip)


def test_the_in_flight_budget_waits_for_room() -> None:
    from fam_core.pipeline.decode import DecodeBudget

    budget = DecodeBudget(100)
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with budget.reserve(80, None, 0.0):
            held.set()
            done.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    with pytest.raises(ResourceExhausted), budget.reserve(40, None, 0.05):
        pass
    threading.Timer(0.1, done.set).start()
    started = time.perf_counter()
    with budget.reserve(40, None, 5.0):
        assert budget.in_use == 40
    assert 0.05 < time.perf_counter() - started < 3.0
    holder.join(5)
    assert budget.in_use == 0


# -- metric labels and logs are bounded --------------------------------------------------------
def _metrics(server, token: str | None = TOKEN) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.metrics_port}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


@pytest.mark.parametrize("front", ["fam", "oip"])
def test_unknown_model_names_share_one_label_and_are_cut_in_logs(server, fam, oip, front):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    LOGGER.addHandler(handler)
    old_level = LOGGER.level
    LOGGER.setLevel(logging.INFO)
    before = len(_metrics(server)[1])
    try:
        for i in range(200):
            code, details = send(front, fam, oip, png_bytes(0), model=f"made-up-{front}-{i}")
            assert code == grpc.StatusCode.NOT_FOUND
        code, details = send(front, fam, oip, png_bytes(0), model="x" * MiB)
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(old_level)
    assert code == grpc.StatusCode.NOT_FOUND and len(details) < 2_000
    status, text = _metrics(server)
    assert status == 200
    assert "made-up" not in text and "xxxx" not in text
    assert f'model="{UNKNOWN_MODEL}"' in text
    assert len(text) - before < 2_000  # at most a few new series, not 200
    logged = [r.msg for r in records if isinstance(r.msg, dict) and r.msg.get("event") == "rpc"]
    assert len(logged) == 201
    assert max(len(json.dumps(entry)) for entry in logged) < 3_000
    assert_next_good_request_succeeds(fam, oip)


# -- the deadline is checked between stages ----------------------------------------------------
@pytest.mark.parametrize("front", ["fam", "oip"])
def test_decoding_stops_at_the_deadline(server, fam, oip, front, monkeypatch) -> None:
    import fam_core.pipeline.service as service

    calls = []
    real = service.decode_input

    def slow_decode(*args, **kwargs):
        calls.append(time.monotonic())
        time.sleep(0.15)
        return real(*args, **kwargs)

    monkeypatch.setattr(service, "decode_input", slow_decode)
    images = [png_bytes(i) for i in range(8)]
    if front == "fam":
        call = lambda: fam.Explain(fam_request(*images), timeout=0.4)  # noqa: E731
    else:
        call = lambda: oip.ModelInfer(oip_bytes_request(*images), timeout=0.4)  # noqa: E731
    with pytest.raises(grpc.RpcError) as error:
        call()
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.6)  # would the server go on decoding the other images?
    assert 1 <= len(calls) <= 4, len(calls)
    monkeypatch.undo()
    assert_next_good_request_succeeds(fam, oip)


# -- health and readiness from threads request load cannot starve ------------------------------
def test_health_port_answers_while_every_request_thread_is_busy(model_dir) -> None:
    server = FamServer(  # the health port is on by default (a free one with port 0)
        ModelRegistry.from_directory(model_dir),
        ServerConfig(port=0, max_workers=2, batching=None),
    )
    server.start()
    assert server.health_port not in (None, 0, server.port)
    release = threading.Event()
    real = server.pipeline.explain
    entered = threading.Semaphore(0)

    def blocked(*args, **kwargs):
        entered.release()
        release.wait(20)
        return real(*args, **kwargs)

    server.pipeline.explain = blocked  # type: ignore[method-assign]
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as main,
            grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as side,
            ThreadPoolExecutor(4) as pool,
        ):
            fam = fam_pb2_grpc.FamServiceStub(main)
            busy = [
                pool.submit(fam.Explain, fam_request(png_bytes(0)), timeout=TIMEOUT)
                for _ in range(4)
            ]
            for _ in range(2):  # both request threads are now blocked, two calls queued
                assert entered.acquire(timeout=TIMEOUT)
            with pytest.raises(grpc.RpcError) as starved:  # the main port's health waits
                health_pb2_grpc.HealthStub(main).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            assert starved.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            started = time.perf_counter()
            answer = health_pb2_grpc.HealthStub(side).Check(
                health_pb2.HealthCheckRequest(service="default-classifier"), timeout=2
            )
            ready = oip_pb2_grpc.GRPCInferenceServiceStub(side)
            assert ready.ServerReady(oip_pb2.ServerReadyRequest(), timeout=2).ready
            assert ready.ModelReady(oip_pb2.ModelReadyRequest(name="default-classifier")).ready
            assert time.perf_counter() - started < 2.0  # not queued behind the 20 s holds
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as unimplemented:  # no work on the health port
                ready.ModelInfer(oip_bytes_request(png_bytes(0)), timeout=2)
            assert unimplemented.value.code() == grpc.StatusCode.UNIMPLEMENTED
            release.set()
            assert all(len(f.result(TIMEOUT).results) == 1 for f in busy)
    finally:
        release.set()
        server.stop(grace=2.0)


def test_health_port_defaults_to_the_next_port_and_turns_off() -> None:
    from fam_core.commands.serve import _health_port
    from fam_core.server.app import resolve_health_port

    assert ServerConfig().health_port == "auto"
    assert resolve_health_port("auto", 50051) == 50052
    assert resolve_health_port("auto", 0) == 0  # a free one, as the main port
    assert resolve_health_port(None, 50051) is None
    assert resolve_health_port(9000, 50051) == 9000
    for bad, message in (
        (50051, "differ from the main port"),
        (70000, r"\[0, 65535\]"),
        ("8080", "a port, 'auto' or None"),
    ):
        with pytest.raises(ValueError, match=message):
            resolve_health_port(bad, 50051)
    with pytest.raises(ValueError, match="below 65535"):
        resolve_health_port("auto", 65535)
    assert (_health_port("auto"), _health_port("off"), _health_port("0")) == ("auto", None, 0)
    for bad in ("none", "-1", "65536"):
        with pytest.raises(Exception, match="expected a port"):
            _health_port(bad)


# -- every PIL mode as its 8-bit RGB equivalent ------------------------------------------------
def _modes() -> dict[str, tuple[Image.Image, np.ndarray]]:
    """Each mode's image and the 8-bit RGB it must decode to."""
    grey = grey8()
    rgb = np.stack([grey, 255 - grey, grey // 2], axis=2)
    expected_grey = np.repeat(grey[:, :, None], 3, axis=2)
    alpha = np.full_like(grey, 255)
    alpha[:10] = 0  # the top rows are transparent: black
    transparent = expected_grey.copy()
    transparent[:10] = 0
    palette = Image.fromarray(rgb).quantize(16)
    palette.info["transparency"] = 0
    palette_rgb = np.asarray(palette.convert("RGB")).copy()
    palette_rgb[np.asarray(palette) == 0] = 0
    return {
        "I;16": (Image.fromarray(grey.astype(np.uint16) * 257), expected_grey),
        "I;16B": (Image.fromarray((grey.astype(np.uint16) * 257).astype(">u2")), expected_grey),
        "I": (Image.fromarray(grey.astype(np.int32) * 257, mode="I"), expected_grey),
        "F": (Image.fromarray(grey.astype(np.float32)), expected_grey),
        "L": (Image.fromarray(grey), expected_grey),
        "1": (Image.fromarray(grey > 127), np.repeat((grey > 127)[:, :, None] * 255, 3, 2)),
        "LA": (Image.fromarray(np.stack([grey, alpha], 2), mode="LA"), transparent),
        "RGBA": (
            Image.fromarray(np.concatenate([expected_grey, alpha[:, :, None]], 2)),
            transparent,
        ),
        "P+transparency": (palette, palette_rgb),
        "CMYK": (Image.fromarray(rgb).convert("CMYK"), rgb),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_every_mode_decodes_to_its_8_bit_rgb(mode) -> None:
    image, expected = _modes()[mode]
    if mode in ("I;16", "I;16B"):
        assert image.mode in ("I;16", "I;16B")
    got = to_rgb8(image)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= (1 if mode == "CMYK" else 0)


@pytest.mark.parametrize("mode", ["I;16", "LA", "P+transparency", "1", "L"])
def test_png_of_each_mode_decodes_like_its_8_bit_png(mode) -> None:
    image, expected = _modes()[mode]
    decoded = decode_input(EncodedImage(encode(image)), Limits())
    want = torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(decoded, want)


def test_exif_orientation_is_applied() -> None:
    grey = grey8()
    image = Image.fromarray(np.stack([grey, grey, 255 - grey], axis=2))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    data = encode(image, "PNG", exif=exif.tobytes())
    decoded = decode_input(EncodedImage(data), Limits())
    upright = np.asarray(image.transpose(Image.Transpose.ROTATE_270))
    assert tuple(decoded.shape) == (3, 120, 96)
    assert torch.equal(decoded, torch.from_numpy(upright.copy()).permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize("front", ["fam", "oip"])
def test_16_bit_png_gets_the_answer_of_its_8_bit_png(fam, oip, front) -> None:
    grey = grey8()
    eight = encode(Image.fromarray(grey))
    sixteen = encode(Image.fromarray(grey.astype(np.uint16) * 257))
    answers = []
    for data in (eight, sixteen):
        code, reply = send(front, fam, oip, data)
        assert code == grpc.StatusCode.OK, reply
        answers.append(reply)
    if front == "fam":
        a, b = (r.results[0] for r in answers)
        assert a.prediction.label == b.prediction.label
        assert a.scores == pytest.approx(b.scores, abs=1e-6)
        assert a.heatmap.data == b.heatmap.data
    else:
        assert answers[0].raw_output_contents == answers[1].raw_output_contents


# -- formats: an allow-list, the rest refused without running their parser ---------------------
REFUSED = {
    "BMP": lambda image: encode(image, "BMP"),
    "GIF": lambda image: encode(image, "GIF"),
    "TIFF": lambda image: encode(image, "TIFF"),
    "ICO": lambda image: encode(image.resize((64, 64)), "ICO"),
}


@pytest.mark.parametrize("front", ["fam", "oip"])
@pytest.mark.parametrize("fmt", list(REFUSED))
def test_formats_outside_the_allow_list_are_refused(fam, oip, front, fmt) -> None:
    data = REFUSED[fmt](Image.fromarray(grey8()).convert("RGB"))
    code, details = send(front, fam, oip, data)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert f"{fmt} images are not accepted; this server accepts PNG/JPEG/WEBP" in details
    assert_next_good_request_succeeds(fam, oip)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_are_accepted(fam, oip, fmt) -> None:
    code, reply = send("fam", fam, oip, encode(Image.fromarray(grey8()).convert("RGB"), fmt))
    assert code == grpc.StatusCode.OK, reply


def test_the_allow_list_is_configurable(model_dir) -> None:
    bmp = REFUSED["BMP"](Image.fromarray(grey8()).convert("RGB"))
    pipeline = Pipeline(
        ModelRegistry.from_directory(model_dir), Limits(formats=("png", "bmp")), batching=None
    )
    assert pipeline.explain(ExplainRequest("default-classifier", (EncodedImage(bmp),))).results
    with pytest.raises(ValueError, match="Limits.formats"):
        Limits(formats=("PSD",))


# -- OIP target_class --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value", ["two", math.nan, math.inf, 1.5, "", True], ids=["text", "nan", "inf", "1.5", "", "b"]
)
def test_oip_bad_target_class_is_invalid_argument(fam, oip, value) -> None:
    code, _ = send("oip", fam, oip, png_bytes(0), target_class=value)
    assert code == (grpc.StatusCode.OK if value == "" else grpc.StatusCode.INVALID_ARGUMENT)
    assert_next_good_request_succeeds(fam, oip)


@pytest.mark.parametrize("value", [2, "2", 2.0])
def test_oip_target_class_as_int_text_or_integral_double(oip, value) -> None:
    reply = oip.ModelInfer(oip_bytes_request(png_bytes(0), target_class=value), timeout=TIMEOUT)
    assert reply.outputs[-1].name == "heatmap"


# -- /metrics behind a bearer token ------------------------------------------------------------
def test_metrics_need_the_bearer_token(server) -> None:
    assert _metrics(server, token=None)[0] == 401
    assert _metrics(server, token="wrong")[0] == 401
    status, text = _metrics(server)
    assert status == 200 and "fam_requests_total" in text


# -- the TorchServe handler, in process --------------------------------------------------------
@pytest.fixture(scope="module")
def handler(model_dir):
    pytest.importorskip("ts", reason="TorchServe is not installed")
    handler = load_handler("fam_handler_abuse").FamHandler()
    context = HandlerContext(model_dir / "default-classifier")
    handler.initialize(context)
    return handler, context


def _handle(handler, rows) -> list[tuple[int, dict]]:
    handler, context = handler
    context.statuses.clear()
    out = handler.handle(rows, context)
    return [(context.statuses.get(i, (200, ""))[0], json.loads(body)) for i, body in enumerate(out)]


@pytest.mark.parametrize(
    "row, status, message",
    [
        ({"body": {"data": [""] * 100_000}}, 413, "100000 images, more than the limit"),
        ({"body": flat_png(1, 10_000)}, 400, "aspect ratio over the limit"),
        ({"body": png_header_only(17_000, 1_000)}, 400, "a side over the limit"),
        ({"body": encode(Image.fromarray(grey8()), "BMP")}, 415, "BMP images are not accepted"),
        ({"body": encode(Image.fromarray(grey8()), "GIF")}, 415, "GIF images are not accepted"),
    ],
    ids=["many-images", "1x10000", "17000x1000", "bmp", "gif"],
)
def test_torchserve_handler_refuses_abuse(handler, row, status, message) -> None:
    with peak_rss_growth() as peak:
        ((got, body),) = _handle(handler, [row])
    assert got == status and message in body["message"], body
    assert peak.growth < 32 * MiB, peak.growth / MiB
    ((good, body),) = _handle(handler, [{"body": png_bytes(0)}])
    assert good == 200 and body["results"][0]["heatmap"]["shape"] == [84, 84]


def test_torchserve_handler_16_bit_png_answers_like_8_bit(handler) -> None:
    grey = grey8()
    (_, eight), (_, sixteen) = _handle(
        handler,
        [
            {"body": encode(Image.fromarray(grey))},
            {"body": encode(Image.fromarray(grey.astype(np.uint16) * 257))},
        ],
    )
    assert eight["results"][0]["heatmap"] == sixteen["results"][0]["heatmap"]
    assert (
        eight["results"][0]["prediction"]["label"] == sixteen["results"][0]["prediction"]["label"]
    )


# -- corrupt, empty or malicious weights: one line, never advice to load unsafely --------------
class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize("file", ["weights.pt", "prototypes.pt"])
@pytest.mark.parametrize("kind", ["empty", "truncated", "pickle"])
def test_bad_weights_fail_in_one_line_naming_the_file(model_dir, tmp_path, file, kind) -> None:
    import pickle
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(model_dir / "default-embedding", folder)
    good = (folder / file).read_bytes()
    data = {"empty": b"", "truncated": good[:100], "pickle": pickle.dumps(_Evil())}[kind]
    (folder / file).write_bytes(data)
    registry = ModelRegistry.load([folder], keep_going=True)
    (failed,) = registry.failed()
    assert str(folder / file) in failed.reason and "\n" not in failed.reason
    assert "False" not in failed.reason and "weights_only" not in failed.reason
    assert {"empty": "is empty", "truncated": "truncated or corrupt", "pickle": "refused"}[
        kind
    ] in failed.reason


def test_fam_serve_with_a_malicious_pickle_exits_2_with_one_line(model_dir, tmp_path) -> None:
    import pickle
    import shutil
    import subprocess
    import sys

    folder = tmp_path / "evil"
    shutil.copytree(model_dir / "default-classifier", folder)
    (folder / "weights.pt").write_bytes(pickle.dumps(_Evil()))
    done = subprocess.run(
        [sys.executable, "-m", "fam_core.cli", "serve", "--model", str(folder), "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "weights.pt" in done.stderr and "False" not in done.stderr
    assert "unpickled!" not in done.stdout + done.stderr
