"""ONNX export of models nobody here wrote (Hugging Face ``transformers`` architectures,
random init): the graph is built from the library's explainer with ``target_layer=None``,
run by onnxruntime, and compared with the torch explainer (heatmap, raw map, weights,
scores). Linear heads (ResNet's pooler, MobileNetV2) take the constant-matrix graph; heads
that are not linear (ConvNeXt's LayerNorm, a ViT / DINOv2 read through the class token) the
traced vector-Jacobian product."""

from __future__ import annotations

import json

import pytest
import torch
from model_helpers import plain_classifier
from torch import nn

from fam_core import CAM, FAM, GradCAM, GradFAM
from fam_core.exporters import export_model
from fam_core.graphs import onnx_format as fmt
from fam_core.graphs.onnx_runtime import OnnxExplainer

pytest.importorskip("transformers")
pytest.importorskip("onnxscript")
from hf_factories import SIZE, build  # noqa: E402
from tolerances import assert_top_classes

ATOL = 1e-4
HEAD_KIND = {  # the head the explainer finds after the layer found from the dataflow
    "resnet": "identity",  # pooler output [B, C, 1, 1]
    "mobilenetv2": "identity",
    "convnext": "jacobian",  # functional mean, then LayerNorm
    "vit": "jacobian",  # the last block, LayerNorm and the class token
    "dinov2": "jacobian",
}
GRADFAM_MODELS = ("resnet", "convnext")


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, relative: bool = False) -> None:
    """Within ATOL of the larger of 1 and the expected values' largest magnitude (of the
    expected values' own scale when ``relative``: Grad-FAM weights are ~1e-3)."""
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    largest = expected.abs().max().item()
    scale = max(largest, 1e-12) if relative else max(1.0, largest)
    difference = (actual.float() - expected.float()).abs().max().item() / scale
    assert difference <= ATOL, f"{what}: max |difference| / {scale:.3g} = {difference:.2e}"


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    cache: dict[str, nn.Module] = {}

    class Models(dict):
        def __missing__(self, name: str) -> nn.Module:
            cache[name] = build(name)
            self[name] = cache[name]
            return cache[name]

    return Models()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, models):
    """Export once per (model, method, options); returns the OnnxExplainer."""
    cache: dict[tuple, OnnxExplainer] = {}
    folder = tmp_path_factory.mktemp("any")

    def get(name: str, method: str, **options: object) -> OnnxExplainer:
        key = (name, method, tuple(sorted(options.items())))
        if key not in cache:
            options.setdefault("input_size", SIZE)
            path = folder / f"{name}_{method}_{len(cache)}.onnx"
            cache[key] = OnnxExplainer(
                export_model(models[name], method=method, path=path, **options)
            )
        return cache[key]

    return get


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))


def references_for(explainer, count: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    return explainer.embed(torch.rand(count, 3, SIZE, SIZE, generator=generator))


@pytest.mark.parametrize("name", sorted(HEAD_KIND))
def test_fam_of_any_model_matches_the_library(name, models, exported, images) -> None:
    runner = exported(name, "fam")
    explainer = FAM(models[name], None, input_size=SIZE)
    references = references_for(explainer)
    expected = explainer(images, target=references)
    actual = runner(images, references=references)
    assert runner.target_layer == explainer.target_layer
    assert runner.metadata["head"] == HEAD_KIND[name] == expected.extras["head"]
    close(actual.maps, expected.maps, "heatmap")
    close(actual.raw, expected.raw, "heatmap_lowres")
    close(actual.weights, expected.weights, "weights")
    close(actual.scores, expected.scores, "scores")
    close(actual.extras["embedding"], explainer.embed(images), "embedding")


@pytest.mark.parametrize("name", GRADFAM_MODELS)
def test_gradfam_of_any_model_matches_the_library(name, models, exported, images) -> None:
    runner = exported(name, "gradfam")
    explainer = GradFAM(models[name], None, input_size=SIZE)
    references = references_for(explainer, 3)
    expected = explainer(images, target=references)
    actual = runner(images, references=references)
    close(actual.weights, expected.weights, "weights (relative)", relative=True)
    close(actual.raw, expected.raw, "heatmap_lowres (relative)", relative=True)
    close(actual.maps, expected.maps, "heatmap")
    close(actual.scores, expected.scores, "scores")


@pytest.mark.parametrize("method", [CAM, GradCAM], ids=["cam", "gradcam"])
def test_cam_and_gradcam_on_a_transformers_classifier(method, models, exported, images) -> None:
    """``ResNetForImageClassification`` has no ``is_classifier``: its ``logits`` output says
    it is one. Class indices come in as an input."""
    model = models["resnet-classifier"]
    runner = exported("resnet-classifier", method.method, class_input=True)
    assert runner.metadata[fmt.KEY_TASK] == "classifier"
    classes = [3, 0, 4]
    expected = method(model, None, input_size=SIZE)(images, target=classes)
    actual = runner(images, class_index=classes)
    close(actual.maps, expected.maps, "heatmap")
    close(actual.raw, expected.raw, "heatmap_lowres", relative=True)
    close(actual.weights, expected.weights, "weights", relative=True)
    close(actual.scores, expected.scores, "scores")
    top1 = exported("resnet-classifier", method.method)(images)
    with torch.no_grad():
        assert_top_classes(top1.extras["class_index"], model(images).logits)


def test_non_square_input(models, exported) -> None:
    """64 x 96 on ConvNeXt (a 2 x 3 map, the traced LayerNorm head)."""
    runner = exported("convnext", "fam", input_size=(64, 96))
    preprocessing = json.loads(runner.metadata[fmt.KEY_PREPROCESSING])
    assert preprocessing["size"] == [64, 96] and runner.input_size == (64, 96)
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(6))
    explainer = FAM(models["convnext"], None, input_size=(64, 96))
    references = explainer.embed(torch.rand(2, 3, 64, 96))
    expected = explainer(images, target=references)
    actual = runner(images, references=references)
    assert actual.maps.shape == (2, 64, 96) and actual.raw.shape == (2, 2, 3)
    close(actual.maps, expected.maps, "heatmap")
    close(actual.raw, expected.raw, "heatmap_lowres")
    close(actual.weights, expected.weights, "weights")


@pytest.mark.parametrize("layer", ["encoder.stages.3.layers.0.layer.0", "encoder.stages.2"])
def test_a_head_with_convolutions_exports_its_input_gradient(models, tmp_path, layer) -> None:
    """Inside or before ResNet's last stage the head holds convolutions (strided ones for
    stage 2): their input gradient is a transposed convolution in the ONNX graph."""
    path = export_model(
        models["resnet"],
        method="fam",
        path=tmp_path / "conv_head.onnx",
        input_size=SIZE,
        target_layer=layer,
        output="pooler_output",
    )
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    explainer = FAM(models["resnet"], layer, output="pooler_output")
    references = explainer.embed(torch.rand(3, 3, SIZE, SIZE))
    expected = explainer(images, target=references)
    actual = OnnxExplainer(path)(images, references=references)
    assert expected.extras["head"] == "jacobian"
    close(actual.maps, expected.maps, "heatmap")
    close(actual.weights, expected.weights, "weights")


def test_task_is_explicit_not_an_attribute(tmp_path) -> None:
    """A plain classifier (no ``is_classifier``, an unnamed output): ``task=`` says it is one."""
    torch.manual_seed(0)
    model = plain_classifier()
    with pytest.raises(ValueError, match="pass task='classifier'"):
        export_model(model, method="gradcam", path=tmp_path / "x.onnx", input_size=16)
    path = export_model(
        model, method="gradcam", task="classifier", path=tmp_path / "g.onnx", input_size=16
    )
    images = torch.rand(2, 3, 16, 16)
    actual = OnnxExplainer(path)(images)
    expected = GradCAM(model, None, task="classifier")(images, target=None)
    close(actual.weights, expected.weights, "weights", relative=True)
    close(actual.maps, expected.maps, "heatmap")
    with pytest.raises(ValueError, match="use 'cam' or 'gradcam'"):
        export_model(
            model, method="fam", task="classifier", path=tmp_path / "f.onnx", input_size=16
        )
