"""The Open Inference Protocol driven by tritonclient.grpc, a real client, in its own process."""

from __future__ import annotations

import base64
import importlib.util

import numpy as np
import pytest
import torch
from serving_helpers import CLASSES, make_model_dir, oip_client_report, png_bytes

from fam_core.pipeline import EncodedImage, ExplainRequest, ModelRegistry, Pipeline
from fam_core.server import FamServer, ServerConfig

if importlib.util.find_spec("tritonclient") is None:  # found, not imported: see oip_client.py
    pytest.skip("tritonclient[grpc] is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("oip")
    registry = ModelRegistry.from_directory(make_model_dir(root / "models"))
    image = root / "image.png"
    image.write_bytes(png_bytes(21))
    with FamServer(registry, ServerConfig(port=0)) as server:
        got = oip_client_report("fam", f"127.0.0.1:{server.port}", str(image), timeout=120)
    expected = Pipeline(registry, batching=None)
    request = {
        name: expected.explain(ExplainRequest(name, (EncodedImage(image.read_bytes()),) * 2))
        for name in ("default-classifier", "default-embedding")
    }
    return got, request


def test_server_and_model_state(report) -> None:
    got, _ = report
    assert got["live"] and got["ready"] and got["model_ready"] and not got["unknown_ready"]
    assert got["server"]["name"] == "fam-core"
    metadata = got["metadata"]
    assert metadata["name"] == "default-embedding" and metadata["versions"] == ["1"]
    assert [i["name"] for i in metadata["inputs"]] == ["image"]
    assert {o["name"]: o["datatype"] for o in metadata["outputs"]} == {
        "scores": "FP32", "label": "BYTES", "embedding": "FP32", "heatmap": "FP16",
    }  # fmt: skip


@pytest.mark.parametrize("model", ["default-classifier", "default-embedding"])
def test_infer_outputs_match_the_pipeline(report, model) -> None:
    got, expected = report
    answer, want = got[model], expected[model].results
    assert answer["label"] == [r.prediction.label for r in want]
    assert all(label in CLASSES for label in answer["label"])
    assert np.allclose(answer["scores"], [r.scores for r in want], atol=1e-5)
    assert answer["embedding_shape"] == [2, 5 if model == "default-classifier" else 64]
    assert answer["heatmap_dtype"] == "float16" and answer["heatmap_shape"] == [2, 84, 84]
    heatmap = np.frombuffer(base64.b64decode(answer["heatmap"]), dtype="<f2").reshape(2, 84, 84)
    for i, result in enumerate(want):
        assert heatmap[i].tobytes() == result.heatmap.data  # same bytes as the fam.v1 path
    method = "cam" if model == "default-classifier" else "fam"  # each model's default method
    assert answer["parameters"]["heatmap"] == {"method": method, "target_layer": "block4"}
    assert float(torch.tensor(heatmap[0].astype(np.float32)).max()) == 1.0


def test_requested_outputs_and_parameters(report) -> None:
    got, _ = report
    assert got["feature_outputs"] == ["heatmap"]
    assert got["feature_heatmap_shape"] == [1, 5, 5]


def test_errors_carry_status_codes(report) -> None:
    errors = report[0]["errors"]
    assert errors["unknown_model"].startswith("StatusCode.NOT_FOUND")
    assert "unknown model 'nope'" in errors["unknown_model"]
    assert errors["corrupt"].startswith("StatusCode.INVALID_ARGUMENT")
    assert "cannot decode" in errors["corrupt"]
    assert errors["unknown_method"].startswith("StatusCode.INVALID_ARGUMENT")
    assert "unknown method 'gradcm' (did you mean 'gradcam'?)" in errors["unknown_method"]


def test_method_names_match_ignoring_case(report) -> None:
    assert report[0]["method_any_case"]["method"] == "gradcam"
