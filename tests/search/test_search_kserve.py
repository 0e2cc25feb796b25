"""Explained search on the KServe model server: REST v2 (JSON and binary) and gRPC v2 (read
by tritonclient) return the neighbours and maps ``explained_search`` finds in the same
gallery; a model whose index cannot be reached is not ready while the others serve.

The server runs in a subprocess (see ``test_kserve.py``) with its own copy of the index,
built in a subprocess: one process opens a Milvus Lite file at a time, and keeps it.
"""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from search_helpers import (
    PLAIN_MODEL,
    SEARCH_MODEL,
    build_index,
    build_index_elsewhere,
    make_gallery,
    write_model,
)
from serving_helpers import free_port, kserve_server, oip_client_report

from fam_core.pipeline import ServedModel
from fam_core.pipeline.encode import heatmap_from_bytes
from fam_core.pipeline.explained_search import explained_search, load_uri_image
from fam_core.search import open_index

if importlib.util.find_spec("kserve") is None:  # found, never imported: see test_kserve.py
    pytest.skip("needs the kserve extra", allow_module_level=True)

UNREACHABLE_MODEL = "unreachable-embedding"
MAP_ATOL = 2e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The gallery, the served models' folder and the expected answer's own index."""
    root = tmp_path_factory.mktemp("search-kserve")
    gallery = make_gallery(root)
    built = write_model(root / "build", SEARCH_MODEL)
    models = root / "models"
    build_index_elsewhere(gallery, built, str(root / "served.db"))
    build_index(gallery, built, str(root / "expected.db"))
    write_model(models, SEARCH_MODEL, index="../../served.db", top_k=3, explain="query")
    write_model(models, PLAIN_MODEL)
    write_model(models, UNREACHABLE_MODEL, index=f"http://127.0.0.1:{free_port()}")
    return gallery, built, models, root / "expected.db"


@pytest.fixture(scope="module")
def expected(setup):
    """``explained_search`` of some images in the expected index, by explain mode."""
    gallery, built, _, uri = setup
    served = ServedModel.load(built)
    index = open_index(str(uri))
    paths = [gallery.path(gallery.ids[4]), gallery.queries[0]]

    def search(explain: str, top_k: int = 3):
        inputs = torch.stack([load_uri_image(served, str(path)) for path in paths])
        return explained_search(served, index, inputs, top_k=top_k, explain=explain)

    yield paths, search
    index.close()


@pytest.fixture(scope="module")
def server(setup, tmp_path_factory):
    with kserve_server(setup[2], tmp_path_factory.mktemp("log") / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0], timeout=120) as client:
        yield client


def v2_body(paths: list[Path], outputs=None, **parameters) -> dict:
    body: dict = {
        "inputs": [
            {
                "name": "image",
                "shape": [len(paths)],
                "datatype": "BYTES",
                "data": [base64.b64encode(p.read_bytes()).decode() for p in paths],
            }
        ],
        "parameters": parameters,
    }
    if outputs:
        body["outputs"] = [{"name": name} for name in outputs]
    return body


def test_rest_v2_search_matches_explained_search(client, expected) -> None:
    paths, search = expected
    response = client.post(f"/v2/models/{SEARCH_MODEL}/infer", json=v2_body(paths))
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert list(outputs) == ["neighbour_ids", "neighbour_scores", "neighbour_labels", "heatmaps"]
    want = search("query")  # the config's explain and top_k
    ids = outputs["neighbour_ids"]
    assert ids["datatype"] == "BYTES" and ids["shape"] == [2, 3]
    assert ids["data"] == [e.neighbour.id for row in want for e in row]
    assert outputs["neighbour_labels"]["data"] == [e.neighbour.label for row in want for e in row]
    scores = outputs["neighbour_scores"]
    assert scores["datatype"] == "FP32" and scores["shape"] == [2, 3]
    np.testing.assert_allclose(
        scores["data"], [e.neighbour.score for row in want for e in row], atol=1e-5
    )
    maps = outputs["heatmaps"]
    assert maps["datatype"] == "FP32" and maps["shape"] == [2, 3, 84, 84]  # JSON has no FP16
    values = torch.tensor(maps["data"]).reshape(2, 3, 84, 84)
    for q, row in enumerate(want):
        for j, item in enumerate(row):
            torch.testing.assert_close(values[q, j], item.query_map, atol=MAP_ATOL, rtol=0)


def test_rest_v2_binary_maps_are_float16(client, expected) -> None:
    paths, search = expected
    body = v2_body(paths[:1], outputs=["heatmaps"], binary_data_output=True, explain="both")
    response = client.post(f"/v2/models/{SEARCH_MODEL}/infer", json=body)
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    (output,) = json.loads(response.content[:length])["outputs"]
    assert output["datatype"] == "FP16" and output["shape"] == [1, 3, 84, 84]
    maps = heatmap_from_bytes(response.content[length:], (3, 84, 84))
    for j, item in enumerate(search("both")[0]):
        torch.testing.assert_close(maps[j], item.query_map, atol=MAP_ATOL, rtol=0)


def test_metadata_documents_the_search_outputs(client) -> None:
    metadata = client.get(f"/v2/models/{SEARCH_MODEL}").json()
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]}
    assert outputs["neighbour_ids"] == ("BYTES", [-1, -1])
    assert outputs["neighbour_scores"] == ("FP32", [-1, -1])
    assert outputs["heatmaps"] == ("FP16", [-1, -1, -1, -1])
    plain = client.get(f"/v2/models/{PLAIN_MODEL}").json()
    assert "neighbour_ids" not in {o["name"] for o in plain["outputs"]}


@pytest.mark.parametrize(
    ("model", "parameters", "outputs", "status", "text"),
    [
        (SEARCH_MODEL, {"top_k": 0}, None, 400, "top_k"),
        (SEARCH_MODEL, {"top_k": 101}, None, 400, "top_k"),
        (SEARCH_MODEL, {"explain": "maybe"}, None, 400, "explain"),
        (SEARCH_MODEL, {"filter": "label =="}, None, 400, "filter"),
        (SEARCH_MODEL, {"ef": 16}, None, 400, "FLAT index: unknown search parameter 'ef'"),
        (SEARCH_MODEL, {"nprobe": "many"}, None, 400, "parameter 'nprobe' must be an integer"),
        (SEARCH_MODEL, {"explain": "none"}, ["heatmaps"], 400, "heatmaps"),
        (PLAIN_MODEL, {}, ["neighbour_ids"], 400, "has no index"),
        (UNREACHABLE_MODEL, {}, None, 503, "not ready"),
    ],
)
def test_rest_v2_bad_searches(client, expected, model, parameters, outputs, status, text) -> None:
    body = v2_body(expected[0][:1], outputs=outputs, **parameters)
    response = client.post(f"/v2/models/{model}/infer", json=body)
    assert response.status_code == status, response.text
    assert text in response.json()["error"]
    again = client.post(f"/v2/models/{SEARCH_MODEL}/infer", json=v2_body(expected[0][:1]))
    assert again.status_code == 200


def test_an_unreachable_index_is_not_ready_and_the_others_serve(client, server) -> None:
    assert client.get(f"/v2/models/{UNREACHABLE_MODEL}/ready").status_code == 503
    assert client.get(f"/v2/models/{SEARCH_MODEL}/ready").json()["ready"] is True
    assert client.get(f"/v2/models/{PLAIN_MODEL}/ready").json()["ready"] is True


def test_grpc_v2_with_tritonclient(server, expected) -> None:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient[grpc] is not installed")
    paths, search = expected
    report = oip_client_report(
        "search", server[1], SEARCH_MODEL, PLAIN_MODEL, *map(str, paths), timeout=180
    )
    want = search("both")
    assert report["neighbour_ids"] == [[e.neighbour.id for e in row] for row in want]
    scores = np.frombuffer(base64.b64decode(report["neighbour_scores"]["data"]), dtype="<f4")
    np.testing.assert_allclose(scores, [e.neighbour.score for row in want for e in row], atol=1e-5)
    maps = np.frombuffer(base64.b64decode(report["reference_heatmaps"]["data"]), dtype="<f2")
    expected_maps = np.stack([e.reference_map.numpy() for row in want for e in row])
    np.testing.assert_allclose(
        maps.reshape(expected_maps.shape).astype(np.float32), expected_maps, atol=MAP_ATOL
    )
    errors = report["errors"]
    assert errors["top_k"].startswith("StatusCode.INVALID_ARGUMENT")
    assert errors["no_index"].startswith("StatusCode.FAILED_PRECONDITION")
