"""The request pipeline shared by the front doors: parity with the explainers, limits, batching."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F
from serving_helpers import CLASSES, png_bytes

from fam_core.explainers.cam.cam import CAM
from fam_core.explainers.fam.fam import FAM
from fam_core.explainers.postprocess import min_max
from fam_core.images.read import decode_image, resize
from fam_core.pipeline import (
    BatchingConfig,
    DeadlineExceeded,
    EncodedImage,
    ExplainRequest,
    InvalidArgument,
    Limits,
    ModelRegistry,
    NotFound,
    Pipeline,
    RawTensor,
    ResourceExhausted,
    heatmap_bytes,
    heatmap_from_bytes,
)


@pytest.fixture(scope="module")
def registry(model_dir) -> ModelRegistry:
    return ModelRegistry.from_directory(model_dir)


@pytest.fixture(scope="module")
def pipeline(registry):
    pipeline = Pipeline(registry, Limits(max_batch=8, max_request_bytes=200_000), batching=None)
    yield pipeline
    pipeline.close()


def model_inputs(registry, name: str, images: list[bytes]) -> torch.Tensor:
    config = registry.get(name).config
    pixels = torch.stack([resize(decode_image(b), config.input_size) for b in images])
    return config.normalize(pixels)


def test_heatmap_bytes_are_float16_little_endian() -> None:
    # 0.0 is 0x0000, 1.0 is 0x3C00, -2.0 is 0xC000: little-endian byte pairs
    assert heatmap_bytes(torch.tensor([[0.0, 1.0, -2.0]])) == b"\x00\x00\x00\x3c\x00\xc0"
    back = heatmap_from_bytes(b"\x00\x00\x00\x3c\x00\xc0", (1, 3))
    assert back.tolist() == [[0.0, 1.0, -2.0]]


def test_classifier_result_matches_cam_on_the_predicted_class(pipeline, registry) -> None:
    images = [png_bytes(1), png_bytes(2)]
    response = pipeline.explain(
        ExplainRequest("default-classifier", tuple(EncodedImage(b) for b in images))
    )
    served = registry.get("default-classifier")
    inputs = model_inputs(registry, "default-classifier", images)
    with torch.no_grad():
        probabilities = F.softmax(served.model(inputs), dim=1)
    expected = CAM(served.model, "block4")(inputs, target=probabilities.argmax(1).tolist())
    for i, result in enumerate(response.results):
        best = int(probabilities[i].argmax())
        assert result.prediction.index == best
        assert result.prediction.label == CLASSES[best]
        assert result.prediction.score == pytest.approx(float(probabilities[i, best]), abs=1e-6)
        assert torch.allclose(torch.tensor(result.scores), probabilities[i], atol=1e-6)
        heatmap = heatmap_from_bytes(result.heatmap.data, result.heatmap.shape)
        assert result.heatmap.shape == (84, 84)
        assert torch.allclose(heatmap, expected.maps[i], atol=1e-3)  # float16 rounding
        assert result.explained_score == pytest.approx(float(expected.scores[i]), rel=1e-5)


def test_embedding_result_explains_the_nearest_prototype(pipeline, registry) -> None:
    images = [png_bytes(3)]
    response = pipeline.explain(
        ExplainRequest(
            "default-embedding", (EncodedImage(images[0]),), top_k=3, embedding=True,
            resolution="feature",
        )
    )  # fmt: skip
    served = registry.get("default-embedding")
    inputs = model_inputs(registry, "default-embedding", images)
    fam = FAM(served.model, "block4")
    embedding = fam.embed(inputs)
    cosine = F.normalize(embedding, dim=1) @ F.normalize(served.prototypes, dim=1).T
    order = cosine[0].argsort(descending=True)
    (result,) = response.results
    assert [m.index for m in result.top_k] == order[:3].tolist()
    assert [m.label for m in result.top_k] == [CLASSES[i] for i in order[:3].tolist()]
    assert result.top_k[0].score == pytest.approx(float(cosine[0, order[0]]), abs=1e-5)
    expected = fam(inputs, target=served.prototypes[order[:1]].unsqueeze(1))
    heatmap = heatmap_from_bytes(result.heatmap.data, result.heatmap.shape)
    assert result.heatmap.shape == (5, 5)
    assert torch.allclose(heatmap, min_max(expected.raw, dim=(1, 2))[0], atol=1e-3)
    returned = torch.frombuffer(bytearray(result.embedding), dtype=torch.float32)
    assert torch.allclose(returned, embedding[0], atol=1e-6)


def test_references_are_scored_and_explained(pipeline, registry) -> None:
    query, refs = png_bytes(4), [png_bytes(5), png_bytes(6)]
    response = pipeline.explain(
        ExplainRequest(
            "default-embedding", (EncodedImage(query),), references=tuple(map(EncodedImage, refs))
        )
    )
    served = registry.get("default-embedding")
    fam = FAM(served.model, "block4")
    reference_embeddings = fam.embed(model_inputs(registry, "default-embedding", refs))
    inputs = model_inputs(registry, "default-embedding", [query])
    cosine = F.cosine_similarity(fam.embed(inputs), reference_embeddings)
    (result,) = response.results
    assert torch.allclose(torch.tensor(result.scores), cosine, atol=1e-5)
    assert result.prediction.label == f"reference {int(cosine.argmax())}"
    expected = fam(inputs, target=reference_embeddings)  # mean similarity to both (eq. 11)
    heatmap = heatmap_from_bytes(result.heatmap.data, result.heatmap.shape)
    assert torch.allclose(heatmap, expected.maps[0], atol=1e-3)


def test_raw_tensors_decode_like_encoded_images(pipeline) -> None:
    pixels = (torch.rand(3, 84, 84) * 255).to(torch.uint8)
    as_uint8 = RawTensor(pixels.numpy().tobytes(), "uint8", (3, 84, 84))
    as_float = RawTensor((pixels.float() / 255).numpy().tobytes(), "float32", (3, 84, 84))
    first, second = (
        pipeline.explain(ExplainRequest("default-classifier", (image,))).results[0]
        for image in (as_uint8, as_float)
    )
    assert first.scores == pytest.approx(second.scores, abs=1e-6)
    assert first.heatmap.data == second.heatmap.data


@pytest.mark.parametrize(
    ("request_kwargs", "error", "message"),
    [
        ({"images": ()}, InvalidArgument, "no images"),
        ({"images": (EncodedImage(b"corrupt"),)}, InvalidArgument, "cannot decode"),
        ({"images": (RawTensor(bytes(12), "int64", (3, 2, 2)),)}, InvalidArgument, "dtype"),
        ({"images": (RawTensor(bytes(12), "uint8", (2, 3, 2)),)}, InvalidArgument, "[3, H, W]"),
        ({"images": (RawTensor(bytes(11), "uint8", (3, 2, 2)),)}, InvalidArgument, "needs 12"),
        ({"images": (RawTensor(b"", "uint8", (3, 0, 4)),)}, InvalidArgument, "zero size"),
        ({"resolution": "pixel"}, InvalidArgument, "resolution"),
        ({"target_class": 5}, InvalidArgument, "target_class must be in [0, 5)"),
        ({"model": "nope"}, NotFound, "unknown model 'nope'"),
        ({"method": "nope"}, InvalidArgument, "unknown method 'nope'"),
        ({"images": (EncodedImage(png_bytes(0)),) * 9}, ResourceExhausted, "limit of 8"),
        ({"images": (EncodedImage(bytes(200_001)),)}, ResourceExhausted, "200000 bytes"),
    ],
)
def test_bad_requests_raise_typed_errors(pipeline, request_kwargs, error, message) -> None:
    kwargs = {"model": "default-classifier", "images": (EncodedImage(png_bytes(0)),)}
    kwargs.update(request_kwargs)
    with pytest.raises(error, match=None) as caught:
        pipeline.explain(ExplainRequest(**kwargs))
    assert message in str(caught.value)


def test_float_tensor_out_of_range_is_invalid(pipeline) -> None:
    values = torch.full((3, 2, 2), 2.0)
    image = RawTensor(values.numpy().tobytes(), "float32", (3, 2, 2))
    with pytest.raises(InvalidArgument, match=r"\[0, 1\]"):
        pipeline.explain(ExplainRequest("default-classifier", (image,)))


def test_past_deadline_runs_nothing(registry) -> None:
    passes: list[int] = []
    pipeline = Pipeline(registry, batching=None, batch_observer=lambda _m, n: passes.append(n))
    with pytest.raises(DeadlineExceeded):
        pipeline.explain(
            ExplainRequest("default-classifier", (EncodedImage(png_bytes(0)),)),
            deadline=time.monotonic() - 1.0,
        )
    assert passes == []


def test_concurrent_requests_are_micro_batched(registry) -> None:
    passes: list[int] = []
    pipeline = Pipeline(
        registry,
        batching=BatchingConfig(max_batch_size=4, max_delay_ms=2000),
        batch_observer=lambda _m, n: passes.append(n),
    )
    direct = Pipeline(registry, batching=None)
    requests = [
        ExplainRequest("default-classifier", (EncodedImage(png_bytes(i)),)) for i in range(4)
    ]
    answers: dict[int, object] = {}
    threads = [
        threading.Thread(target=lambda i=i: answers.__setitem__(i, pipeline.explain(requests[i])))
        for i in range(4)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        pipeline.close()
    assert passes == [4]  # one pass of four images: the batch filled before the delay ran out
    for i, request in enumerate(requests):
        alone = direct.explain(request).results[0]
        batched = answers[i].results[0]  # type: ignore[attr-defined]
        assert (batched.prediction.label, batched.prediction.index) == (
            alone.prediction.label,
            alone.prediction.index,
        )
        assert batched.prediction.score == pytest.approx(alone.prediction.score, abs=1e-5)
        assert torch.allclose(
            heatmap_from_bytes(batched.heatmap.data, (84, 84)),
            heatmap_from_bytes(alone.heatmap.data, (84, 84)),
            atol=1e-3,
        )


def test_explain_batch_runs_compatible_requests_in_one_pass(registry) -> None:
    passes: list[int] = []
    pipeline = Pipeline(registry, batching=None)
    pipeline._batch_observer = lambda _m, n: passes.append(n)  # explain_batch reports nothing
    good = ExplainRequest(
        "default-classifier", (EncodedImage(png_bytes(0)), EncodedImage(png_bytes(1)))
    )
    bad = ExplainRequest("default-classifier", (EncodedImage(b"corrupt"),))
    answers = pipeline.explain_batch([good, bad, good])
    assert isinstance(answers[1], InvalidArgument)
    assert len(answers[0].results) == 2  # type: ignore[union-attr]
    assert answers[0].results[0].heatmap.data == answers[2].results[0].heatmap.data  # type: ignore[union-attr]
    single = pipeline.explain(good).results[1]
    assert torch.allclose(
        heatmap_from_bytes(answers[2].results[1].heatmap.data, (84, 84)),  # type: ignore[union-attr]
        heatmap_from_bytes(single.heatmap.data, (84, 84)),
        atol=1e-3,
    )


def test_predict_only_matches_explain_predictions(pipeline) -> None:
    request = ExplainRequest("default-embedding", (EncodedImage(png_bytes(7)),))
    explained = pipeline.explain(request).results[0]
    predicted = pipeline.explain(
        ExplainRequest("default-embedding", (EncodedImage(png_bytes(7)),), heatmap=False)
    ).results[0]
    assert predicted.heatmap is None
    assert predicted.top_k == explained.top_k


@pytest.mark.parametrize("method", ["relevancecam", "liftcam"])
def test_relevance_and_lift_cam_are_served_like_the_library(pipeline, registry, method) -> None:
    from fam_core.explainers.registry import get_explainer

    query, refs = png_bytes(7), [png_bytes(8)]
    served = registry.get("default-classifier")
    inputs = model_inputs(registry, "default-classifier", [query])
    response = pipeline.explain(
        ExplainRequest("default-classifier", (EncodedImage(query),), method=method, target_class=2)
    )
    expected = get_explainer(method)(served.model, "block4")(inputs, target=2)
    (result,) = response.results
    heatmap = heatmap_from_bytes(result.heatmap.data, result.heatmap.shape)
    assert torch.allclose(heatmap, expected.maps[0], atol=1e-3)
    assert result.explained_score == pytest.approx(float(expected.scores[0]), rel=1e-5)
    # an embedding model explains the similarity to reference images (FAM eq. 11)
    response = pipeline.explain(
        ExplainRequest(
            "default-embedding", (EncodedImage(query),), method=method,
            references=tuple(map(EncodedImage, refs)),
        )
    )  # fmt: skip
    embedder = registry.get("default-embedding").model
    explainer = get_explainer(method)(embedder, "block4")
    references = explainer.embed(model_inputs(registry, "default-embedding", refs))
    expected = explainer(model_inputs(registry, "default-embedding", [query]), target=references)
    (result,) = response.results
    heatmap = heatmap_from_bytes(result.heatmap.data, result.heatmap.shape)
    assert torch.allclose(heatmap, expected.maps[0], atol=1e-3)
