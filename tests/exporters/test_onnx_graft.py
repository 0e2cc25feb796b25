"""Grafting an explanation head onto ONNX files that fam-core did not write.

Every model is exported with a plain ``torch.onnx.export`` (``dynamo=False``, default names,
no fam-core code) and run through ONNX shape inference; :func:`fam_core.exporters.graft.graft_onnx`
finds the target tensor and the head, and :class:`~fam_core.graphs.onnx_runtime.OnnxExplainer`
runs the result. Heatmaps, low-resolution maps, weights and scores are compared with the
torch explainer of the same weights and the matching target layer.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import onnx
import pytest
import torch
from onnx_helpers import user_export
from tolerances import assert_top_classes
from torch import nn

from fam_core.explainers import CAM, FAM, GradCAM, GradFAM
from fam_core.exporters.graft import find_target_tensors, graft_onnx, inspect_onnx
from fam_core.graphs import onnx_format as fmt
from fam_core.graphs.onnx_runtime import OnnxExplainer
from fam_core.models.backbones import build_backbone
from fam_core.models.store import ModelConfig
from fam_core.pipeline.onnx_backend import load_onnx_backend

transformers = pytest.importorskip("transformers")

SIZE = 64
ATOL = 1e-4


def plain_export(model: nn.Module, size: int = SIZE, *, dynamic: bool = False) -> onnx.ModelProto:
    """``torch.onnx.export`` as a user would run it, then ONNX shape inference."""
    options = {}
    if dynamic:
        options = {"input_names": ["pixel_values"], "dynamic_axes": {"pixel_values": {0: "n"}}}
    proto = user_export(model, torch.rand(1, 3, size, size), **options)
    return onnx.shape_inference.infer_shapes(proto)


def ours(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(zlib.crc32(name.encode()) % 1000)  # hash() of a str varies per process
    model = build_backbone(name, width=0.25, **kwargs)
    for module in model.modules():  # eval-mode BatchNorm that is not the identity
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def he_init(model: nn.Module) -> nn.Module:
    """``hf_factories.reinit`` (He convs, unit BatchNorm) plus wider linear layers."""
    from hf_factories import reinit

    reinit(model)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.1)
    return model.eval()


class Select(nn.Module):
    """A transformers model whose selected output is a tensor, for the torch explainers."""

    def __init__(self, model: nn.Module, field: str) -> None:
        super().__init__()
        self.hf = model
        self.field = field

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return getattr(self.hf(images), self.field).flatten(1)


def close(
    actual: torch.Tensor, expected: torch.Tensor, what: str, *, relative: bool = False
) -> None:
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    scale = expected.abs().max().item() if relative else max(1.0, expected.abs().max().item())
    difference = (actual.float() - expected.float()).abs().max().item() / max(scale, 1e-12)
    assert difference <= ATOL, f"{what}: max |difference| / {scale:.3g} = {difference:.2e}"


def hooked_shape(model: nn.Module, layer: str) -> tuple[int, ...]:
    captured: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, o: captured.append(o))
    try:
        with torch.no_grad():
            model(torch.rand(1, 3, SIZE, SIZE))
    finally:
        handle.remove()
    return tuple(captured[-1].shape[1:])


def graft_file(proto: onnx.ModelProto, folder, name: str, **options: object) -> OnnxExplainer:
    path = graft_onnx(proto, out_path=folder / f"{name}.onnx", **options)
    return OnnxExplainer(path)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


# (model factory, torch target layer): embedding models, one without a linear head
EMBEDDERS = {
    "conv4": (lambda: ours("conv4"), "block4"),
    "resnet12": (lambda: ours("resnet12", embedding_dim=10), "layer4"),
    "resnet18": (lambda: ours("resnet18", embedding_dim=20), "layer4"),
    "hf-mobilenetv2": (
        lambda: Select(
            he_init(
                transformers.MobileNetV2Model(
                    transformers.MobileNetV2Config(depth_multiplier=0.35, image_size=SIZE)
                )
            ),
            "pooler_output",
        ).eval(),
        "hf.conv_1x1",
    ),
}


@pytest.mark.parametrize("name", list(EMBEDDERS))
@pytest.mark.parametrize("method", ["fam", "gradfam"])
def test_embedding_models_match_the_torch_explainer(name, method, images, tmp_path) -> None:
    factory, layer = EMBEDDERS[name]
    model = factory()
    proto = plain_export(model.hf if isinstance(model, Select) else model)
    chosen = find_target_tensors(proto)[-1]
    assert chosen.shape == hooked_shape(model, layer)  # the automatic target is that layer
    runner = graft_file(proto, tmp_path, name, method=method)
    assert runner.method == method and runner.target_layer == chosen.name
    torch.manual_seed(1)
    explainer = (FAM if method == "fam" else GradFAM)(model, layer)
    references = explainer.embed(images[:2]) + 0.1 * torch.randn(2, runner.output_dim)
    expected = explainer(images, target=references)
    actual = runner(images, references=references)
    close(actual.maps, expected.maps, "heatmap")
    close(actual.raw, expected.raw, "raw", relative=True)
    close(actual.weights, expected.weights, "weights", relative=method == "gradfam")
    close(actual.scores, expected.scores, "scores")
    close(actual.extras["embedding"], explainer.embed(images), "embedding", relative=True)


def hf_resnet() -> nn.Module:
    config = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_labels=5
    )
    return Select(he_init(transformers.ResNetForImageClassification(config)), "logits").eval()


CLASSIFIERS = {
    "resnet18": (lambda: ours("resnet18", num_classes=5), "layer4", False),
    "hf-resnet": (hf_resnet, "hf.resnet.encoder.stages.3", True),
}


@pytest.mark.parametrize("name", list(CLASSIFIERS))
@pytest.mark.parametrize("method", ["cam", "gradcam"])
@pytest.mark.parametrize("class_input", [False, True])
def test_classifiers_match_the_torch_explainer(name, method, class_input, images, tmp_path) -> None:
    factory, layer, dynamic = CLASSIFIERS[name]
    model = factory()
    proto = plain_export(model.hf if isinstance(model, Select) else model, dynamic=dynamic)
    runner = graft_file(
        proto, tmp_path, name, method=method, task="classifier", class_input=class_input
    )
    assert runner.metadata[fmt.KEY_TASK] == "classifier"
    explainer = (CAM if method == "cam" else GradCAM)(model, layer, classifier=True)
    with torch.no_grad():
        logits = model(images)
    actual = runner(images, class_index=[1, 4, 0]) if class_input else runner(images)
    classes = actual.extras["class_index"].tolist()
    if class_input:
        assert classes == [1, 4, 0]
    else:
        assert_top_classes(classes, logits)
    expected = explainer(images, target=classes)
    close(actual.extras["logits"], logits, "logits", relative=True)
    close(actual.maps, expected.maps, "heatmap")
    close(actual.raw, expected.raw, "raw", relative=True)
    close(actual.weights, expected.weights, "weights", relative=True)
    close(actual.scores, expected.scores, "scores", relative=True)


def test_grafted_file_follows_the_format(tmp_path) -> None:
    proto = plain_export(ours("resnet18", embedding_dim=20))
    references = torch.randn(4, 20)
    path = graft_onnx(
        proto,
        method="fam",
        references=references,
        explain="best",
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        model_name="reid",
        out_path=tmp_path / "baked.onnx",
    )
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    assert props[fmt.KEY_METHOD] == "fam" and props[fmt.KEY_TASK] == "embedding"
    assert props[fmt.KEY_REFERENCES] == "baked" and props[fmt.KEY_NUM_REFERENCES] == "4"
    assert props[fmt.KEY_EXPLAIN] == "best" and props[fmt.KEY_MODEL] == "reid"
    assert json.loads(props[fmt.KEY_PREPROCESSING]) == {
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "size": [SIZE, SIZE],
        "range": [0, 1],
    }
    assert [v.name for v in model.graph.input] == [fmt.INPUT_IMAGE]
    assert json.loads(props[fmt.KEY_OUTPUTS]) == [v.name for v in model.graph.output]
    assert all(v.doc_string for v in (*model.graph.input, *model.graph.output))
    runner = OnnxExplainer(path)
    assert runner.output_dim == 20 and runner.feature_shape == (2, 2)
    batch = runner(torch.randn(3, 3, SIZE, SIZE))  # the plain export fixed batch 1: lifted
    assert batch.maps.shape == (3, SIZE, SIZE)


def test_plain_file_is_grafted_at_load_time(tmp_path) -> None:
    path = tmp_path / "plain.onnx"
    onnx.save(plain_export(ours("conv4")), str(path))
    with pytest.raises(ValueError, match="not a fam-core explanation graph.*graft"):
        OnnxExplainer(path)
    runner = OnnxExplainer(path, graft={"method": "gradfam"})
    assert runner.grafted and runner.method == "gradfam"
    config = ModelConfig(
        name="plain", task="embedding", onnx=path.name, input_size=SIZE, directory=tmp_path
    )
    served = load_onnx_backend(path, config)
    assert served.backend.methods == ("fam", "gradfam")  # every method the graft takes
    assert served.feature_shape == (4, 4) and served.output_dim == 16


def test_inspect_lists_candidates_the_choice_and_the_head() -> None:
    proto = plain_export(ours("resnet18", embedding_dim=20))
    report = inspect_onnx(proto)
    text = str(report)
    assert report.chosen == report.candidates[-1] and report.chosen.shape == (128, 2, 2)
    assert f"chosen target tensor: {report.chosen.name}" in text
    assert "affine map [20 x 128]" in text and report.head_error is None
    assert report.candidates[0].shape[1] > report.chosen.shape[1]  # dataflow order


def test_nonlinear_head_is_refused_naming_the_node() -> None:
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
    proto = plain_export(transformers.ConvNextModel(config).eval())  # pooler: LayerNorm(mean)
    with pytest.raises(ValueError, match=r"not affine.*LayerNormalization.*output_name="):
        graft_onnx(proto, method="fam", nonlinear_head="error")
    report = inspect_onnx(
        proto
    )  # the default grafts its Jacobian (tests/exporters/test_onnx_graft_tokens.py)
    assert report.head_kind == "jacobian" and "LayerNormalization" in str(report)
    # the value the error suggests (the mean before the LayerNorm) can be explained exactly
    pooled = next(n.output[0] for n in proto.graph.node if n.op_type == "ReduceMean")
    grafted = graft_onnx(proto, method="fam", output_name=pooled)
    assert [v.name for v in grafted.graph.output][0] == fmt.OUTPUT_EMBEDDING


def test_a_target_before_the_last_block_is_refused() -> None:
    model = ours("resnet18", embedding_dim=20)
    proto = plain_export(model)
    layer3 = [c for c in find_target_tensors(proto) if c.shape == (64, 4, 4)]
    with pytest.raises(ValueError, match=r"not affine: its first non-affine node is .*Relu"):
        graft_onnx(proto, target_tensor=layer3[-1].name, nonlinear_head="error")  # layer4 follows
    with pytest.raises(ValueError, match="through a path that avoids"):
        graft_onnx(proto, target_tensor=layer3[-3].name)  # inside a block: the skip avoids it


def test_spatial_head_without_pooling_is_refused() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(1024, 6)
    )
    proto = plain_export(model.eval())
    with pytest.raises(ValueError, match="affine but not global average pooling"):
        graft_onnx(proto, nonlinear_head="error")


def test_bad_target_tensors_and_options_are_clear_errors() -> None:
    proto = plain_export(ours("conv4"))
    with pytest.raises(ValueError, match="'nope' is not a value of the graph"):
        graft_onnx(proto, target_tensor="nope")
    pooled = next(n.output[0] for n in proto.graph.node if n.op_type == "ReduceMean")
    with pytest.raises(ValueError, match="not a feature map"):
        graft_onnx(proto, target_tensor=pooled)
    with pytest.raises(ValueError, match="does not explain a classifier"):
        graft_onnx(proto, method="fam", task="classifier")
    with pytest.raises(ValueError, match="unknown method"):
        graft_onnx(proto, method="lime")
    with pytest.raises(ValueError, match="cannot export method 'relevancecam' to ONNX"):
        graft_onnx(proto, method="relevancecam")
    with pytest.raises(ValueError, match=r"references must be \[K, 16\]"):
        graft_onnx(proto, references=np.ones((2, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="does not match the graph's fixed input size"):
        graft_onnx(proto, input_size=32)
