"""Serving exported ONNX graphs: the same answers as the torch-backed pipeline, over gRPC too."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from serving_helpers import CLASSES, loopback, make_model_dir, png_bytes, running_server
from tolerances import assert_top_classes

from fam_core.exporters import export_model
from fam_core.models.store import load_model
from fam_core.pipeline import (
    EncodedImage,
    ExplainRequest,
    InvalidArgument,
    ModelRegistry,
    NotFound,
    Pipeline,
    heatmap_from_bytes,
)
from fam_core.server import ServerConfig
from fam_core.server.stubs import fam_pb2, fam_pb2_grpc

TOLERANCE = 1e-3  # float16 heatmaps
IMAGES = tuple(EncodedImage(png_bytes(seed)) for seed in (11, 12, 13))


@pytest.fixture(scope="module")
def torch_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("torch-models"))


def _export(torch_dir: Path, name: str, path: Path, **options) -> Path:
    model, config = load_model(torch_dir / name)
    return export_model(model, config, path=path, **options)


@pytest.fixture(scope="module")
def onnx_dir(torch_dir, tmp_path_factory) -> Path:
    """``default-*`` as configs naming graphs, plus bare graphs named after their files."""
    root = tmp_path_factory.mktemp("onnx-models")
    embedding = root / "default-embedding"
    embedding.mkdir()
    _export(torch_dir, "default-embedding", embedding / "model.onnx", explain="best")
    shutil.copy(torch_dir / "default-embedding" / "prototypes.pt", embedding)
    (embedding / "config.yaml").write_text(
        "name: default-embedding\ntask: embedding\nonnx: model.onnx\nprototypes: prototypes.pt\n"
    )
    classifier = root / "default-classifier"
    classifier.mkdir()
    _export(torch_dir, "default-classifier", classifier / "model.onnx", method="cam")
    (classifier / "config.yaml").write_text(
        "name: default-classifier\ntask: classifier\nonnx: model.onnx\n"
    )
    gradfam = root / "gradfam"  # a "mean" graph with the config's prototypes
    gradfam.mkdir()
    _export(torch_dir, "default-embedding", gradfam / "model.onnx", method="gradfam")
    shutil.copy(torch_dir / "default-embedding" / "prototypes.pt", gradfam)
    (gradfam / "config.yaml").write_text(
        "name: gradfam\ntask: embedding\nonnx: model.onnx\nprototypes: prototypes.pt\n"
    )
    # bare graphs: FAM taking references (mean), CAM with a class input, baked best
    _export(torch_dir, "default-embedding", root / "fam-mean.onnx")
    _export(
        torch_dir, "default-classifier", root / "cam-class.onnx", method="cam", class_input=True
    )
    _export(
        torch_dir, "default-embedding", root / "fam-baked.onnx",
        references="prototypes", explain="best",
    )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def torch_pipeline(torch_dir):
    pipeline = Pipeline(ModelRegistry.from_directory(torch_dir), batching=None)
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def onnx_registry(onnx_dir) -> ModelRegistry:
    return ModelRegistry.from_directory(onnx_dir)


@pytest.fixture(scope="module")
def onnx_pipeline(onnx_registry):
    pipeline = Pipeline(onnx_registry)  # micro-batched, as served
    yield pipeline
    pipeline.close()


def assert_same_results(onnx_response, torch_response) -> None:
    assert len(onnx_response.results) == len(torch_response.results)
    for got, want in zip(onnx_response.results, torch_response.results, strict=True):
        if want.scores:  # a near-tie may break the other way on another backend
            chosen = [got.prediction.index]
            assert_top_classes(chosen, torch.tensor([list(want.scores)]), TOLERANCE)
        else:
            assert got.prediction.index == want.prediction.index
        if got.prediction.index == want.prediction.index:
            assert got.prediction.label == want.prediction.label
        assert got.prediction.score == pytest.approx(want.prediction.score, abs=TOLERANCE)
        assert got.scores == pytest.approx(want.scores, abs=TOLERANCE)
        assert [m.index for m in got.top_k] == [m.index for m in want.top_k]
        assert got.explained_score == pytest.approx(want.explained_score, abs=TOLERANCE)
        assert got.heatmap.shape == want.heatmap.shape
        assert (got.heatmap.method, got.heatmap.target_layer) == (
            want.heatmap.method,
            want.heatmap.target_layer,
        )
        heatmap = heatmap_from_bytes(got.heatmap.data, got.heatmap.shape)
        expected = heatmap_from_bytes(want.heatmap.data, want.heatmap.shape)
        assert (heatmap - expected).abs().max() <= TOLERANCE
        if want.embedding is not None:
            a = torch.frombuffer(bytearray(got.embedding), dtype=torch.float32)
            b = torch.frombuffer(bytearray(want.embedding), dtype=torch.float32)
            assert torch.allclose(a, b, atol=TOLERANCE)


def test_registry_configures_onnx_models_from_their_metadata(onnx_registry) -> None:
    assert onnx_registry.names() == sorted(
        ["default-embedding", "default-classifier", "fam-mean", "gradfam", "cam-class", "fam-baked"]
    )
    embedding = onnx_registry.get("default-embedding")
    assert embedding.model is None and embedding.onnx is not None
    assert embedding.methods == ("fam",) and embedding.default_method == "fam"
    assert embedding.config.target_layer == "block4" and embedding.config.input_size == 84
    assert embedding.feature_shape == (5, 5) and embedding.output_dim == 64
    assert embedding.num_prototypes == 5 and embedding.labels == CLASSES
    assert onnx_registry.get("fam-baked").num_prototypes == 5
    assert onnx_registry.get("fam-baked").labels == CLASSES  # from the file's class names
    assert onnx_registry.get("cam-class").methods == ("cam",)


@pytest.mark.parametrize("resolution", ["input", "feature"])
@pytest.mark.parametrize("model", ["default-embedding", "default-classifier"])
def test_onnx_pipeline_equals_torch_pipeline(
    onnx_pipeline, torch_pipeline, model, resolution
) -> None:
    request = ExplainRequest(model, IMAGES, resolution=resolution, top_k=3, embedding=True)
    assert_same_results(onnx_pipeline.explain(request), torch_pipeline.explain(request))


@pytest.mark.parametrize(
    ("onnx_model", "torch_model", "method", "options"),
    [
        ("fam-baked", "default-embedding", "fam", {}),  # nearest baked prototype
        ("cam-class", "default-classifier", "cam", {}),  # predicted class, second pass
        ("cam-class", "default-classifier", "cam", {"target_class": 3}),
        ("gradfam", "default-embedding", "gradfam", {}),  # nearest prototype, second pass
        ("gradfam", "default-embedding", "gradfam", {"references": IMAGES[:2]}),
        ("fam-mean", "default-embedding", "fam", {"references": IMAGES[1:]}),  # eq. 11 mean
    ],
)
def test_each_graph_kind_answers_like_torch(
    onnx_pipeline, torch_pipeline, onnx_model, torch_model, method, options
) -> None:
    got = onnx_pipeline.explain(ExplainRequest(onnx_model, IMAGES, **options))
    want = torch_pipeline.explain(ExplainRequest(torch_model, IMAGES, method=method, **options))
    assert_same_results(got, want)


def test_embedding_without_prototypes_explains_itself(onnx_pipeline, torch_dir) -> None:
    """A bare ``mean`` graph has no prototypes: it explains each embedding against itself."""
    torch_pipeline = Pipeline(ModelRegistry([_without_prototypes(torch_dir)]), batching=None)
    try:
        want = torch_pipeline.explain(ExplainRequest("default-embedding", IMAGES))
    finally:
        torch_pipeline.close()
    got = onnx_pipeline.explain(ExplainRequest("fam-mean", IMAGES))
    assert [r.prediction.index for r in got.results] == [-1, -1, -1]
    assert all(r.scores == () for r in got.results)
    assert_same_results(got, want)


def _without_prototypes(torch_dir: Path):
    from dataclasses import replace

    from fam_core.pipeline import ServedModel

    served = ServedModel.load(torch_dir / "default-embedding")
    return replace(served, prototypes=None)


def test_predict_only_matches_torch(onnx_pipeline, torch_pipeline) -> None:
    request = ExplainRequest("default-embedding", IMAGES, heatmap=False)
    got, want = onnx_pipeline.explain(request), torch_pipeline.explain(request)
    assert all(r.heatmap is None for r in got.results)
    for a, b in zip(got.results, want.results, strict=True):
        assert a.prediction.index == b.prediction.index
        assert a.scores == pytest.approx(b.scores, abs=TOLERANCE)


@pytest.mark.parametrize(
    ("request_kwargs", "error", "message"),
    [
        (
            {"method": "gradcam"},
            NotFound,
            "'gradcam' is not in this graph.*expected one of \\['cam'\\]",
        ),
        ({"target_class": 2}, InvalidArgument, "class_input=True"),
        (
            {"model": "fam-baked", "references": IMAGES[:1]},
            InvalidArgument,
            "baked prototypes",
        ),
        (
            {"model": "default-embedding", "references": IMAGES[:2]},
            InvalidArgument,
            "explain='mean'",
        ),
    ],
)
def test_requests_a_graph_cannot_answer_are_refused(
    onnx_pipeline, request_kwargs, error, message
) -> None:
    kwargs = {"model": "default-classifier", "images": IMAGES[:1], **request_kwargs}
    with pytest.raises(error, match=message):
        onnx_pipeline.explain(ExplainRequest(**kwargs))


def test_onnx_configs_refuse_torch_loading_and_bad_graphs(onnx_dir, torch_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="is an ONNX graph"):
        load_model(onnx_dir / "default-classifier")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    shutil.copy(onnx_dir / "default-classifier" / "model.onnx", wrong)
    (wrong / "config.yaml").write_text("name: wrong\ntask: embedding\nonnx: model.onnx\n")
    with pytest.raises(ValueError, match="task 'embedding'.*'classifier'"):
        ModelRegistry.from_directory(tmp_path)
    dot = tmp_path / "dot"
    dot.mkdir()
    model, config = load_model(torch_dir / "default-embedding")
    export_model(model, config, path=dot / "dot.onnx", similarity="dot")
    with pytest.raises(ValueError, match="cosine scores"):
        ModelRegistry.from_directory(dot)


def test_grpc_call_to_an_onnx_model(onnx_registry, torch_pipeline) -> None:
    with (
        running_server(onnx_registry, ServerConfig(port=0)) as server,
        loopback(server.port) as channel,
    ):
        stub = fam_pb2_grpc.FamServiceStub(channel)
        reply = stub.Explain(
            fam_pb2.ExplainRequest(
                model="default-classifier", images=[fam_pb2.Image(encoded=IMAGES[0].data)]
            ),
            timeout=30,
        )
        info = stub.ModelInfo(fam_pb2.ModelInfoRequest(model="default-classifier"), timeout=30)
    want = torch_pipeline.explain(ExplainRequest("default-classifier", IMAGES[:1])).results[0]
    (result,) = reply.results
    assert result.prediction.index == want.prediction.index
    assert list(result.scores) == pytest.approx(want.scores, abs=TOLERANCE)
    heatmap = heatmap_from_bytes(result.heatmap.data, tuple(result.heatmap.shape))
    expected = heatmap_from_bytes(want.heatmap.data, want.heatmap.shape)
    assert (heatmap - expected).abs().max() <= TOLERANCE
    assert list(info.methods) == ["cam"]


def test_runs_grouped_by_reference_come_back_in_item_order(monkeypatch) -> None:
    """Items 0 and 3 share a reference and run first; every result returns to its item."""
    from fam_core.explanation import Explanation
    from fam_core.pipeline.onnx_backend import OnnxBackend, _Pass

    def fake_call(self, inputs, *, served, references=None, classes=None):  # noqa: ANN001, ANN202
        ids = inputs[:, 0, 0, 0]  # each input carries its item index
        explanation = Explanation(
            maps=ids.view(-1, 1, 1).expand(-1, 2, 2),
            raw=ids.view(-1, 1, 1),
            weights=ids.view(-1, 1),
            scores=ids + references[0, 0],
            method="fam",
            target_layer="block4",
        )
        return _Pass(ids.view(-1, 1), (ids + references[0, 0]).view(-1, 1), explanation)

    monkeypatch.setattr(OnnxBackend, "_call", fake_call)
    inputs = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    references = torch.tensor([10.0, 20.0, 30.0, 10.0]).view(4, 1, 1)  # [B, K=1, D=1]
    merged = OnnxBackend._by_reference(object.__new__(OnnxBackend), None, inputs, references)
    assert merged.outputs.flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    assert merged.pair_scores.flatten().tolist() == [10.0, 21.0, 32.0, 13.0]
    assert merged.explanation.scores.tolist() == [10.0, 21.0, 32.0, 13.0]
    assert merged.explanation.maps[:, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
