"""Grafting onto foreign ONNX graphs whose target is a token sequence or whose head is not affine.

Models from Hugging Face ``transformers`` configs (small sizes, seeded random init, nothing
downloaded), exported as a user would: plain ``torch.onnx.export`` (``dynamo=False``,
opset 17, default value names), then ``onnx.shape_inference``. The grafted graph, run by
onnxruntime, must match the torch explainer on the same weights at the same target layer
(heatmap, low-resolution map, weights and scores): FAM through the class token's last block
is FAM with the head's per-sample Jacobian (``nonlinear_head="jacobian"``), recorded in the
metadata as ``head: jacobian``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper
from onnx_helpers import user_export
from torch import nn

from fam_core.explainers import get_explainer
from fam_core.exporters.graft import find_target_tensors, graft_onnx, inspect_onnx
from fam_core.exporters.onnx_torch import SUPPORTED_OPS, OnnxModule, unsupported_ops
from fam_core.graphs import onnx_format as fmt
from fam_core.graphs.onnx_runtime import OnnxExplainer

transformers = pytest.importorskip("transformers")

SIZE = 32
RTOL, ATOL = 1e-4, 2e-5  # torch vs onnxruntime, float32
HEATMAP_ATOL = 1e-4  # min-max normalised maps in [0, 1]


class Pooled(nn.Module):
    """A transformers model's ``pooler_output``: the embedding the user serves."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).pooler_output


class PatchMean(nn.Module):
    """Mean of the patch tokens after the final LayerNorm, then a linear projection."""

    def __init__(self, model: nn.Module, dim: int = 12) -> None:
        super().__init__()
        self.model = model
        self.projection = nn.Linear(model.config.hidden_size, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.model(pixel_values).last_hidden_state
        return self.projection(tokens[:, 1:].mean(dim=1))


def vit_config(layers: int = 2) -> object:
    return transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=SIZE,
        patch_size=8,
    )


def vit() -> nn.Module:
    torch.manual_seed(0)
    return Pooled(transformers.ViTModel(vit_config())).eval()


def dinov2() -> nn.Module:
    torch.manual_seed(1)
    config = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=SIZE,
        patch_size=8,
    )
    return Pooled(transformers.Dinov2Model(config)).eval()


def patch_mean() -> nn.Module:
    torch.manual_seed(2)
    return PatchMean(transformers.ViTModel(vit_config(1), add_pooling_layer=False)).eval()


MODELS = {"vit": vit, "dinov2": dinov2}


def plain_export(model: nn.Module) -> onnx.ModelProto:
    """``torch.onnx.export`` as a user writes it (a dynamic batch), then shape inference."""
    proto = user_export(
        model,
        torch.rand(1, 3, SIZE, SIZE),
        opset_version=17,
        input_names=["pixel_values"],
        dynamic_axes={"pixel_values": {0: "batch"}},
    )
    return onnx.shape_inference.infer_shapes(proto)


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs=None) -> list[np.ndarray]:
    present = {value.name for value in proto.graph.output}
    if any(name not in present for name in outputs or ()):
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        for name in outputs:
            if name not in present:
                proto.graph.output.append(helper.make_empty_tensor_value_info(name))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(outputs, feeds)


def hooked(model: nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(
        lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    return captured[0]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def exported() -> dict[str, tuple[nn.Module, onnx.ModelProto]]:
    return {name: (build(), plain_export(build())) for name, build in MODELS.items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_automatic_target_is_the_torch_explainers_layer(exported, images, name) -> None:
    model, proto = exported[name]
    explainer = get_explainer("fam")(model, None, task="embedding", input_size=SIZE)
    chosen = inspect_onnx(proto).chosen
    # the block before the last: the last block's patch tokens never reach the class token
    assert explainer.target_layer.endswith(".0")
    assert chosen.layout.kind == "tokens" and chosen.layout.prefix == 1
    assert chosen.layout.grid == (4, 4) and chosen.block
    (value,) = run(proto, {"pixel_values": images.numpy()}, [chosen.name])
    expected = hooked(model, explainer.target_layer, images)
    np.testing.assert_allclose(value, expected.numpy(), rtol=RTOL, atol=ATOL)
    # the last block's output is a candidate too, but its patches do not reach the output
    later = [c for c in find_target_tensors(proto) if c.block][-1]
    assert later.name != chosen.name and later.shape == chosen.shape


@pytest.mark.parametrize("method", ["fam", "gradfam"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_class_token_models_match_the_torch_explainer(exported, images, name, method) -> None:
    model, proto = exported[name]
    grafted = graft_onnx(proto, method=method)
    meta = {p.key: p.value for p in grafted.metadata_props}
    assert meta["head"] == "jacobian" and meta[fmt.KEY_METHOD] == method
    references = torch.randn(2, 32, generator=torch.Generator().manual_seed(6))
    embedding, scores, heatmap, lowres, weights = run(
        grafted, {"image": images.numpy(), "references": references.numpy()}
    )
    explainer = get_explainer(method)(model, None, task="embedding", input_size=SIZE)
    assert meta[fmt.KEY_TARGET_LAYER] == inspect_onnx(proto).chosen.name
    expected = explainer(images, target=references)
    with torch.no_grad():
        np.testing.assert_allclose(embedding, model(images).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(scores.mean(axis=1), expected.scores.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(weights, expected.weights.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(lowres, expected.raw.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(heatmap, expected.maps.numpy(), atol=HEATMAP_ATOL)
    assert float(np.ptp(heatmap[0])) > 0.5  # a real map, not a flat one
    if method == "fam":
        assert expected.extras["head"] == "jacobian"
        # the Jacobian is per sample: an item explained alone gets the same map
        single = run(grafted, {"image": images[1:2].numpy(), "references": references.numpy()})
        np.testing.assert_allclose(single[2][0], heatmap[1], atol=HEATMAP_ATOL)


def test_the_interpreted_class_token_head_computes_the_class_tokens_rows_only(exported) -> None:
    """MatMuls with a constant weight run as nn.Linear layers, so the head's token rows that
    never reach the class token are left out (fam_core.anatomy.head_rows), as on the torch model."""
    from fam_core.exporters.interpreted import head_explainer
    from fam_core.exporters.onnx_dataflow import analyse_graph, head_graph

    _, proto = exported["vit"]
    graph = analyse_graph(proto, None, None)
    target = inspect_onnx(proto).chosen
    explainer = head_explainer(head_graph(graph, target.name), "fam", target.layout, "embedding")
    tokens = torch.rand(2, *target.shape, generator=torch.Generator().manual_seed(7))
    first = explainer.forward(tokens, graph=True)  # finds the plan after its own pass
    (plan,) = explainer._row_plans.values()
    linears = explainer.model.onnx_head.linears
    assert len(plan) == 4 and all(rows == (0,) for rows in plan.values())  # q, o, fc1, fc2
    assert len(linears) == 6  # the last block's q, k, v, o, fc1, fc2 (k, v need every row)
    pruned = explainer.forward(tokens, graph=True)
    torch.testing.assert_close(pruned.outputs, first.outputs, rtol=1e-5, atol=1e-6)


class Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).logits


def test_a_vit_classifier_is_grafted_with_gradcam_and_cam_is_refused(images) -> None:
    torch.manual_seed(4)
    config = vit_config()
    config.num_labels = 5
    model = Logits(transformers.ViTForImageClassification(config)).eval()
    proto = plain_export(model)
    grafted = graft_onnx(proto, method="gradcam", class_input=True)
    classes = np.array([1, 2, 4])
    logits, heatmap, lowres, weights = run(
        grafted, {"image": images.numpy(), "class_index": classes}
    )
    explainer = get_explainer("gradcam")(model, None, task="classifier", input_size=SIZE)
    expected = explainer(images, target=classes.tolist())
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(images).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(weights, expected.weights.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(lowres, expected.raw.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(heatmap, expected.maps.numpy(), atol=HEATMAP_ATOL)
    # CAM needs a linear classifier after the target: refused as the torch CAM refuses it
    with pytest.raises(ValueError, match="CAM needs global average pooling and a linear"):
        graft_onnx(proto, method="cam")


def test_a_mean_pooled_token_model_is_grafted_with_its_linear_head(images, tmp_path) -> None:
    model = patch_mean()
    proto = plain_export(model)
    layer_norm = next(
        n.output[0]
        for n in proto.graph.node
        if n.op_type == "LayerNormalization" and "/layernorm/" in n.name
    )
    path = graft_onnx(proto, method="fam", target_tensor=layer_norm, out_path=tmp_path / "m.onnx")
    served = OnnxExplainer(path)
    references = torch.randn(4, 12, generator=torch.Generator().manual_seed(7))
    got = served(images.numpy(), references.numpy())
    explainer = get_explainer("fam")(model, "model.layernorm", task="embedding")
    expected = explainer(images, target=references)
    assert expected.extras["head"] == "linear"  # W mean(patches) + b: eq. 16-18 exactly
    assert got.extras["head"] == "linear"
    np.testing.assert_allclose(got.weights, expected.weights, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got.raw, expected.raw, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got.maps, expected.maps, atol=HEATMAP_ATOL)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=RTOL, atol=ATOL)


class ChannelLast(nn.Module):
    """A Swin-style layout: maps ``[B, h, w, C]``, LayerNorm per position, mean, MLP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.patches = nn.Conv2d(3, 16, 4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.norm(self.patches(images).permute(0, 2, 3, 1))  # [B, 8, 8, 16]
        return self.mlp(maps.mean(dim=(1, 2)))


def test_a_channel_last_target_is_found_and_grafted(images) -> None:
    model = ChannelLast().eval()
    proto = plain_export(model)
    report = inspect_onnx(proto)
    assert report.chosen.layout.kind == "channels_last" and report.chosen.shape == (8, 8, 16)
    assert report.head_kind == "jacobian"  # the MLP's GELU
    grafted = graft_onnx(proto, method="fam")
    references = torch.randn(3, 8, generator=torch.Generator().manual_seed(8))
    _, scores, heatmap, lowres, weights = run(
        grafted, {"image": images.numpy(), "references": references.numpy()}
    )
    expected = get_explainer("fam")(model, "norm", task="embedding")(images, target=references)
    np.testing.assert_allclose(weights, expected.weights.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(lowres, expected.raw.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(heatmap, expected.maps.numpy(), atol=HEATMAP_ATOL)
    np.testing.assert_allclose(scores.mean(axis=1), expected.scores.numpy(), rtol=RTOL, atol=ATOL)


def test_inspect_reports_tokens_blocks_and_the_jacobian_head(exported) -> None:
    _, proto = exported["dinov2"]
    report = inspect_onnx(proto)
    text = str(report)
    assert report.head is None and report.head_error is None and report.head_kind == "jacobian"
    assert f"chosen target tensor: {report.chosen.name}" in text
    assert "tokens, 1 leading, grid 4x4  block" in text
    assert "head: jacobian: " in text and "interpreted in torch" in text
    assert "LayerNormalization" in text  # the head's ops are listed


def test_inspect_reads_a_vit_classifier_exported_with_a_fixed_batch_of_one() -> None:
    """A batch of 1 baked into the head's Reshape shapes: the head is probed in chunks of 1."""
    torch.manual_seed(4)
    config = vit_config()
    config.num_labels = 5
    model = Logits(transformers.ViTForImageClassification(config)).eval()
    proto = user_export(
        model, torch.rand(1, 3, SIZE, SIZE), opset_version=17, input_names=["pixel_values"]
    )
    report = inspect_onnx(onnx.shape_inference.infer_shapes(proto))
    assert report.head_kind == "jacobian" and report.head_error is None
    assert "interpreted in torch" in str(report)


class Atan(nn.Module):
    """Conv patches as tokens, their mean, then an operator the graft cannot interpret."""

    def __init__(self) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, 8, 8, stride=8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(images).flatten(2).transpose(1, 2)  # [B, 16, 8]
        return torch.atan(tokens.mean(dim=1))


def test_an_unsupported_op_in_the_head_is_named_in_one_line() -> None:
    proto = plain_export(Atan().eval())
    with pytest.raises(ValueError, match="the head uses the ONNX operator Atan") as error:
        graft_onnx(proto, method="fam")
    assert "\n" not in str(error.value) and "LayerNormalization" in str(error.value)
    assert "Atan" in (inspect_onnx(proto).head_error or "")


def test_a_target_that_is_no_map_nor_token_sequence_says_what_was_expected(exported) -> None:
    _, proto = exported["vit"]
    pooled = next(
        n.output[0] for n in proto.graph.node if n.op_type == "Gather" and "pooler" in n.name
    )  # the class token [B, 32]
    with pytest.raises(ValueError, match=r"not a feature map \[B, C, h, w\], a token sequence"):
        graft_onnx(proto, target_tensor=pooled)


def test_nonlinear_head_error_refuses_the_jacobian(exported) -> None:
    _, proto = exported["vit"]
    with pytest.raises(ValueError, match="is not linear .*nonlinear_head='jacobian'"):
        graft_onnx(proto, method="fam", nonlinear_head="error")


def _graph(nodes, inputs, output, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _const(name: str, values, dtype=np.float32) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def test_the_interpreter_matches_onnxruntime_op_by_op() -> None:
    """A graph using the shape ops (Shape, Gather, Concat, Slice, Reshape...) and the maths
    ops of transformer heads, run by :class:`OnnxModule` and by onnxruntime."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "dims"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["r"]),  # [B, 5, 2, 3]
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3]),
        helper.make_node("Softmax", ["t"], ["s"], axis=-1),
        helper.make_node("Erf", ["s"], ["e"]),
        helper.make_node("Transpose", ["e"], ["t2"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["t2", "flat"], ["y"]),  # [B, 5, 6]
        helper.make_node("LayerNormalization", ["y", "gamma", "beta"], ["n"], epsilon=1e-5),
        helper.make_node("Split", ["n", "halves"], ["a", "b"], axis=2),
        helper.make_node("Mul", ["a", "b"], ["m"]),
        helper.make_node("Pow", ["m", "two"], ["p"]),
        helper.make_node("Sqrt", ["p"], ["q"]),
        helper.make_node("Slice", ["q", "s0", "s1", "s_ax"], ["sl"]),  # tokens 1:
        helper.make_node("ReduceMean", ["sl"], ["mean"], axes=[1], keepdims=0),
        helper.make_node("Gemm", ["mean", "w", "c"], ["g"], transB=1, alpha=0.5),
        helper.make_node("Tanh", ["g"], ["th"]),
        helper.make_node("Sigmoid", ["th"], ["sg"]),
        helper.make_node("Div", ["sg", "two"], ["out"]),
    ]
    initializers = [
        _const("zero", 0, np.int64),
        _const("axes0", [0], np.int64),
        _const("dims", [5, 2, 3], np.int64),
        _const("flat", [0, 5, 6], np.int64),
        _const("gamma", rng.standard_normal(6)),
        _const("beta", rng.standard_normal(6)),
        _const("halves", [3, 3], np.int64),
        _const("two", 2.0),
        _const("s0", [1], np.int64),
        _const("s1", [2**62], np.int64),
        _const("s_ax", [1], np.int64),
        _const("w", rng.standard_normal((4, 3))),
        _const("c", rng.standard_normal(4)),
    ]
    proto = _graph(nodes, [("x", ["batch", 30])], "out", initializers)
    x = rng.standard_normal((3, 30)).astype(np.float32)
    (want,) = run(proto, {"x": x})
    got = OnnxModule(proto)(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert unsupported_ops(proto) == []
    assert {"MatMul", "Gemm", "LayerNormalization", "Softmax", "Erf"} <= set(SUPPORTED_OPS)
