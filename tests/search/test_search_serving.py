"""Explained search served: fam.v1 ``Search`` and the Open Inference Protocol over our gRPC
server, against ``explained_search`` called directly on the same index.

A tiny index of the embedded benchmark's flowers is built in a temporary folder with the
default embedding model; the server serves it as ``gallery-embedding``, a kNN classifier
over it as ``gallery-knn``, the same model without an index as ``plain-embedding``, and a
model whose index cannot be reached.
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path
from types import SimpleNamespace as Fake

import grpc
import numpy as np
import pytest
import torch
from search_helpers import (
    KNN_MODEL,
    PER_CLASS,
    PLAIN_MODEL,
    SEARCH_MODEL,
    build_index,
    make_gallery,
    write_model,
)
from serving_helpers import free_port, oip_client_report, running_server

from fam_core.pipeline import (
    EncodedImage,
    InvalidArgument,
    Limits,
    ModelRegistry,
    Pipeline,
    ResourceExhausted,
    SearchRequest,
    ServedModel,
)
from fam_core.pipeline.encode import heatmap_from_bytes
from fam_core.pipeline.errors import FailedPrecondition
from fam_core.pipeline.explained_search import embed, explained_search
from fam_core.pipeline.oip_codec import (
    OUTPUTS,
    answer_infer,
    pack_bytes,
    search_request_from_infer,
    unpack_bytes,
)
from fam_core.pipeline.search import check_search_params
from fam_core.search.knn import KNN_TARGET_COUNT
from fam_core.server import ServerConfig
from fam_core.server.stubs import fam_pb2
from fam_core.server.stubs import grpc_service_pb2 as oip_pb
from fam_core.tasks.knn import knn_predict, neighbour_targets

TIMEOUT = 60
SCORE_ATOL = 1e-5
MAP_ATOL = 2e-3  # float16 maps in [0, 1]
UNREACHABLE_MODEL = "unreachable-embedding"
HNSW_MODEL = "gallery-hnsw"
KNN_K = 4


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    return make_gallery(tmp_path_factory.mktemp("search-gallery"))


@pytest.fixture(scope="module")
def models(tmp_path_factory, gallery) -> Path:
    folder = tmp_path_factory.mktemp("search-models")
    index = folder / "gallery.db"
    build_index(gallery, write_model(folder / "build", SEARCH_MODEL), str(index), extra_rows=1)
    write_model(folder, SEARCH_MODEL, index="../gallery.db", top_k=4, explain="query")
    hnsw = folder / "gallery-hnsw.db"
    build_index(
        gallery, write_model(folder / "build", HNSW_MODEL), str(hnsw), index_type="HNSW",
        index_params={"M": 8, "efConstruction": 32},
    )  # fmt: skip
    write_model(folder, HNSW_MODEL, index="../gallery-hnsw.db")
    write_model(folder, PLAIN_MODEL)
    write_model(
        folder, KNN_MODEL, task="knn", index="../gallery.db", k=KNN_K, prototypes=None,
        class_names=[],
    )  # fmt: skip
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens on that port
    write_model(folder, UNREACHABLE_MODEL, index=nowhere)
    return folder


@pytest.fixture(scope="module")
def server(models):
    registry = ModelRegistry.from_directory(models, keep_going=True)
    with running_server(registry, ServerConfig(port=0, health_port=None)) as server:
        yield server


@pytest.fixture(scope="module")
def direct(server):
    """``explained_search`` on the served model and its index, with the server's inputs."""
    pipeline: Pipeline = server.pipeline
    served = pipeline.registry.get(SEARCH_MODEL)

    def search(paths: list[Path], **options):
        images = tuple(EncodedImage(path.read_bytes()) for path in paths)
        pixels = pipeline.pixels(SEARCH_MODEL, images)
        return explained_search(served, served.index, served.config.normalize(pixels), **options)

    return search


def search_request(paths: list[Path], **fields) -> fam_pb2.SearchRequest:
    images = [fam_pb2.Image(encoded=path.read_bytes()) for path in paths]
    return fam_pb2.SearchRequest(model=fields.pop("model", SEARCH_MODEL), images=images, **fields)


def proto_map(heatmap: fam_pb2.Heatmap) -> torch.Tensor:
    assert heatmap.dtype == "float16"
    return heatmap_from_bytes(heatmap.data, tuple(heatmap.shape))


def assert_same_results(results, expected) -> None:
    """fam.v1 ``SearchResult`` s equal to ``explained_search``'s answer."""
    assert len(results) == len(expected)
    for result, want in zip(results, expected, strict=True):
        assert [n.id for n in result.neighbours] == [e.neighbour.id for e in want]
        assert [n.uri for n in result.neighbours] == [e.neighbour.uri for e in want]
        got_scores = [n.score for n in result.neighbours]
        assert np.allclose(got_scores, [e.neighbour.score for e in want], atol=SCORE_ATOL)
        for neighbour, item in zip(result.neighbours, want, strict=True):
            label = neighbour.label if neighbour.HasField("label") else None
            assert label == item.neighbour.label
            for field, values in (
                ("query_map", item.query_map),
                ("reference_map", item.reference_map),
            ):
                if values is None:
                    assert not neighbour.HasField(field)
                else:
                    assert torch.allclose(
                        proto_map(getattr(neighbour, field)), values, atol=MAP_ATOL
                    )
            assert (neighbour.reference_error or None) == item.reference_error


# -- fam.v1 Search
def test_search_both_maps_match_explained_search(stub, direct, gallery) -> None:
    paths = [gallery.path(gallery.ids[0]), gallery.queries[1]]
    response = stub.Search(
        search_request(paths, top_k=3, explain="both", request_id="r1"), timeout=TIMEOUT
    )
    assert response.model == SEARCH_MODEL and response.request_id == "r1"
    assert response.explain == "both" and response.method == "fam"
    assert_same_results(response.results, direct(paths, top_k=3, explain="both"))
    first = response.results[0].neighbours
    # a gallery image finds itself (or the row holding a copy of its embedding) first, score 1
    assert {first[0].id, first[1].id} == {gallery.ids[0], "gone-0.png"}
    assert first[0].score == pytest.approx(1.0, abs=SCORE_ATOL)
    heatmap = first[0].query_map
    assert list(heatmap.shape) == [84, 84] and heatmap.target_layer == "block4"


def test_an_unreadable_neighbour_keeps_its_score_and_says_why(stub, gallery) -> None:
    paths = [gallery.path(gallery.ids[0])]
    response = stub.Search(search_request(paths, top_k=3, explain="both"), timeout=TIMEOUT)
    by_id = {n.id: n for n in response.results[0].neighbours}
    gone = by_id["gone-0.png"]
    assert not gone.HasField("reference_map") and gone.reference_error
    assert not gone.HasField("label") and gone.HasField("query_map")
    assert gone.score == pytest.approx(1.0, abs=SCORE_ATOL)
    assert by_id[gallery.ids[0]].HasField("reference_map")


def test_config_defaults_and_filter(stub, direct, gallery) -> None:
    paths = [gallery.queries[0]]
    response = stub.Search(search_request(paths), timeout=TIMEOUT)  # top_k 4, explain query
    assert response.explain == "query"
    assert_same_results(response.results, direct(paths, top_k=4, explain="query"))
    label = gallery.labels[-1]
    expression = f'label == "{label}"'
    filtered = stub.Search(
        search_request(paths, top_k=10, explain="none", filter=expression), timeout=TIMEOUT
    )
    neighbours = filtered.results[0].neighbours
    assert [n.label for n in neighbours] == [label] * gallery.labels.count(label)
    assert not any(n.HasField("query_map") for n in neighbours) and filtered.method == ""
    assert_same_results(
        filtered.results, direct(paths, top_k=10, explain="none", filter=expression)
    )


def test_model_info_and_list_models(stub) -> None:
    info = stub.ModelInfo(fam_pb2.ModelInfoRequest(model=SEARCH_MODEL), timeout=TIMEOUT)
    assert info.index.endswith("gallery.db") and info.top_k == 4 and info.explain == "query"
    assert info.max_top_k == 100
    assert (info.index_type, dict(info.search_params)) == ("FLAT", {})
    assert info.max_search_ef == 4096
    hnsw = stub.ModelInfo(fam_pb2.ModelInfoRequest(model=HNSW_MODEL), timeout=TIMEOUT)
    assert (hnsw.index_type, dict(hnsw.search_params)) == ("HNSW", {"ef": 64})
    plain = stub.ModelInfo(fam_pb2.ModelInfoRequest(model=PLAIN_MODEL), timeout=TIMEOUT)
    assert (plain.index, plain.index_type, dict(plain.search_params)) == ("", "", {})
    listed = {m.name: m for m in stub.ListModels(fam_pb2.ListModelsRequest()).models}
    assert listed[SEARCH_MODEL].status == "ready" and listed[PLAIN_MODEL].status == "ready"
    assert listed[UNREACHABLE_MODEL].status == "failed"


BAD_SEARCHES = {
    "top_k over the limit": ({"top_k": 101}, grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    "unknown explain mode": ({"explain": "maybe"}, grpc.StatusCode.INVALID_ARGUMENT, "explain"),
    "unparsable filter": ({"filter": "label =="}, grpc.StatusCode.INVALID_ARGUMENT, "filter"),
    "filter too long": (
        {"filter": "label == 'a'" + " or label == 'a'" * 400},
        grpc.StatusCode.INVALID_ARGUMENT,
        "filter",
    ),
    "unknown method": ({"method": "nope"}, grpc.StatusCode.NOT_FOUND, "nope"),
    "no images": ({"images": []}, grpc.StatusCode.INVALID_ARGUMENT, "no images"),
    "model without an index": (
        {"model": PLAIN_MODEL},
        grpc.StatusCode.FAILED_PRECONDITION,
        "has no index",
    ),
    "unknown model": ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "unknown model"),
    "a search parameter of another index type": (
        {"search_params": {"ef": 16}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "search_params: FLAT index: unknown search parameter 'ef' (allowed: none)",
    ),
    "nprobe on an HNSW index": (
        {"model": HNSW_MODEL, "search_params": {"nprobe": 4}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "HNSW index: unknown search parameter 'nprobe' (allowed: ef)",
    ),
    "ef over the limit": (
        {"model": HNSW_MODEL, "search_params": {"ef": 4097}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "ef must be at most 4096 (the server's limit), got 4097",
    ),
    "ef of zero": (
        {"model": HNSW_MODEL, "search_params": {"ef": 0}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "ef must be an int in [1, ",
    ),
    "index unreachable at start-up": (
        {"model": UNREACHABLE_MODEL},
        grpc.StatusCode.UNAVAILABLE,
        "failed to load",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SEARCHES))
def test_bad_searches_get_their_status(stub, gallery, case) -> None:
    fields, code, text = BAD_SEARCHES[case]
    request = search_request([gallery.queries[0]], model=fields.pop("model", SEARCH_MODEL))
    for name, value in fields.items():
        if name == "images":
            del request.images[:]
        elif name == "search_params":
            request.search_params.update(value)
        else:
            setattr(request, name, value)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Search(request, timeout=TIMEOUT)
    assert caught.value.code() == code
    assert text in caught.value.details() and "\n" not in caught.value.details()
    assert len(stub.Search(search_request([gallery.queries[0]]), timeout=TIMEOUT).results) == 1


def test_maps_over_the_answer_limit_are_refused_before_the_work(server, gallery) -> None:
    image = (EncodedImage(gallery.queries[0].read_bytes()),)
    pipeline = Pipeline(server.pipeline.registry, Limits(max_request_bytes=100_000), batching=None)
    try:
        with pytest.raises(ResourceExhausted, match="smaller top_k"):  # 5 x 84 x 84 x 2 bytes
            pipeline.search(SearchRequest(SEARCH_MODEL, image, top_k=5, explain="both"))
        found = pipeline.search(SearchRequest(SEARCH_MODEL, image, top_k=5, explain="query"))
        assert len(found.results[0].neighbours) == 5
    finally:
        pipeline.close()


def test_a_served_model_opens_its_index_at_load(models, tmp_path) -> None:
    assert ServedModel.load(models / SEARCH_MODEL, open_index=False).index is None
    missing = write_model(tmp_path, "missing-index", index="nothing-here.db")
    with pytest.raises(ValueError, match=r"^model 'missing-index': index: .*holds no gallery"):
        ServedModel.load(missing)
    assert ServedModel.load(missing, open_index=False).config.index == "nothing-here.db"


def test_an_unreachable_index_fails_only_its_model(server) -> None:
    registry = server.pipeline.registry
    (failed,) = registry.failed()
    assert failed.name == UNREACHABLE_MODEL and "\n" not in failed.reason
    assert set(registry.names()) == {SEARCH_MODEL, PLAIN_MODEL, KNN_MODEL, HNSW_MODEL}


def test_a_request_searches_with_its_own_search_parameters(stub, server, gallery, monkeypatch):
    """The request's ``ef`` reaches the index (fam.v1 and OIP), a request without one
    searches with the config's; on nine rows every ``ef`` finds the same neighbours."""
    served = server.pipeline.registry.get(HNSW_MODEL)
    asked: list[dict | None] = []
    search = served.index.search

    def recorded(embeddings, top_k, filter=None, search_params=None):  # noqa: A002
        asked.append(search_params)
        return search(embeddings, top_k, filter, search_params)

    monkeypatch.setattr(served.index, "search", recorded)
    paths = [gallery.queries[0]]
    request = search_request(paths, model=HNSW_MODEL, top_k=5, explain="none")
    plain = stub.Search(request, timeout=TIMEOUT)
    request.search_params["ef"] = 16
    tuned = stub.Search(request, timeout=TIMEOUT)
    message = oip_pb.ModelInferRequest(model_name=HNSW_MODEL)
    message.inputs.add(name="image", datatype="BYTES", shape=[1])
    message.raw_input_contents.append(pack_bytes([paths[0].read_bytes()]))
    message.parameters["top_k"].int64_param = 5
    message.parameters["explain"].string_param = "none"
    message.parameters["ef"].int64_param = 32
    answer = answer_infer(server.pipeline, message, "1", oip_pb.ModelInferResponse)
    assert asked == [None, {"ef": 16}, {"ef": 32}]
    ids = [n.id for n in plain.results[0].neighbours]
    assert len(ids) == 5 and [n.id for n in tuned.results[0].neighbours] == ids
    assert [i.decode() for i in unpack_bytes(answer.raw_output_contents[0])] == ids


# -- a kNN classifier over the index
def test_a_knn_model_explains_its_vote_and_searches(stub, server, direct, gallery) -> None:
    pipeline: Pipeline = server.pipeline
    served = pipeline.registry.get(KNN_MODEL)
    classes = served.labels
    assert classes == tuple(sorted(set(gallery.labels)))
    rows = served.index.get(list(gallery.ids))  # the labelled bank, as stored
    bank = torch.stack([row.embedding for row in rows])
    labels = torch.tensor([classes.index(row.label) for row in rows])
    paths = list(gallery.queries)
    request = fam_pb2.ExplainRequest(
        model=KNN_MODEL, images=[fam_pb2.Image(encoded=p.read_bytes()) for p in paths]
    )
    response = stub.Explain(request, timeout=TIMEOUT)
    images = tuple(EncodedImage(p.read_bytes()) for p in paths)
    inputs = served.config.normalize(pipeline.pixels(KNN_MODEL, images))
    queries = embed(served, inputs)
    expected = knn_predict(queries, bank, labels, k=KNN_K, temperature=served.config.temperature)
    targets = neighbour_targets(
        queries, bank, labels, expected.labels, count=min(KNN_TARGET_COUNT, PER_CLASS)
    )
    explainer = served.explainer("fam")
    for number, result in enumerate(response.results):
        votes = expected.votes[number]
        assert result.prediction.label == classes[int(expected.labels[number])]
        assert result.prediction.score == pytest.approx(float(votes.max() / votes.sum()), abs=1e-5)
        alone = explainer(inputs[number : number + 1], target=targets[number][None]).maps[0]
        assert torch.allclose(proto_map(result.heatmap), alone, atol=MAP_ATOL)
    listed = {m.name: m for m in stub.ListModels(fam_pb2.ListModelsRequest()).models}
    assert listed[KNN_MODEL].task == "knn" and listed[KNN_MODEL].status == "ready"
    info = stub.ModelInfo(fam_pb2.ModelInfoRequest(model=KNN_MODEL), timeout=TIMEOUT)
    assert tuple(info.class_names) == classes and info.task == "knn"
    # a knn model searches the index it votes over: what the same weights find there
    found = stub.Search(search_request(paths[:1], model=KNN_MODEL, top_k=3), timeout=TIMEOUT)
    assert_same_results(found.results, direct(paths[:1], top_k=3, explain="query"))
    # the OIP answers a knn model's request naming no outputs with its classification
    message = oip_pb.ModelInferRequest(model_name=KNN_MODEL)
    message.inputs.add(name="image", datatype="BYTES", shape=[1])
    message.raw_input_contents.append(pack_bytes([paths[0].read_bytes()]))
    answer = answer_infer(pipeline, message, "1", oip_pb.ModelInferResponse)
    assert [output.name for output in answer.outputs] == list(OUTPUTS)
    label = unpack_bytes(answer.raw_output_contents[list(OUTPUTS).index("label")])
    assert label == [response.results[0].prediction.label.encode()]


# -- the Open Inference Protocol, read by tritonclient
@pytest.fixture(scope="module")
def oip_report(server, gallery):
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient[grpc] is not installed")
    paths = [gallery.path(gallery.ids[0]), gallery.queries[2]]
    address = f"127.0.0.1:{server.port}"
    report = oip_client_report(
        "search", address, SEARCH_MODEL, PLAIN_MODEL, *map(str, paths), timeout=180
    )
    return report, paths


def decoded(field: dict) -> np.ndarray:
    data = base64.b64decode(field["data"])
    return np.frombuffer(data, dtype=field["dtype"]).reshape(field["shape"])


def assert_oip_matches(report: dict, expected) -> None:
    """OIP search outputs (as read by a client) equal to ``explained_search``'s answer."""
    assert report["neighbour_ids"] == [[e.neighbour.id for e in row] for row in expected]
    assert report["neighbour_labels"] == [
        [e.neighbour.label or "" for e in row] for row in expected
    ]
    scores = decoded(report["neighbour_scores"])
    assert scores.dtype == np.float32 and scores.shape == (len(expected), len(expected[0]))
    assert np.allclose(scores, [[e.neighbour.score for e in row] for row in expected], atol=1e-5)
    for name, field in (("heatmaps", "query_map"), ("reference_heatmaps", "reference_map")):
        maps = decoded(report[name])
        assert maps.shape == (len(expected), len(expected[0]), 84, 84)
        for q, row in enumerate(expected):
            for j, item in enumerate(row):
                want = getattr(item, field)
                if want is None:
                    assert np.isnan(maps[q, j]).all()
                else:
                    assert np.allclose(maps[q, j].astype(np.float32), want.numpy(), atol=MAP_ATOL)


def test_oip_search_outputs_match_explained_search(oip_report, direct) -> None:
    report, paths = oip_report
    assert report["model_ready"]
    assert report["outputs"] == [
        "neighbour_ids",
        "neighbour_scores",
        "neighbour_labels",
        "heatmaps",
        "reference_heatmaps",
    ]
    assert report["outputs_metadata"]["neighbour_ids"] == "BYTES"
    assert report["outputs_metadata"]["neighbour_scores"] == "FP32"
    assert report["outputs_metadata"]["heatmaps"] == "FP16"
    assert report["heatmaps"]["dtype"] == "float16"
    assert report["parameters"]["heatmaps"] == {"method": "fam", "target_layer": "block4"}
    assert_oip_matches(report, direct(paths, top_k=3, explain="both"))
    assert report["only_ids"] == ["neighbour_ids"] and report["only_ids_shape"] == [1, 2]


def test_oip_bad_searches_get_their_status(oip_report) -> None:
    errors = oip_report[0]["errors"]
    assert errors["top_k"].startswith("StatusCode.INVALID_ARGUMENT") and "top_k" in errors["top_k"]
    assert errors["explain"].startswith("StatusCode.INVALID_ARGUMENT")
    assert errors["filter"].startswith("StatusCode.INVALID_ARGUMENT")
    assert errors["no_index"].startswith("StatusCode.FAILED_PRECONDITION")
    assert errors["mixed"].startswith("StatusCode.INVALID_ARGUMENT")
    assert oip_report[0]["still_answering"] == [1, 4]


def test_search_params_are_checked_against_the_index_before_the_search() -> None:
    ivf = Fake(card=Fake(index_type="IVF_FLAT", index_params={"nlist": 16, "nprobe": 4}))
    hnsw = Fake(card=Fake(index_type="HNSW", index_params={"M": 8, "ef": 64}))
    assert check_search_params(ivf, {"nprobe": 16}, Limits()) == (("nprobe", 16),)
    assert check_search_params(ivf, None, Limits()) == ()
    assert check_search_params(hnsw, {"ef": 8}, Limits(max_search_ef=8)) == (("ef", 8),)
    for index, params, limits, message in (
        (ivf, {"nprobe": 17}, Limits(), "nprobe must be at most 16 (the index's nlist), got 17"),
        (ivf, {"nprobe": 2.5}, Limits(), "nprobe must be an int in [1, 65536], got 2.5"),
        (ivf, {"nprobe": True}, Limits(), "nprobe must be an int"),
        (ivf, [("nprobe", 4)], Limits(), "search_params must map names to integers"),
        (hnsw, {"ef": 9}, Limits(max_search_ef=8), "ef must be at most 8 (the server's limit)"),
    ):
        with pytest.raises(InvalidArgument) as error:
            check_search_params(index, params, limits)
        assert message in str(error.value) and "\n" not in str(error.value)


class _DroppedIndex:
    @property
    def card(self):
        raise ValueError("index g.db holds no gallery: build it with `fam index build`")


def test_search_params_for_an_index_dropped_under_the_server_are_a_failed_precondition():
    with pytest.raises(FailedPrecondition, match="^search: index g.db holds no gallery"):
        check_search_params(_DroppedIndex(), {"ef": 16}, Limits())
    assert check_search_params(_DroppedIndex(), {}, Limits()) == ()  # nothing asked: not read


def test_oip_search_parameters_are_integers() -> None:
    message = oip_pb.ModelInferRequest(model_name=HNSW_MODEL)
    message.inputs.add(name="image", datatype="BYTES", shape=[1])
    message.raw_input_contents.append(pack_bytes([b"not read"]))
    assert search_request_from_infer(message).search_params is None
    message.parameters["nprobe"].string_param = "12"
    assert search_request_from_infer(message).search_params == {"nprobe": 12}
    message.parameters["ef"].string_param = "many"
    with pytest.raises(InvalidArgument, match="parameter 'ef' must be an integer, got 'many'"):
        search_request_from_infer(message)
