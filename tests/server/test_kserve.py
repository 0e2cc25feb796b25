"""The KServe model server (``fam serve --engine kserve``): REST v1, REST v2, gRPC v2.

One server per module runs in a subprocess on free ports, serving random-init models from a
temporary folder; the test process never imports kserve (its protobuf package ``inference``
clashes with fam's stubs), and tritonclient runs in a subprocess of its own
(``tests/helpers/oip_client.py``). Every heatmap is compared with the one the in-process
pipeline (the one ``fam serve`` runs) returns for the same image.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from serving_helpers import kserve_server, make_model_dir, oip_client_report, png_bytes

from fam_core.cli import build_parser
from fam_core.pipeline import EncodedImage, ExplainRequest, ModelRegistry, Pipeline, RawTensor
from fam_core.pipeline.encode import heatmap_from_bytes

if importlib.util.find_spec("kserve") is None:  # found, never imported: see the docstring
    pytest.skip("needs the kserve extra", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kserve"
CLASSIFIER, EMBEDDING = "default-classifier", "default-embedding"
ATOL = 2e-3  # float16 heatmaps in [0, 1]: one unit in the last place is 2**-11 near 1


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = make_model_dir(tmp_path_factory.mktemp("kserve-models"))
    broken = folder / "broken"  # a config whose weights are missing: fails to load
    broken.mkdir()
    config = (folder / CLASSIFIER / "config.yaml").read_text().replace(CLASSIFIER, "broken")
    (broken / "config.yaml").write_text(config)
    miscounted = folder / "miscounted"  # three class names for a five-class classifier
    shutil.copytree(folder / CLASSIFIER, miscounted)
    keys = yaml.safe_load(config) | {"name": "miscounted", "class_names": ["a", "b", "c"]}
    (miscounted / "config.yaml").write_text(json.dumps(keys))
    return folder


@pytest.fixture(scope="module")
def pipeline(models):
    pipeline = Pipeline(ModelRegistry.from_directory(models, keep_going=True), batching=None)
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """``(http base URL, gRPC address)`` of a running ``fam serve --engine kserve``."""
    with kserve_server(models, tmp_path_factory.mktemp("kserve-log") / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0], timeout=60) as client:
        yield client


def reference(pipeline, model: str, image: bytes, **options) -> torch.Tensor:
    """The heatmap ``fam serve``'s pipeline returns for ``image``."""
    result = pipeline.explain(ExplainRequest(model, (EncodedImage(image),), **options)).results[0]
    assert result.heatmap is not None
    return heatmap_from_bytes(result.heatmap.data, result.heatmap.shape)


def json_heatmap(result: dict) -> torch.Tensor:
    heatmap = result["heatmap"]
    assert heatmap["dtype"] == "float16"
    return heatmap_from_bytes(base64.b64decode(heatmap["data"]), tuple(heatmap["shape"]))


# -- readiness
def test_health_routes(client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get(f"/v2/models/{CLASSIFIER}/ready").json()["ready"] is True
    assert client.get(f"/v1/models/{EMBEDDING}").json() == {"name": EMBEDDING, "ready": True}
    assert client.get("/v1/models/nope").status_code == 404
    metadata = client.get(f"/v2/models/{EMBEDDING}").json()
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["outputs"]}
    assert outputs["heatmap"] == ("FP16", [-1, -1, -1])
    assert outputs["embedding"] == ("FP32", [-1, 64])  # the random-init Conv4's embedding size


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("broken", "weights: file "),
        ("miscounted", "class_names: 3 names for a classifier with 5 outputs: expected 5 names"),
    ],
)
def test_a_model_that_failed_to_load_is_not_ready_and_answers_503_with_the_reason(
    client, name, reason
) -> None:
    for method, route, body in (
        ("GET", f"/v2/models/{name}/ready", None),
        ("GET", f"/v1/models/{name}", None),
        ("POST", f"/v2/models/{name}/infer", {"inputs": [{"name": "image", "shape": [1],
                                                          "datatype": "BYTES", "data": ["AAAA"]}]}),
        ("POST", f"/v1/models/{name}:predict", {"instances": ["AAAA"]}),
    ):  # fmt: skip
        answer = client.request(method, route, json=body)
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error.startswith(f"Model with name {name} is not ready: ") and reason in error
        assert answer.json()["code"] == "UNAVAILABLE"
    assert client.get(f"/v2/models/{CLASSIFIER}/ready").json()["ready"] is True  # the others


# -- REST v1
@pytest.mark.parametrize(
    ("model", "method"),
    [(CLASSIFIER, None), (CLASSIFIER, "gradcam"), (CLASSIFIER, "GradCAM"), (EMBEDDING, None)],
)
def test_v1_explain_heatmap_equals_the_pipeline(client, pipeline, model, method) -> None:
    image = png_bytes(1)
    parameters = {"method": method} if method else {}
    body = {"instances": [b64(image), {"b64": b64(png_bytes(2))}], "parameters": parameters}
    response = client.post(f"/v1/models/{model}:explain", json=body)
    assert response.status_code == 200, response.text
    explanations = response.json()["explanations"]
    assert len(explanations) == 2
    expected = reference(pipeline, model, image, method=method)
    assert json_heatmap(explanations[0]).shape == expected.shape == (84, 84)
    torch.testing.assert_close(json_heatmap(explanations[0]), expected, atol=ATOL, rtol=0)
    second = reference(pipeline, model, png_bytes(2), method=method)
    torch.testing.assert_close(json_heatmap(explanations[1]), second, atol=ATOL, rtol=0)
    assert not torch.allclose(expected, second, atol=1e-2)  # the two images differ
    if method:  # names match ignoring case
        assert explanations[0]["heatmap"]["method"] == method.lower()


def test_v1_predict_matches_the_pipeline_and_can_skip_the_heatmap(client, pipeline) -> None:
    image = png_bytes(3)
    body = {"instances": [b64(image)], "parameters": {"heatmap": False, "top_k": 2}}
    response = client.post(f"/v1/models/{CLASSIFIER}:predict", json=body)
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    expected = pipeline.explain(ExplainRequest(CLASSIFIER, (EncodedImage(image),))).results[0]
    assert "heatmap" not in prediction
    assert prediction["prediction"]["label"] == expected.prediction.label
    np.testing.assert_allclose(prediction["scores"], expected.scores, atol=1e-5)
    matches = client.post(f"/v1/models/{EMBEDDING}:predict", json=body).json()["predictions"]
    assert len(matches[0]["top_k"]) == 2  # embedding models: the top_k nearest prototypes
    raw = client.post(  # a non-JSON body is the image itself
        f"/v1/models/{CLASSIFIER}:predict", content=image, headers={"content-type": "image/png"}
    )
    assert raw.status_code == 200, raw.text
    torch.testing.assert_close(
        json_heatmap(raw.json()["predictions"][0]),
        reference(pipeline, CLASSIFIER, image),
        atol=ATOL,
        rtol=0,
    )


# -- REST v2
def v2_body(*images: bytes, outputs=None, **parameters) -> dict:
    body: dict = {
        "inputs": [
            {
                "name": "image",
                "shape": [len(images)],
                "datatype": "BYTES",
                "data": [b64(i) for i in images],
            }
        ]
    }
    if parameters:
        body["parameters"] = parameters
    if outputs:
        body["outputs"] = [{"name": name} for name in outputs]
    return body


def v2_outputs(response: httpx.Response) -> dict[str, dict]:
    assert response.status_code == 200, response.text
    return {output["name"]: output for output in response.json()["outputs"]}


def test_v2_infer_named_outputs(client, pipeline) -> None:
    images = (png_bytes(4), png_bytes(5))
    outputs = v2_outputs(
        client.post(f"/v2/models/{CLASSIFIER}/infer", json=v2_body(*images, method="gradcam"))
    )
    assert sorted(outputs) == ["embedding", "heatmap", "label", "scores"]
    heatmap = outputs["heatmap"]
    assert heatmap["datatype"] == "FP32" and heatmap["shape"] == [2, 84, 84]  # JSON has no FP16
    assert heatmap["parameters"]["method"] == "gradcam"
    values = torch.tensor(heatmap["data"], dtype=torch.float32).reshape(2, 84, 84)
    for index, image in enumerate(images):
        expected = reference(pipeline, CLASSIFIER, image, method="gradcam")
        torch.testing.assert_close(values[index], expected, atol=ATOL, rtol=0)
    assert outputs["scores"]["shape"] == [2, 5]
    result = pipeline.explain(ExplainRequest(CLASSIFIER, (EncodedImage(images[0]),))).results[0]
    assert outputs["label"]["data"][0] == result.prediction.label
    np.testing.assert_allclose(outputs["scores"]["data"][:5], result.scores, atol=1e-5)


def test_v2_requested_outputs_feature_resolution_and_embedding_model(client, pipeline) -> None:
    image = png_bytes(6)
    body = v2_body(image, outputs=["heatmap"], resolution="feature")
    outputs = v2_outputs(client.post(f"/v2/models/{EMBEDDING}/infer", json=body))
    assert list(outputs) == ["heatmap"]
    expected = reference(pipeline, EMBEDDING, image, resolution="feature")
    assert outputs["heatmap"]["shape"] == [1, *expected.shape]
    values = torch.tensor(outputs["heatmap"]["data"]).reshape(expected.shape)
    torch.testing.assert_close(values, expected, atol=ATOL, rtol=0)


def test_v2_uint8_pixels(client, pipeline) -> None:
    pixels = torch.randint(0, 256, (3, 84, 84), generator=torch.Generator().manual_seed(9))
    values = pixels.to(torch.uint8)
    body = {
        "inputs": [
            {
                "name": "p",
                "shape": [1, 3, 84, 84],
                "datatype": "UINT8",
                "data": values.flatten().tolist(),
            }
        ],
        "outputs": [{"name": "heatmap"}],
    }
    outputs = v2_outputs(client.post(f"/v2/models/{CLASSIFIER}/infer", json=body))
    raw = RawTensor(values.numpy().tobytes(), "uint8", (3, 84, 84))
    result = pipeline.explain(ExplainRequest(CLASSIFIER, (raw,))).results[0]
    expected = heatmap_from_bytes(result.heatmap.data, result.heatmap.shape)
    got = torch.tensor(outputs["heatmap"]["data"]).reshape(expected.shape)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_v2_binary_outputs_carry_the_float16_heatmap(client, pipeline) -> None:
    image = png_bytes(7)
    body = v2_body(image, outputs=["heatmap"], binary_data_output=True)
    response = client.post(f"/v2/models/{CLASSIFIER}/infer", json=body)
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:length])
    (output,) = header["outputs"]
    assert output["datatype"] == "FP16" and output["shape"] == [1, 84, 84]
    raw = response.content[length:]
    assert len(raw) == output["parameters"]["binary_data_size"] == 2 * 84 * 84
    torch.testing.assert_close(
        heatmap_from_bytes(raw, (84, 84)), reference(pipeline, CLASSIFIER, image), atol=ATOL, rtol=0
    )


# -- gRPC v2
def test_grpc_v2_with_tritonclient(server, pipeline, tmp_path) -> None:
    image = png_bytes(8)
    path = tmp_path / "image.png"
    path.write_bytes(image)
    report = oip_client_report("kserve", server[1], str(path), timeout=300)
    assert report["live"] and report["ready"] and report["model_ready"]
    for model, method in ((CLASSIFIER, "gradcam"), (EMBEDDING, None)):
        got = report[model]
        assert got["heatmap_dtype"] == "float16" and got["heatmap_shape"] == [2, 84, 84]
        heatmaps = heatmap_from_bytes(base64.b64decode(got["heatmap"]), (2, 84, 84))
        expected = reference(pipeline, model, image, method=method)
        torch.testing.assert_close(heatmaps[0], expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(heatmaps[1], expected, atol=ATOL, rtol=0)
        assert got["method"] == (method or pipeline.registry.get(model).default_method)
    errors = report["errors"]
    assert errors["corrupt"].startswith("StatusCode.INVALID_ARGUMENT"), errors
    assert errors["unknown_method"].startswith("StatusCode.INVALID_ARGUMENT"), errors
    assert errors["too_many"].startswith("StatusCode.RESOURCE_EXHAUSTED"), errors
    # over KServe's default 8 MiB message limit, under the request limit: reaches the pipeline
    assert errors["large_corrupt"].startswith("StatusCode.INVALID_ARGUMENT"), errors
    assert errors["unknown_model"].startswith("StatusCode.NOT_FOUND"), errors
    assert report["after_errors"] == report[CLASSIFIER]["label"][0]


# -- bad requests
BAD_REQUESTS = [
    ("v1 not base64", f"/v1/models/{CLASSIFIER}:explain", {"instances": ["%%"]}, 400),
    ("v1 corrupt image", f"/v1/models/{CLASSIFIER}:explain", {"instances": ["AAAA"]}, 400),
    ("v1 no instances", f"/v1/models/{CLASSIFIER}:predict", {"images": []}, 400),
    ("v1 empty instances", f"/v1/models/{CLASSIFIER}:predict", {"instances": []}, 400),
    ("v1 list body", f"/v1/models/{CLASSIFIER}:predict", [1, 2], 400),
    (
        "v1 unknown option",
        f"/v1/models/{CLASSIFIER}:predict",
        {"instances": ["AAAA"], "parameters": {"x": 1}},
        400,
    ),  # noqa: E501
    (
        "v1 unknown method",
        f"/v1/models/{CLASSIFIER}:explain",
        {"instances": [b64(png_bytes(0))], "parameters": {"method": "nope"}},
        400,
    ),  # noqa: E501
    (
        "v1 target class",
        f"/v1/models/{CLASSIFIER}:explain",
        {"instances": [b64(png_bytes(0))], "parameters": {"target_class": 99}},
        400,
    ),  # noqa: E501
    ("v1 too many images", f"/v1/models/{CLASSIFIER}:predict", {"instances": ["AAAA"] * 65}, 413),
    ("v1 unknown model", "/v1/models/nope:predict", {"instances": ["AAAA"]}, 404),
    (
        "v2 not base64",
        f"/v2/models/{CLASSIFIER}/infer",
        {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%"]}]},
        400,
    ),  # noqa: E501
    (
        "v2 shape mismatch",
        f"/v2/models/{CLASSIFIER}/infer",
        {
            "inputs": [
                {"name": "image", "shape": [2], "datatype": "BYTES", "data": [b64(png_bytes(0))]}
            ]
        },
        400,
    ),  # noqa: E501
    (
        "v2 pixels shape",
        f"/v2/models/{CLASSIFIER}/infer",
        {"inputs": [{"name": "p", "shape": [1, 4], "datatype": "UINT8", "data": [1, 2, 3, 4]}]},
        400,
    ),  # noqa: E501
    (
        "v2 unknown output",
        f"/v2/models/{CLASSIFIER}/infer",
        {**v2_body(png_bytes(0)), "outputs": [{"name": "x"}]},
        400,
    ),  # noqa: E501
    (
        "v2 bad resolution",
        f"/v2/models/{CLASSIFIER}/infer",
        v2_body(png_bytes(0), resolution="huge"),
        400,
    ),  # noqa: E501
    (
        "v2 unknown method",
        f"/v2/models/{CLASSIFIER}/infer",
        v2_body(png_bytes(0), method="gradcamm"),
        400,
    ),
    ("v2 too many images", f"/v2/models/{CLASSIFIER}/infer", v2_body(*[b"x"] * 65), 413),
    ("v2 not json", f"/v2/models/{CLASSIFIER}/infer", b"{nope", 422),
]


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[c[0] for c in BAD_REQUESTS],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(client, path, body, status) -> None:
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json().get("error") or response.json().get("detail")
    good = client.post(f"/v1/models/{CLASSIFIER}:predict", json={"instances": [b64(png_bytes(0))]})
    assert good.status_code == 200, good.text


def test_oversized_body_is_refused_before_it_is_read(server) -> None:
    """A Content-Length over the limit (base64 of 32 MiB plus 1 MiB) answers 413 at once,
    before the body is sent."""
    host, port = server[0].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST /v1/models/{CLASSIFIER}:predict HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {64 << 20}\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split()[1] == b"413", answer[:300]
    assert json.loads(body)["code"] == "RESOURCE_EXHAUSTED"


# -- import cost, CLI, doctest
def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )


def test_fam_core_does_not_import_kserve() -> None:
    run = run_python(
        "import sys, fam_core, fam_core.cli, fam_core.pipeline, fam_core.commands.serve\n"
        "import fam_core.server\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kserve', 'fastapi')))"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_kserve_model_doctest() -> None:
    run = run_python(
        "import doctest, fam_core.server.kserve_model as m\n"
        "r = doctest.testmod(m)\nprint(r.attempted, r.failed)"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    attempted, failed = map(int, run.stdout.split()[-2:])
    assert attempted >= 3 and failed == 0, run.stdout


@pytest.mark.parametrize(
    "options",
    [
        ["--token-file", "t"],
        ["--tls-cert", "c", "--tls-key", "k"],
        ["--port", "9", "--grpc-port", "9"],
        ["--metrics-port", "0"],
    ],
)
def test_cli_refuses_options_kserve_does_not_take(options) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "fam_core", "serve", "--engine", "kserve", *options],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert options[0] in run.stderr


# -- deployment files
def test_inference_service_manifest() -> None:
    manifest = yaml.safe_load((DEPLOY / "inferenceservice.yaml").read_text())
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1"
    assert manifest["kind"] == "InferenceService"
    assert manifest["metadata"]["name"]
    predictor = manifest["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container" and container["image"]
    args = build_parser().parse_args(container["args"])  # the args fam serve takes
    assert args.engine == "kserve" and args.models == "/mnt/models"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http1": int(args.port), "h2c": int(args.grpc_port)}
    for probe, path in (
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": ports["http1"]}
        assert container[probe]["periodSeconds"] > container[probe]["timeoutSeconds"] > 0
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind])
    env = {item["name"]: item["value"] for item in container["env"]}
    store = env.get("STORAGE_URI") or predictor.get("model", {}).get("storageUri")
    assert store and store.split("://")[0] in ("pvc", "s3", "gs", "https", "hdfs")
    if store.startswith("pvc://"):
        claim = yaml.safe_load((DEPLOY / "pvc.yaml").read_text())
        assert claim["kind"] == "PersistentVolumeClaim"
        assert store.removeprefix("pvc://").split("/")[0] == claim["metadata"]["name"]
        assert claim["spec"]["resources"]["requests"]["storage"]


def test_dockerfile_runs_the_kserve_engine() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    instructions = [line for line in lines if line and not line.startswith((" ", "#"))]
    assert instructions[0].startswith("ARG BASE_IMAGE=") and "FROM ${BASE_IMAGE}" in instructions
    exposed = next(line for line in instructions if line.startswith("EXPOSE")).split()[1:]
    entrypoint = json.loads(next(i for i in instructions if i.startswith("ENTRYPOINT"))[10:])
    command = json.loads(next(i for i in instructions if i.startswith("CMD"))[3:])
    assert entrypoint == ["fam"]
    args = build_parser().parse_args(command)
    assert args.engine == "kserve" and sorted(exposed) == sorted(
        [str(args.port), str(args.grpc_port)]
    )
    assert any('".[kserve]"' in line for line in lines), "installs the kserve extra"
    assert any("TORCH_INDEX=https://download.pytorch.org/whl/cu" in line for line in lines), (
        "documents the CUDA variant"
    )
    assert "USER 1000" in instructions
    assert shlex.split(" ".join(command))  # well-formed


def test_this_process_never_imports_kserve() -> None:
    """kserve's stubs and fam's cannot share a process: the suite imports neither kserve nor
    tritonclient (they run in subprocesses)."""
    assert not {"kserve", "tritonclient"} & {name.split(".")[0] for name in sys.modules}
