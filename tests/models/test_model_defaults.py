"""Defaults that fit the model: the default method per architecture, heads called linear only
when they are, and maps with no spatial information flagged, never served silently.

Models are ``transformers`` classifiers and embedding models from small configs with seeded
random weights (``hf_factories.py``: convolutions He-initialised, BatchNorm at (1, 0)),
served from ``factory:`` configs and plain ONNX files through the one pipeline and the CLI.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from serving_helpers import png_bytes
from torch import nn

from fam_core.anatomy.head_fit import fit_head
from fam_core.cli import main
from fam_core.explainers import get_explainer
from fam_core.explainers.cam.cam import CAM
from fam_core.explanation import Explanation
from fam_core.pipeline import (
    EncodedImage,
    ExplainRequest,
    ModelRegistry,
    Pipeline,
    heatmap_from_bytes,
)
from fam_core.pipeline.json_codec import result_to_json
from fam_core.pipeline.oip_codec import infer_response
from fam_core.server.fam_service import result_to_proto
from fam_core.server.stubs import grpc_service_pb2

pytest.importorskip("transformers")
import hf_factories  # noqa: E402 - needs transformers

SIZE = hf_factories.SIZE
# factory -> (task, default method)
DEFAULTS = {
    "resnet_classifier": ("classifier", "cam"),  # mean then a linear classifier
    "convnext_classifier": ("classifier", "gradcam"),  # LayerNorm after the mean
    "vit_classifier": ("classifier", "gradcam"),  # class token
    "deit_classifier": ("classifier", "gradcam"),
    "beit_classifier": ("classifier", "gradcam"),
    "swinv2_classifier": ("classifier", "gradcam"),
    "resnet": ("embedding", "fam"),
}


def write_model(root: Path, factory: str, task: str, **keys: object) -> Path:
    folder = root / factory
    folder.mkdir()
    shutil.copy(hf_factories.__file__, folder)
    config = {"name": factory, "task": task, "factory": f"hf_factories:{factory}"}
    config.update(input_size=SIZE, **keys)
    if task == "embedding":
        config["output"] = "pooler_output"
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder / "config.yaml"


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("defaults")
    found = {name: write_model(root, name, task) for name, (task, _) in DEFAULTS.items()}
    found["mobilevit_collapsed"] = write_model(root, "mobilevit_collapsed", "classifier")
    return found


@pytest.fixture(scope="module")
def pipeline(configs) -> Pipeline:
    return Pipeline(ModelRegistry.load(list(configs.values()), keep_going=False), batching=None)


def explain(pipeline: Pipeline, name: str, method: str | None = None):  # type: ignore[no-untyped-def]
    request = ExplainRequest(name, (EncodedImage(png_bytes(1, (SIZE, SIZE))),), method=method)
    return pipeline.explain(request).results[0]


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_the_default_request_works_with_the_method_the_model_allows(pipeline, name) -> None:
    task, expected = DEFAULTS[name]
    served = pipeline.registry.get(name)
    assert served.default_method == expected, served.default_choice
    result = explain(pipeline, name)
    assert result.heatmap is not None and result.heatmap.method == expected
    assert result.heatmap.warning == ""
    heatmap = heatmap_from_bytes(result.heatmap.data, result.heatmap.shape)
    assert float(heatmap.amax() - heatmap.amin()) > 0.5  # a map, not a flat one
    named = explain(pipeline, name, expected)  # the same as asking for the method by name
    assert named.heatmap is not None
    again = heatmap_from_bytes(named.heatmap.data, named.heatmap.shape)
    assert torch.allclose(again, heatmap, atol=2e-3)


def test_the_default_says_why(pipeline) -> None:
    assert "linear classifier" in pipeline.registry.get("resnet_classifier").default_choice.reason
    reason = pipeline.registry.get("convnext_classifier").default_choice.reason
    assert "CAM cannot read" in reason and "convnext.layernorm" in reason
    assert pipeline.registry.get("resnet").default_choice.reason == "an embedding model"


def test_the_config_method_still_wins(tmp_path) -> None:
    config = write_model(tmp_path, "convnext_classifier", "classifier", method="fam")
    served = ModelRegistry.load([config], keep_going=False).get("convnext_classifier")
    assert served.default_method == "fam"
    assert served.default_choice.reason == "the config's method"


def test_a_plain_onnx_classifier_defaults_to_gradcam_where_cam_cannot_read_it(
    tmp_path, capsys
) -> None:
    from onnx_helpers import user_export

    model = hf_factories.convnext_classifier()
    folder = tmp_path / "convnext-onnx"
    folder.mkdir()
    user_export(model, torch.rand(1, 3, SIZE, SIZE), folder / "model.onnx")
    (folder / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "convnext-onnx",
                "task": "classifier",
                "onnx": "model.onnx",
                "input_size": SIZE,
            }
        )
    )
    registry = ModelRegistry.load([folder / "config.yaml"], keep_going=False)
    served = registry.get("convnext-onnx")
    assert served.default_method == "gradcam" and served.methods == ("gradcam",)
    assert "CAM needs global average pooling" in served.default_choice.reason
    result = explain(Pipeline(registry, batching=None), "convnext-onnx")
    assert result.heatmap is not None and result.heatmap.method == "gradcam"
    assert main(["inspect", str(folder / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert "default method (classifier): gradcam (a classifier whose head CAM cannot read" in out


def test_cli_inspect_prints_the_default_and_explain_uses_it(configs, tmp_path, capsys) -> None:
    assert main(["inspect", str(configs["convnext_classifier"])]) == 0
    out = capsys.readouterr().out
    assert "default method: gradcam (a classifier whose head CAM cannot read: found " in out
    image = tmp_path / "image.png"
    image.write_bytes(png_bytes(2, (SIZE, SIZE)))
    out_dir = tmp_path / "out"
    code = main(
        ["explain", str(image), "--model", str(configs["vit_classifier"]), "--out", str(out_dir)]
    )
    assert code == 0 and (out_dir / "image_gradcam.png").is_file()
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["resnet_classifier", "convnext_classifier", "resnet"])
def test_fam_export_defaults_to_the_method_the_model_is_served_with(configs, name) -> None:
    from fam_core.commands.export import model_default_method
    from fam_core.models.store import load_model

    model, config = load_model(configs[name])
    assert model_default_method(model, config, None, None) == DEFAULTS[name][1]


# -- heads: linear only when they are


def classifier_head(model: nn.Module, layer: str, images: torch.Tensor):  # type: ignore[no-untyped-def]
    explainer = CAM(model, layer, task="classifier")
    forward = explainer.forward(images)
    return explainer.head_for(forward, images)


@pytest.mark.parametrize(
    ("factory", "layer", "kind"),
    [
        ("mobilevit_classifier", "mobilevit.conv_1x1_exp.convolution", "jacobian"),  # BN, SiLU
        ("mobilevit_collapsed", "mobilevit.conv_1x1_exp.convolution", "jacobian"),  # zero maps
        ("efficientnet_classifier", "efficientnet.encoder.top_conv", "jacobian"),  # BN, SiLU
        ("efficientnet_classifier", "efficientnet.encoder.top_activation", "linear"),
        ("convnext_classifier", "convnext.encoder.stages.3", "jacobian"),  # LayerNorm
    ],
)
def test_a_head_is_linear_only_when_it_is(factory, layer, kind) -> None:
    model = getattr(hf_factories, factory)()
    images = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    head = classifier_head(model, layer, images)
    assert head.kind == kind, head
    if kind == "linear":  # mean, dropout (eval), then the classifier: W is its weight
        assert torch.allclose(head.matrix, model.classifier.weight, atol=1e-5)


def fitted_kind(head, maps: torch.Tensor) -> str:  # type: ignore[no-untyped-def]
    """The kind :func:`fit_head` finds for the function ``head`` of maps ``[1, N, h, w]``."""

    def run_graph(probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = probe.detach().requires_grad_(True)
        with torch.enable_grad():
            return leaf, head(leaf)

    found = fit_head(
        maps, head(maps), module_head=None, pooling="avg", run=head, run_graph=run_graph
    )
    return str(found.kind)


@pytest.mark.parametrize("scale", [0.0, 1e-4])
def test_an_activation_in_its_nearly_linear_range_is_not_called_linear(scale) -> None:
    """All-zero maps, or maps so small that SiLU is linear to 1e-4 on them, test nothing."""
    maps = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * scale
    weight = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    bias = 10.0  # large next to the change the maps make

    def silu(probe: torch.Tensor) -> torch.Tensor:
        return F.silu(probe.mean(dim=(2, 3))) @ weight + bias

    def linear(probe: torch.Tensor) -> torch.Tensor:
        return probe.mean(dim=(2, 3)) @ weight + bias

    assert fitted_kind(silu, maps) == "jacobian"
    assert fitted_kind(linear, maps) == "linear"


# -- maps with no spatial information


def test_a_collapsed_model_is_flagged_not_served_silently(pipeline, caplog) -> None:
    served = pipeline.registry.get("mobilevit_collapsed")
    assert served.default_method == "gradcam"  # its head is not linear, even on zero maps
    with caplog.at_level(logging.WARNING, logger="fam_core.pipeline"):
        result = explain(pipeline, "mobilevit_collapsed")
    heatmap = result.heatmap
    assert (
        heatmap is not None and float(heatmap_from_bytes(heatmap.data, heatmap.shape).amax()) == 0
    )
    assert heatmap.warning.startswith(
        "the heatmap is flat, not an explanation: the map is all zeros"
    )
    assert heatmap.warning in caplog.text
    assert result_to_json(result)["heatmap"]["warning"] == heatmap.warning
    assert result_to_proto(result).heatmap.warning == heatmap.warning
    response = pipeline.explain(
        ExplainRequest(
            "mobilevit_collapsed",
            (EncodedImage(png_bytes(1, (SIZE, SIZE))),),
        )
    )
    message = infer_response(response, ["heatmap"], "1", grpc_service_pb2.ModelInferResponse)
    assert message.outputs[0].parameters["warning"].string_param == f"image 0: {heatmap.warning}"
    healthy = explain(pipeline, "resnet_classifier")
    assert "warning" not in result_to_json(healthy)["heatmap"]


def test_fam_explain_prints_a_warning_for_a_flat_map(configs, tmp_path, capsys) -> None:
    image = tmp_path / "image.png"
    image.write_bytes(png_bytes(3, (SIZE, SIZE)))
    model = str(configs["mobilevit_collapsed"])
    assert main(["explain", str(image), "--model", model, "--out", str(tmp_path / "o")]) == 0
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert line.startswith(f"fam: warning: {image}: the heatmap is flat, not an explanation")


def test_explanation_says_why_a_map_is_flat() -> None:
    one = get_explainer("fam")(
        nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.AdaptiveAvgPool2d(1), nn.Flatten()), "1"
    )(torch.rand(2, 3, 8, 8))  # the target layer's map is 1x1
    assert one.extras["flat"].tolist() == [True, True] and "1x1" in one.extras["flat_reason"]
    maps = torch.zeros(2, 4, 4)
    maps[1, 0, 0] = 1.0
    zeros = Explanation(maps, torch.zeros(2, 2, 2), torch.zeros(2, 3), torch.zeros(2), "m", "l")
    assert zeros.extras["flat"].tolist() == [True, False]
    assert zeros.extras["flat_reason"].startswith("every channel weight is zero")
    assert zeros[1].extras["flat_reason"] == ""  # the slice has no flat map


def test_the_onnx_graft_probes_random_maps_too(tmp_path) -> None:
    """A SiLU after maps that are all zeros: affine on them, not on any other map."""
    from onnx_helpers import user_export

    from fam_core.exporters.onnx_head import NotAffine, analyse_head

    conv = nn.Conv2d(3, 4, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    model = nn.Sequential(conv, nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    path = tmp_path / "silu.onnx"
    proto = user_export(
        model.eval(), torch.rand(1, 3, 8, 8), path, input_names=["x"], output_names=["y"]
    )
    (conv_output,) = [n.output[0] for n in proto.graph.node if n.op_type == "Conv"]
    with pytest.raises(NotAffine, match="Sigmoid|Mul"):
        analyse_head(path, conv_output, input_size=8)
