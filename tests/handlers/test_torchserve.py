"""End to end: the FAM handler in a real TorchServe on loopback (skipped without Java/torchserve).

One server for the module serves both variants of both default models (torch weights and the
exported ONNX graph): archives built by ``fam archive``'s :func:`build_archive` into a
temporary model store, ``TMPDIR``/``TEMP``/logs in a temporary folder, free ports, token
authorisation off. Heatmaps are checked against the explainers run directly on the same image.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from serving_helpers import png_header_only
from torchserve_helpers import (
    MODELS,
    REPO,
    Server,
    decode_heatmap,
    http,
    torchserve_missing,
)

from fam_core.pipeline.json_codec import kserve_fields, request_from_fields


def post_json(url: str, payload: dict) -> tuple[int, dict, dict[str, str]]:
    status, body, headers = http(
        "POST", url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    return status, json.loads(body), headers


def multipart(fields: dict[str, bytes]) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        kind = "application/octet-stream" if name == "data" else "text/plain"
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
            f"Content-Type: {kind}\r\n\r\n".encode()
            + value
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def png_bytes(seed: int, size: int = 84) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def direct_heatmap(name: str, method: str, png: bytes, target: int | None = None) -> torch.Tensor:
    """The explainer run directly (no pipeline) on the decoded, normalised 84x84 image."""
    from fam_core.explainers import get_explainer
    from fam_core.models.store import load_model

    model, config = load_model(name)
    pixels = torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).copy())
    images = config.normalize(pixels.permute(2, 0, 1)[None].float() / 255.0)
    explainer = get_explainer(method)(model, config.target_layer, similarity=config.similarity)
    if config.task == "embedding" and target is None:
        target = config.load_prototypes()
        scores = torch.nn.functional.cosine_similarity(model(images)[:, None], target[None], dim=-1)
        target = target[int(scores.argmax())]
    return explainer(images, target).maps[0]


BROKEN = ("broken-weights", "missing-factory")
"""Archives whose model fails to load in the handler's ``initialize`` (answered 503)."""
UNIMPORTABLE = "bad-handler"
"""An archive whose handler file cannot be imported: TorchServe's own failure path."""


def broken_archives(folder: Path) -> tuple[dict, ...]:
    """``build_archive`` arguments of the broken archives: the default classifier with its
    weights truncated, one whose ``factory:`` names a missing package, and one packing a
    handler that raises at import."""
    import yaml

    from fam_core.models.store import find_config

    good = find_config("default-classifier").parent
    truncated, factory = folder / "truncated", folder / "factory"
    for copy in (truncated, factory):
        shutil.copytree(good, copy)
    weights = truncated / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    config = yaml.safe_load((factory / "config.yaml").read_text())
    for key in ("backbone", "backbone_kwargs"):
        config.pop(key)
    config.update(name="missing-factory", factory="no_such_package_fam_ts.models:build")
    (factory / "config.yaml").write_text(yaml.safe_dump(config))
    handler = folder / "bad_handler.py"
    handler.write_text("import no_such_module_fam_ts  # fails at import, before any handler code\n")
    return (
        {"name_or_config": truncated / "config.yaml", "archive_name": "broken-weights"},
        {"name_or_config": factory / "config.yaml"},
        {"name_or_config": good / "config.yaml", "archive_name": UNIMPORTABLE, "handler": handler},
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    reason = torchserve_missing()
    if reason is not None:
        pytest.skip(reason)
    running = Server(
        tmp_path_factory.mktemp("torchserve"),
        extra=broken_archives(tmp_path_factory.mktemp("broken")),
        never_ready=(UNIMPORTABLE,),
    )
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


# -- the JSON mapping (no server needed)


def test_fields_map_to_request_from_bytes_text_and_json_values() -> None:
    request = request_from_fields(
        "m",
        {"data": [base64.b64encode(b"a").decode(), b"b"], "method": b" gradcam ",
         "target_class": "3", "heatmap": b"false", "top_k": 2, "overlay": True},
    )  # fmt: skip
    assert [image.data for image in request.images] == [b"a", b"b"]
    assert (request.method, request.target_class, request.heatmap) == ("gradcam", 3, False)
    assert (request.top_k, request.overlay, request.embedding) == (2, True, False)
    assert request_from_fields("m", {"body": b"x", "heatmap": "0"}, force_heatmap=True).heatmap
    assert request_from_fields("m", {"data": b"x", "target_class": 7.0}).target_class == 7


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "no image"),
        ({"data": "not base64!"}, "not base64"),
        ({"data": b"x", "colour": b"red"}, "unknown request fields ['colour']"),
        ({"data": b"x", "top_k": "many"}, "top_k"),
        ({"data": b"x", "heatmap": "perhaps"}, "heatmap"),
        ({"data": b"x", "resolution": "huge"}, "resolution"),
        ({"data": b"x", "image": b"y"}, "several fields"),
        ({"data": b"x", "target_class": 7.5}, "got '7.5'"),
        ({"data": b"x", "target_class": "9" * 5_000}, "got '" + "9" * 40 + "'$"),
    ],
)
def test_bad_fields_name_what_is_wrong(fields: dict, message: str) -> None:
    from fam_core.pipeline import InvalidArgument

    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        request_from_fields("m", fields)


def test_kserve_instances_become_images_and_parameters_options() -> None:
    fields = kserve_fields(
        {"instances": ["QQ==", {"b64": "Qg=="}, {"data": "Qw=="}], "parameters": {"top_k": 1}}
    )
    request = request_from_fields("m", fields)
    assert [image.data for image in request.images] == [b"A", b"B", b"C"]
    assert request.top_k == 1


# -- against the server


def test_predictions_raw_body_classifier_matches_cam(server: Server) -> None:
    png = png_bytes(1)
    status, body, _ = http("POST", f"{server.inference}/predictions/default-classifier", png)
    assert status == 200, body
    reply = json.loads(body)
    (result,) = reply["results"]
    assert reply["model"] == "default-classifier"
    assert len(result["scores"]) == 48
    assert result["prediction"]["index"] == int(np.argmax(result["scores"]))
    assert result["heatmap"]["method"] == "cam" and result["heatmap"]["shape"] == [84, 84]
    expected = direct_heatmap("default-classifier", "cam", png, result["prediction"]["index"])
    assert torch.allclose(decode_heatmap(result["heatmap"]), expected, atol=1e-3)


def test_predictions_json_embedding_matches_fam_and_returns_embedding(server: Server) -> None:
    png = png_bytes(2)
    payload = {"data": base64.b64encode(png).decode(), "embedding": True, "overlay": True}
    status, reply, _ = post_json(f"{server.inference}/predictions/default-embedding", payload)
    assert status == 200, reply
    (result,) = reply["results"]
    assert result["heatmap"]["method"] == "fam"
    assert torch.allclose(
        decode_heatmap(result["heatmap"]),
        direct_heatmap("default-embedding", "fam", png),
        atol=1e-3,
    )
    embedding = np.frombuffer(base64.b64decode(result["embedding"]["data"]), dtype="<f4")
    assert embedding.shape == (result["embedding"]["shape"][0],) == (64,)
    assert base64.b64decode(result["overlay_png"]).startswith(b"\x89PNG")


def test_multipart_and_headers_choose_method_and_target(server: Server) -> None:
    png = png_bytes(3)
    body, headers = multipart({"data": png, "method": b"gradcam", "target_class": b"7"})
    status, raw, _ = http(
        "POST", f"{server.inference}/predictions/default-classifier", body, headers
    )
    assert status == 200, raw
    (result,) = json.loads(raw)["results"]
    assert result["heatmap"]["method"] == "gradcam"
    expected = direct_heatmap("default-classifier", "gradcam", png, 7)
    assert torch.allclose(decode_heatmap(result["heatmap"]), expected, atol=1e-3)

    url = f"{server.inference}/predictions/default-classifier"
    status, raw, _ = http("POST", url, png, {"Content-Type": "image/png", "X-Fam-Heatmap": "false"})
    assert status == 200, raw
    assert "heatmap" not in json.loads(raw)["results"][0]


def test_explanations_and_kserve_explain_return_the_heatmap(server: Server) -> None:
    png = png_bytes(4)
    url = f"{server.inference}/explanations/default-classifier"
    status, raw, _ = http("POST", url, png, {"Content-Type": "image/png", "X-Fam-Heatmap": "0"})
    assert status == 200, raw
    (result,) = json.loads(raw)["results"]
    expected = direct_heatmap("default-classifier", "cam", png, result["prediction"]["index"])
    assert torch.allclose(decode_heatmap(result["heatmap"]), expected, atol=1e-3)

    payload = {"instances": [{"b64": base64.b64encode(png).decode()}]}
    status, reply, _ = post_json(
        f"{server.inference}/v1/models/default-classifier:explain", payload
    )
    assert status == 200, reply
    (kserve,) = reply["explanations"]
    assert kserve["heatmap"]["data"] == result["heatmap"]["data"]

    status, reply, _ = post_json(
        f"{server.inference}/v1/models/default-classifier:predict", payload
    )
    assert status == 200, reply
    (predicted,) = reply["predictions"]
    assert predicted["prediction"] == result["prediction"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("broken-weights", "weights.pt: the file is truncated or corrupt"),
        ("missing-factory", "cannot import module 'no_such_package_fam_ts.models'"),
    ],
)
def test_a_broken_archive_answers_503_at_once_without_restarts(
    server: Server, name: str, reason: str
) -> None:
    assert server.workers(name) == ["READY"]  # the worker lives on, answering 503
    started = time.monotonic()
    status, raw, _ = http("POST", f"{server.inference}/predictions/{name}", png_bytes(7))
    elapsed = time.monotonic() - started
    assert status == 503 and elapsed < 5.0, (status, elapsed, raw)
    body = json.loads(raw)
    assert body["code"] == "UNAVAILABLE", body
    assert (
        body["message"].startswith(f"model {name!r} failed to load: ") and reason in body["message"]
    ), body
    logged = [line for line in server.log("model_log.log").splitlines() if "fam: model" in line]
    assert any(f"fam: model {name!r} failed to load" in line for line in logged), logged
    assert f"Load model failed: {name}" not in server.log("ts_log.log")  # never restarted
    status, raw, _ = http(
        "POST", f"{server.inference}/predictions/default-classifier", png_bytes(7)
    )
    assert status == 200, raw


def test_an_archive_whose_handler_cannot_import_is_torchserves_restart_loop(
    server: Server,
) -> None:
    """What TorchServe 0.12 itself does when no handler code runs (see README, TorchServe)."""
    assert "READY" not in server.workers(UNIMPORTABLE)
    request = urllib.request.Request(
        f"{server.inference}/predictions/{UNIMPORTABLE}", data=png_bytes(8), method="POST",
        headers={"Content-Type": "image/png"},
    )  # fmt: skip
    with pytest.raises(OSError, match="timed out"):  # queued for a worker that never comes
        urllib.request.urlopen(request, timeout=3).read()
    deadline = time.monotonic() + 30.0
    while "Retry worker" not in server.log("ts_log.log") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert f"Load model failed: {UNIMPORTABLE}, error: Worker died." in server.log("ts_log.log")
    assert "No module named 'no_such_module_fam_ts'" in server.log("model_log.log")
    status, raw, _ = http("GET", f"{server.inference}/ping")  # does not see the dead model
    assert (status, json.loads(raw)["status"]) == (200, "Healthy"), raw
    status, raw, _ = http(
        "POST", f"{server.inference}/predictions/default-classifier", png_bytes(8)
    )
    assert status == 200, raw


@pytest.mark.parametrize(
    ("body", "method", "status", "message"),
    [
        (b"\x89PNG\r\n\x1a\n not really", "", 400, "image 0"),
        (None, "nonsense", 400, "unknown method 'nonsense'"),
    ],
)
def test_bad_input_is_4xx_with_message_and_worker_survives(
    server: Server, body: bytes | None, method: str, status: int, message: str
) -> None:
    url = f"{server.inference}/predictions/default-classifier"
    headers = {"Content-Type": "image/png", "X-Fam-Method": method}
    got, raw, _ = http("POST", url, body if body is not None else png_bytes(5), headers)
    assert got == status, raw
    assert message in raw.decode()
    good, raw, _ = http("POST", url, png_bytes(5))
    assert good == 200, raw


def test_a_batch_is_one_pass_and_a_bad_row_fails_alone(server: Server) -> None:
    url = f"{server.inference}/predictions/default-classifier"
    bodies = [png_bytes(10), png_bytes(11), b"corrupt", png_bytes(12)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda body: http("POST", url, body), bodies))
    assert [status for status, _, _ in replies] == [200, 200, 400, 200]
    sizes = [int(headers["X-Fam-Batch-Size"]) for status, _, headers in replies if status == 200]
    assert max(sizes) > 1  # several requests answered by one explain_batch pass
    for body, (_, raw, _) in zip(bodies, replies, strict=True):
        if body != b"corrupt":
            (result,) = json.loads(raw)["results"]
            expected = direct_heatmap(
                "default-classifier", "cam", body, result["prediction"]["index"]
            )
            assert torch.allclose(decode_heatmap(result["heatmap"]), expected, atol=1e-3)


def test_custom_metrics_on_the_prometheus_endpoint(server: Server) -> None:
    status, _, _ = http("POST", f"{server.inference}/predictions/default-embedding", png_bytes(6))
    assert status == 200
    status, raw, _ = http("GET", f"{server.metrics}/metrics")
    text = raw.decode()
    assert status == 200
    heatmaps = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("FamHeatmapsReturned{") and 'ModelName="default-embedding"' in line
    ]
    assert heatmaps and heatmaps[0] >= 1.0, text[-3000:]
    assert any(line.startswith("FamExplanationTime{") for line in text.splitlines())


def test_fam_archive_command_packs_handler_config_weights_and_prototypes(tmp_path: Path) -> None:
    import zipfile

    from fam_core import cli

    pytest.importorskip("model_archiver", reason="torch-model-archiver is not installed")
    assert (
        cli.main(["archive", "default-embedding", "--out", str(tmp_path), "--batch-size", "3"]) == 0
    )
    with zipfile.ZipFile(tmp_path / "default-embedding.mar") as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        settings = archive.read("model-config.yaml").decode()
        weights = archive.read("weights.pt")
    assert {"fam_handler.py", "config.yaml", "prototypes.pt", "weights.pt"} <= names
    assert manifest["model"]["handler"] == "fam_handler.py"
    assert "batchSize: 3\n" in settings
    assert weights == (REPO / "model-store" / "default-embedding" / "weights.pt").read_bytes()
    assert cli.main(["archive", "default-embedding", "--out", str(tmp_path), "--workers", "0"]) == 2


# -- the ONNX variant: the exported graph in the same handler


@pytest.mark.parametrize("name", MODELS)
def test_onnx_variant_heatmap_equals_the_torch_variant(server: Server, name: str) -> None:
    png = png_bytes(20)
    replies = {}
    for served in (name, f"{name}-onnx"):
        status, raw, _ = http("POST", f"{server.inference}/predictions/{served}", png)
        assert status == 200, raw
        replies[served] = json.loads(raw)
    torch_result, onnx_result = (replies[key]["results"][0] for key in (name, f"{name}-onnx"))
    assert replies[f"{name}-onnx"]["model"] == f"{name}-onnx"
    assert onnx_result["heatmap"]["method"] == torch_result["heatmap"]["method"]
    onnx_prediction, torch_prediction = onnx_result["prediction"], torch_result["prediction"]
    assert (onnx_prediction["label"], onnx_prediction["index"]) == (
        torch_prediction["label"],
        torch_prediction["index"],
    )  # the score differs between backends in the 7th digit on some CPUs
    assert onnx_prediction["score"] == pytest.approx(torch_prediction["score"], abs=1e-4)
    np.testing.assert_allclose(onnx_result["scores"], torch_result["scores"], atol=1e-4)
    onnx_map, torch_map = (decode_heatmap(r["heatmap"]) for r in (onnx_result, torch_result))
    assert torch.allclose(onnx_map, torch_map, atol=1e-3)
    assert onnx_map.max() == 1.0 and onnx_map.min() == 0.0  # a real, min-max scaled map


def test_onnx_variant_refuses_another_method_and_keeps_serving(server: Server) -> None:
    url = f"{server.inference}/predictions/default-classifier-onnx"
    status, raw, _ = http("POST", url, png_bytes(21), {"Content-Type": "image/png",
                                                       "X-Fam-Method": "gradcam"})  # fmt: skip
    assert status == 404 and "gradcam" in raw.decode(), raw
    status, raw, _ = http("POST", url, png_bytes(21))
    assert status == 200, raw


def test_fam_archive_onnx_packs_the_exported_graph_and_its_config(tmp_path: Path) -> None:
    import zipfile

    import onnx
    import yaml

    from fam_core import cli

    pytest.importorskip("model_archiver", reason="torch-model-archiver is not installed")
    assert cli.main(["archive", "default-classifier", "--onnx", "--out", str(tmp_path)]) == 0
    with zipfile.ZipFile(tmp_path / "default-classifier-onnx.mar") as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(archive.read("config.yaml"))
        graph = onnx.load_from_string(archive.read("model.onnx"))
    assert {"fam_handler.py", "config.yaml", "model.onnx"} <= names and "weights.pt" not in names
    assert manifest["model"]["modelName"] == "default-classifier-onnx"
    assert manifest["model"]["handler"] == "fam_handler.py"
    assert (config["name"], config["task"], config["onnx"]) == (
        "default-classifier-onnx", "classifier", "model.onnx"
    )  # fmt: skip
    metadata = {prop.key: prop.value for prop in graph.metadata_props}
    assert (metadata["method"], metadata["class_target"]) == ("cam", "top1")


# -- TorchServe's own gRPC API, stubs generated from its inference.proto

RPC_STATUS_PROTO = """syntax = "proto3";
package google.rpc;
import "google/protobuf/any.proto";
message Status {
  int32 code = 1;
  string message = 2;
  repeated google.protobuf.Any details = 3;
}
"""
"""``google/rpc/status.proto`` as googleapis defines it (imported by TorchServe's proto; the
googleapis-common-protos package that ships it is not installed)."""


def generate_torchserve_stubs(folder: Path) -> Path:
    """``torchserve_inference_pb2(_grpc).py`` from the ``inference.proto`` in TorchServe's jar."""
    import zipfile

    import ts
    from grpc_tools import protoc

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    with zipfile.ZipFile(jar) as archive:
        proto = archive.read("proto/inference.proto").decode()
    assert "service InferenceAPIsService" in proto
    (folder / "google" / "rpc").mkdir(parents=True)
    (folder / "google" / "rpc" / "status.proto").write_text(RPC_STATUS_PROTO)
    (folder / "torchserve_inference.proto").write_text(proto)
    includes = Path(protoc.__file__).parent / "_proto"
    for source in ("google/rpc/status.proto", "torchserve_inference.proto"):
        code = protoc.main(
            ["protoc", f"-I{folder}", f"-I{includes}", f"--python_out={folder}",
             f"--grpc_python_out={folder}", source]
        )  # fmt: skip
        assert code == 0, f"protoc failed on {source}"
    return folder


def test_torchserve_grpc_predictions_match_the_library(server: Server, tmp_path: Path) -> None:
    stubs = generate_torchserve_stubs(tmp_path / "stubs")
    png = png_bytes(30)
    image = tmp_path / "image.png"
    image.write_bytes(png)
    client = Path(__file__).resolve().parents[1] / "helpers" / "torchserve_grpc_client.py"
    address = f"127.0.0.1:{server.ports['g1']}"
    done = subprocess.run(
        [sys.executable, str(client), str(stubs), address, "default-embedding", str(image)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["ping"]["status"] == "Healthy"
    (result,) = report["prediction"]["results"]
    assert result["heatmap"]["method"] == "fam"
    expected = direct_heatmap("default-embedding", "fam", png)
    assert torch.allclose(decode_heatmap(result["heatmap"]), expected, atol=1e-3)
    # TorchServe 0.12's gRPC front end answers a row the handler rejected with status OK; the
    # body is the handler's error JSON (over REST the same row is a 400)
    bad = json.loads(report["bad"]["details"])
    assert bad["code"] == "INVALID_ARGUMENT" and bad["message"].startswith("image 0"), report


# -- the abuse cases over TorchServe's REST API, in the worker process -------------------------
# The same abuse as tests/server/test_abuse.py (fam.v1, OIP), sent to the real server. The peak RSS is
# the worker's: its pid from the management API, ``VmHWM`` reset through
# ``/proc/PID/clear_refs`` before each request and read after. Each request waits out the
# archive's ``maxBatchDelay`` (200 ms here), so the cases are few and bounded.

MiB = 1 << 20
ABUSED = "default-classifier"
ABUSE_PEAK_BOUND = 32 * MiB
"""How far the worker's peak RSS may rise above its RSS for a refused request."""


def worker_pid(server: Server, name: str = ABUSED) -> int:
    status, raw, _ = http("GET", f"{server.management}/models/{name}")
    assert status == 200, raw
    (worker,) = json.loads(raw)[0]["workers"]
    return int(worker["pid"])


def _proc_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class WorkerPeak:
    growth = 0


@contextlib.contextmanager
def worker_peak_growth(server: Server, name: str = ABUSED):
    """``growth``: how far the worker's peak RSS rose above its RSS at entry, in bytes; the
    same worker (same pid) must still serve ``name`` afterwards (it neither died nor restarted).
    """
    pid = worker_pid(server, name)
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError as error:
        pytest.skip(f"cannot reset the worker's peak RSS ({error})")
    start = _proc_bytes(pid, "VmRSS")
    peak = WorkerPeak()
    yield peak
    peak.growth = _proc_bytes(pid, "VmHWM") - start
    assert worker_pid(server, name) == pid, "the worker was replaced"


def assert_next_good_request_succeeds(server: Server, name: str = ABUSED) -> None:
    status, raw, _ = http("POST", f"{server.inference}/predictions/{name}", png_bytes(40))
    assert status == 200, raw
    assert json.loads(raw)["results"][0]["heatmap"]["shape"] == [84, 84]


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def grey8() -> np.ndarray:
    """An 8-bit grey picture with structure (a gradient and a square)."""
    values = np.add.outer(np.arange(96), np.arange(120)).astype(np.uint8)
    values[30:60, 40:80] = 250
    return values


def _abuse_rows() -> list[tuple[str, str, bytes, str, int, str]]:
    """``(id, route, body, content type, status, message)`` for one request each."""
    empty_images = json.dumps({"data": [""] * 100_000}).encode()
    instances = json.dumps({"instances": [""] * 100_000}).encode()
    tall = encoded(Image.new("RGB", (1, 10_000), (40, 120, 200)))
    large = base64.b64encode(encoded(Image.new("RGB", (4_000, 4_000), (40, 120, 200)))).decode()
    picture = Image.fromarray(grey8())
    return [
        # shape bombs: the JSON list's length is checked before any element is decoded
        ("json-100000-images", "predictions", empty_images, "application/json", 413,
         "100000 images, more than the limit of 64"),
        ("kserve-v1-100000-instances", "v1-predict", instances, "application/json", 413,
         "100000 images, more than the limit of 64"),
        # decode amplification: refused from the PNG header, or from the request's total
        ("1x10000", "predictions", tall, "image/png", 400, "aspect ratio over the limit of 32"),
        ("17000x1000", "predictions", png_header_only(17_000, 1_000), "image/png", 400,
         "a side over the limit of 16384"),
        ("25-megapixel", "explanations", png_header_only(5_000, 5_000), "image/png", 400,
         "more than the limit of 16000000"),
        ("9x16-megapixel", "predictions", json.dumps({"data": [large] * 9}).encode(),
         "application/json", 413, "more than the limit of 536870912 bytes per request"),
        # formats outside the allow-list: their parsers never run
        ("bmp", "predictions", encoded(picture, "BMP"), "application/octet-stream", 415,
         "BMP images are not accepted; this server accepts PNG/JPEG/WEBP"),
        ("gif", "v1-explain", json.dumps({"instances": [{"b64": base64.b64encode(
            encoded(picture, "GIF")).decode()}]}).encode(), "application/json", 415,
         "GIF images are not accepted"),
    ]  # fmt: skip


ROUTES = {
    "predictions": "/predictions/{name}",
    "explanations": "/explanations/{name}",
    "v1-predict": "/v1/models/{name}:predict",
    "v1-explain": "/v1/models/{name}:explain",
}


@pytest.fixture(scope="module")
def abuse_rows() -> dict[str, tuple[str, bytes, str, int, str]]:
    return {row[0]: row[1:] for row in _abuse_rows()}


@pytest.mark.parametrize("case", [row[0] for row in _abuse_rows()])
def test_abuse_is_refused_within_a_peak_rss_bound_in_the_worker(
    server: Server, abuse_rows: dict, case: str
) -> None:
    route, body, content_type, status, message = abuse_rows[case]
    url = server.inference + ROUTES[route].format(name=ABUSED)
    with worker_peak_growth(server) as peak:
        got, raw, _ = http("POST", url, body, {"Content-Type": content_type})
    assert got == status, raw[:500]
    reply = json.loads(raw)
    assert message in reply["message"], reply
    assert len(raw) < 2_000
    print(f"\nworker peak RSS, {case}: +{peak.growth / MiB:.1f} MiB, {got}")  # README figures
    assert peak.growth < ABUSE_PEAK_BOUND, peak.growth / MiB
    assert_next_good_request_succeeds(server)


def test_16_bit_png_gets_the_answer_of_its_8_bit_png_over_rest(server: Server) -> None:
    """6. A 16-bit grey PNG is decoded as its 8-bit equivalent (before: all white)."""
    grey = grey8()
    url = f"{server.inference}/predictions/{ABUSED}"
    answers = []
    for image in (Image.fromarray(grey), Image.fromarray(grey.astype(np.uint16) * 257)):
        status, raw, _ = http("POST", url, encoded(image))
        assert status == 200, raw
        answers.append(json.loads(raw)["results"][0])
    eight, sixteen = answers
    assert eight["prediction"]["label"] == sixteen["prediction"]["label"]
    np.testing.assert_allclose(eight["scores"], sixteen["scores"], atol=1e-6)
    assert eight["heatmap"]["data"] == sixteen["heatmap"]["data"]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("two", "field 'target_class' must be an integer, got 'two'"),
        (float("nan"), "field 'target_class' must be an integer, got 'nan'"),
        (1.5, "field 'target_class' must be an integer, got '1.5'"),
        (True, "field 'target_class' must be an integer, got True"),
        (48, "target_class must be in [0, 48), got 48"),
        ("-1", "target_class must be in [0, 48), got -1"),
        ("9" * 5_000, "field 'target_class' must be an integer, got '999"),
    ],
    ids=["text", "nan", "1.5", "bool", "48", "-1", "5000-digits"],
)
def test_bad_target_class_is_400_over_rest(server: Server, target: object, message: str) -> None:
    """8. JSON body (NaN as Python's json writes it; TorchServe's worker reads it back)."""
    payload = {"data": base64.b64encode(png_bytes(41)).decode(), "target_class": target}
    status, reply, _ = post_json(f"{server.inference}/predictions/{ABUSED}", payload)
    assert status == 400, reply
    assert reply["code"] == "INVALID_ARGUMENT" and message in reply["message"], reply
    assert len(reply["message"]) < 1_100, len(reply["message"])
    assert_next_good_request_succeeds(server)


def test_target_class_as_header_text_or_integral_json_number(server: Server) -> None:
    url = f"{server.inference}/predictions/{ABUSED}"
    png = png_bytes(42)
    status, raw, _ = http(
        "POST", url, png, {"Content-Type": "image/png", "X-Fam-Target-Class": "x"}
    )
    assert status == 400 and "got 'x'" in raw.decode(), raw
    heatmaps = set()
    for target in ("7", 7, 7.0):
        payload = {"data": base64.b64encode(png).decode(), "target_class": target}
        status, reply, _ = post_json(url, payload)
        assert status == 200, reply
        heatmaps.add(reply["results"][0]["heatmap"]["data"])
    assert len(heatmaps) == 1  # the same class explained each time
    expected = direct_heatmap(ABUSED, "cam", png, 7)
    assert torch.allclose(decode_heatmap(reply["results"][0]["heatmap"]), expected, atol=1e-3)


def test_unknown_model_names_are_torchserves_404(server: Server) -> None:
    """3. TorchServe answers unknown names in its front end; the worker never sees them, and
    TorchServe's metrics gain no series for them."""
    with worker_peak_growth(server) as peak:
        for name in ("made-up-model", "x" * 4_000, "../default-classifier"):
            status, raw, _ = http("POST", f"{server.inference}/predictions/{name}", png_bytes(43))
            assert status == 404, raw[:300]
            assert len(raw) < 6_000
    assert peak.growth < 4 * MiB, peak.growth / MiB
    status, raw, _ = http("GET", f"{server.metrics}/metrics")
    assert status == 200 and "made-up-model" not in raw.decode()
    assert_next_good_request_succeeds(server)


def test_an_image_at_the_pixel_limit_costs_the_worker_one_decode(server: Server) -> None:
    """The worst accepted image: 4,000 x 4,000 (``max_pixels``), decoded at a reduced scale."""
    big = encoded(Image.new("RGB", (4_000, 4_000), (40, 120, 200)))
    url = f"{server.inference}/predictions/{ABUSED}"
    with worker_peak_growth(server) as peak:
        status, raw, _ = http("POST", url, big)
    assert status == 200, raw[:500]
    print(f"\nworker peak RSS, 16-megapixel PNG answered: +{peak.growth / MiB:.1f} MiB")
    assert peak.growth < 160 * MiB, peak.growth / MiB
    small = encoded(Image.new("RGB", (84, 84), (40, 120, 200)))  # the same colour, same answer
    status, raw_small, _ = http("POST", url, small)
    assert status == 200
    np.testing.assert_allclose(
        json.loads(raw)["results"][0]["scores"],
        json.loads(raw_small)["results"][0]["scores"],
        atol=1e-4,
    )
