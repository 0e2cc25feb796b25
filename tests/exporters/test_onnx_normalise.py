"""The normalisation stage: ONNX files as real exporters write them, read as the graft needs.

Each variant of one small classifier is written the way an exporter writes it (an old
opset, a ``-1`` or symbolic batch, Constant-node weights, float16 both ways, static QDQ and
dynamic int8, an NHWC input, uint8 pixels with the preprocessing inside the graph). The
checks are identities: the normalised backbone computes what the file computes (under
onnxruntime, on the same images), the analysis copy is float32 with the same value names,
and the grafted CAM / Grad-CAM map equals the map of the float32 file within the precision's
own error.
"""

from __future__ import annotations

import tempfile
import zlib

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import user_export
from onnx_zoo import initializers_to_constants, set_batch
from torch import nn

from fam_core.exporters.graft import graft_onnx, inspect_onnx
from fam_core.exporters.onnx_normalise import normalise_graph
from fam_core.graphs.onnx_runtime import OnnxExplainer

SIZE = 32


class TinyClassifier(nn.Module):
    """Two conv blocks, global average pooling, a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def tiny(name: str = "tiny") -> nn.Module:
    torch.manual_seed(zlib.crc32(name.encode()))
    model = TinyClassifier()
    model.features[1].running_mean.uniform_(-0.2, 0.2)
    model.features[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


def export(model: nn.Module, opset: int = 17, **options: object) -> onnx.ModelProto:
    return user_export(
        model,
        torch.rand(1, 3, SIZE, SIZE),
        opset_version=opset,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
        **options,
    )


def run(proto: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    return session.run(None, {name: images})[0]


def images(batch: int = 3) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)


def cam_map(proto: onnx.ModelProto, method: str = "cam") -> np.ndarray:
    """The grafted ``method``'s maps of :func:`images`, run by :class:`OnnxExplainer`."""
    grafted = graft_onnx(proto, method=method, task="classifier")
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/grafted.onnx"
        onnx.save(grafted, path)
        return OnnxExplainer(path)(torch.from_numpy(images())).maps.numpy()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny()


@pytest.fixture(scope="module")
def reference(model: nn.Module) -> dict[str, np.ndarray]:
    proto = export(model)
    return {
        "logits": run(proto, images()),
        "cam": cam_map(proto),
        "gradcam": cam_map(proto, "gradcam"),
    }


def test_a_plain_float32_file_is_taken_as_it_is(model) -> None:
    proto = export(model)
    normalised = normalise_graph(proto)
    assert normalised.steps == ()
    assert normalised.backbone is normalised.proto


@pytest.mark.parametrize("opset", [9, 11, 13, 17])
def test_every_opset_is_converted_to_a_grafting_opset(model, reference, opset) -> None:
    proto = export(model, opset)
    normalised = normalise_graph(proto)
    version = next(e.version for e in normalised.proto.opset_import if e.domain in ("", "ai.onnx"))
    assert 14 <= version <= 20
    assert any(step.startswith(f"opset: {opset} -> 14") for step in normalised.steps) == (
        opset < 14
    )
    np.testing.assert_allclose(run(normalised.backbone, images()), reference["logits"], atol=1e-4)
    np.testing.assert_allclose(cam_map(proto), reference["cam"], atol=1e-4)


@pytest.mark.parametrize("batch", [-1, 0, "N", "batch_size", "unk__123"])
def test_every_batch_form_gives_a_dynamic_batch(model, reference, batch) -> None:
    proto = set_batch(export(model), batch)
    normalised = normalise_graph(proto)
    first = normalised.proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert first.dim_param == ("batch" if isinstance(batch, int) else batch)
    np.testing.assert_allclose(cam_map(proto), reference["cam"], atol=1e-4)
    np.testing.assert_allclose(cam_map(proto, "gradcam"), reference["gradcam"], atol=1e-4)


def test_constant_node_weights_become_initializers(model, reference) -> None:
    proto = initializers_to_constants(export(model, 11))
    assert not proto.graph.initializer
    normalised = normalise_graph(proto)
    assert not [node for node in normalised.proto.graph.node if node.op_type == "Constant"]
    assert any(step.startswith("weights:") for step in normalised.steps)
    np.testing.assert_allclose(cam_map(proto), reference["cam"], atol=1e-4)


def test_shape_arithmetic_on_constants_is_folded() -> None:
    """``Reshape(x, Concat(Cast(const), const))`` as PaddlePaddle writes it: one constant."""
    shape = numpy_helper.from_array(np.array([1, -1], np.int32), "shape32")
    nodes = [
        helper.make_node("Cast", ["shape32"], ["shape64"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["x", "shape64"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
        [shape],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    normalised = normalise_graph(proto)
    assert [node.op_type for node in normalised.proto.graph.node] == ["Reshape"]
    folded = {t.name: numpy_helper.to_array(t) for t in normalised.proto.graph.initializer}
    np.testing.assert_array_equal(folded["shape64"], [1, -1])
    assert folded["shape64"].dtype == np.int64


@pytest.mark.parametrize("keep_io_types", [True, False])
def test_a_float16_graph_keeps_its_precision_and_explains_like_float32(
    model, reference, keep_io_types
) -> None:
    float16 = pytest.importorskip("onnxconverter_common.float16")
    proto = float16.convert_float_to_float16(export(model), keep_io_types=keep_io_types)
    normalised = normalise_graph(proto)
    assert normalised.precision == "float16"
    half = [t for t in normalised.backbone.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert half, "the backbone keeps its float16 weights"
    assert all(t.data_type != TensorProto.FLOAT16 for t in normalised.proto.graph.initializer)
    fed = run(normalised.backbone, images())
    own = run(proto, images() if keep_io_types else images().astype(np.float16))
    np.testing.assert_allclose(fed, own.astype(np.float32), atol=1e-3)
    grafted = graft_onnx(proto, method="cam", task="classifier")
    kept = [t for t in grafted.graph.initializer if t.data_type == TensorProto.FLOAT16]  # type: ignore[union-attr]
    assert kept, "the grafted backbone runs in float16"
    np.testing.assert_allclose(cam_map(proto), reference["cam"], atol=2e-2)


class Calibration:
    def __init__(self) -> None:
        self.batches = iter([{"x": images(1) * 0.5} for _ in range(4)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def _quantized_static(model: nn.Module, tmp_path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat, quantize_static

    source, target = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(export(model), source)
    quantize_static(str(source), str(target), Calibration(), quant_format=QuantFormat.QDQ)
    return onnx.load(str(target))


def test_a_qdq_int8_graph_is_explained_on_its_dequantized_feature_map(
    model, reference, tmp_path
) -> None:
    proto = _quantized_static(model, tmp_path)
    normalised = normalise_graph(proto)
    assert normalised.precision == "int8 (QDQ)"
    ops = [node.op_type for node in normalised.proto.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    assert "DequantizeLinear" in [node.op_type for node in normalised.backbone.graph.node]
    grafted = graft_onnx(proto, method="cam", task="classifier")
    assert "QuantizeLinear" in [node.op_type for node in grafted.graph.node]  # type: ignore[union-attr]
    own = cam_map(proto)
    correlation = np.corrcoef(own.ravel(), reference["cam"].ravel())[0, 1]
    assert correlation > 0.9, correlation


def test_a_dynamic_int8_head_is_dequantized_for_the_analysis(model, reference, tmp_path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    source, target = tmp_path / "float.onnx", tmp_path / "dynamic.onnx"
    onnx.save(export(model), source)
    quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul", "Gemm"])
    proto = onnx.load(str(target))
    assert "MatMulInteger" in [node.op_type for node in proto.graph.node]
    normalised = normalise_graph(proto)
    assert normalised.precision == "int8 (dynamic)"
    assert "MatMulInteger" not in [node.op_type for node in normalised.proto.graph.node]
    dequantized = run(normalised.proto, images())
    np.testing.assert_allclose(dequantized, reference["logits"], atol=0.05)
    assert inspect_onnx(proto).head is not None, "the dequantized head is affine"
    np.testing.assert_allclose(cam_map(proto), reference["cam"], atol=0.05)


def _nhwc(proto: onnx.ModelProto) -> onnx.ModelProto:
    """An NHWC input ``[B, H, W, 3]`` and a ``Transpose`` to NCHW, as tf2onnx writes it."""
    name = proto.graph.input[0].name
    inner = f"{name}_nchw"
    for node in proto.graph.node:
        node.input[:] = [inner if given == name else given for given in node.input]
    proto.graph.node.insert(0, helper.make_node("Transpose", [name], [inner], perm=[0, 3, 1, 2]))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    batch, channels, height, width = (d.dim_param or d.dim_value for d in dims)
    proto.graph.input[0].CopyFrom(
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, height, width, channels])
    )
    return proto


def test_an_nhwc_input_is_fed_from_nchw_images_and_its_transpose_goes(model, reference) -> None:
    proto = _nhwc(export(model))
    normalised = normalise_graph(proto)
    assert normalised.layout == "NHWC"
    assert "Transpose" not in [node.op_type for node in normalised.proto.graph.node]
    np.testing.assert_allclose(run(normalised.backbone, images()), reference["logits"], atol=1e-4)
    text = str(inspect_onnx(proto))
    assert "64 channels" not in text and "NHWC" in text
    np.testing.assert_allclose(cam_map(proto), reference["cam"], atol=1e-4)


def test_a_uint8_input_with_preprocessing_in_the_graph_is_fed_pixels(model) -> None:
    """``Cast -> Sub -> Div`` inside the graph: fed pixel values 0-255 (mean 0, std 1/255)."""
    proto = _nhwc(export(model))
    name = proto.graph.input[0].name
    inner = f"{name}_scaled"
    for node in proto.graph.node:
        node.input[:] = [inner if given == name else given for given in node.input]
    preprocessing = [
        helper.make_node("Cast", [name], [f"{name}_float"], to=TensorProto.FLOAT),
        helper.make_node("Sub", [f"{name}_float", "offset"], [f"{name}_centred"]),
        helper.make_node("Div", [f"{name}_centred", "scale"], [inner]),
    ]
    for position, node in enumerate(preprocessing):
        proto.graph.node.insert(position, node)
    proto.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(127.5, np.float32), "offset"),
            numpy_helper.from_array(np.array(127.5, np.float32), "scale"),
        ]
    )
    proto.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    normalised = normalise_graph(proto)
    assert normalised.pixel_input and normalised.layout == "NHWC"
    pixels = np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
    nchw = pixels.transpose(0, 3, 1, 2).astype(np.float32)
    np.testing.assert_allclose(run(normalised.backbone, nchw), run(proto, pixels), atol=1e-5)
    grafted = graft_onnx(proto, method="cam", task="classifier")
    meta = {prop.key: prop.value for prop in grafted.metadata_props}  # type: ignore[union-attr]
    assert '"mean": [0.0, 0.0, 0.0]' in meta["preprocessing"]
    with pytest.raises(ValueError, match="uint8 pixels and normalises them itself"):
        graft_onnx(proto, method="cam", task="classifier", mean=(0.5, 0.5, 0.5))


def test_the_steps_are_kept_in_the_grafted_metadata_and_printed_by_inspect(model) -> None:
    proto = set_batch(export(model, 11), -1)
    grafted = graft_onnx(proto, method="cam", task="classifier")
    meta = {prop.key: prop.value for prop in grafted.metadata_props}  # type: ignore[union-attr]
    assert "opset: 11 -> 14" in meta["normalisation"]
    assert "batch: input x batch -1 -> dynamic" in meta["normalisation"]
    assert "normalised: opset: 11 -> 14" in str(inspect_onnx(proto))


def test_an_operator_the_converter_cannot_convert_is_named() -> None:
    node = helper.make_node("Upsample", ["x", "scales"], ["y"], mode="nearest")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    try:
        normalised = normalise_graph(proto)
    except ValueError as error:
        assert "Upsample" in str(error) and "\n" not in str(error)
    else:  # the converter knows Upsample 9 -> 10 -> Resize: then it must be gone
        assert "Upsample" not in [n.op_type for n in normalised.proto.graph.node]


def test_external_data_is_read_from_the_models_folder_and_a_missing_file_named(
    model, reference, tmp_path
) -> None:
    folder = tmp_path / "external"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(
        export(model), path, save_as_external_data=True, location="weights.data", size_threshold=0
    )
    assert (folder / "weights.data").is_file()
    grafted = graft_onnx(path, method="cam", task="classifier")
    with tempfile.TemporaryDirectory() as other:
        onnx.save(grafted, f"{other}/grafted.onnx")
        maps = OnnxExplainer(f"{other}/grafted.onnx")(torch.from_numpy(images())).maps.numpy()
    np.testing.assert_allclose(maps, reference["cam"], atol=1e-4)
    (folder / "weights.data").unlink()
    with pytest.raises(ValueError, match=r"keeps its weights in 'weights.data'.*missing") as error:
        graft_onnx(path, method="cam", task="classifier")
    assert "\n" not in str(error.value)


def test_an_input_without_shape_gets_rank_4_from_its_first_conv(model, reference) -> None:
    proto = export(model)
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    normalised = normalise_graph(proto)
    dims = normalised.proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims] == ["batch", 3, "height", "width"]
    grafted = graft_onnx(proto, method="cam", task="classifier", input_size=SIZE)
    with tempfile.TemporaryDirectory() as folder:
        onnx.save(grafted, f"{folder}/grafted.onnx")
        maps = OnnxExplainer(f"{folder}/grafted.onnx")(torch.from_numpy(images())).maps.numpy()
    np.testing.assert_allclose(maps, reference["cam"], atol=1e-4)


def test_a_stated_layout_wins_and_the_config_key_reaches_the_graft(model) -> None:
    from fam_core.models.store import ModelConfig
    from fam_core.pipeline.onnx_backend import graft_options

    proto = _nhwc(export(model))
    assert normalise_graph(proto).layout == "NHWC"
    assert normalise_graph(proto, layout="NCHW").layout == "NCHW"
    config = ModelConfig(name="m", task="classifier", onnx="m.onnx", layout="NHWC")
    assert graft_options(config)["layout"] == "NHWC"
    with pytest.raises(ValueError, match="layout: expected NCHW or NHWC"):
        ModelConfig(name="m", task="classifier", onnx="m.onnx", layout="channels_last")
