"""The rewrites that make a grafted graph cheap under onnxruntime keep its outputs.

Bilinear upsampling as two matrix products against onnxruntime's own ``Resize`` and
torch's ``F.interpolate``; the channel pick as ``Squeeze``; int8 activation pairs as uint8
against the same graph before the rewrite, and onnxruntime's fusion of a quantized backbone
that a tapped feature map used to stop.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from fam_core.exporters.graft import graft_onnx
from fam_core.exporters.onnx_graph import make_session, prune_graph
from fam_core.exporters.onnx_lean import interpolation_matrix, lean_rewrites

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from onnx_zoo import Zoo  # noqa: E402

pytest.importorskip("onnxruntime")


def _resize_model(
    source: tuple[int, int], target: tuple[int, int], coordinates: str
) -> onnx.ModelProto:
    """``[B, 1, *source]`` -> ``Resize`` (linear, ``sizes``) -> ``Gather`` channel 0."""
    sizes = numpy_helper.from_array(np.array([2, 1, *target], np.int64), "sizes")
    zero = numpy_helper.from_array(np.array(0, np.int64), "zero")
    nodes = [
        helper.make_node(
            "Resize",
            ["x", "", "", "sizes"],
            ["up"],
            mode="linear",
            coordinate_transformation_mode=coordinates,
        ),
        helper.make_node("Gather", ["up", "zero"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, *source])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, *target])],
        [sizes, zero],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("source", "target", "coordinates"),
    [
        ((4, 4), (32, 32), "half_pixel"),
        ((1, 48), (48, 192), "pytorch_half_pixel"),
        ((3, 5), (7, 11), "half_pixel"),  # ratios that are not whole numbers
        ((8, 6), (3, 6), "pytorch_half_pixel"),  # down on one axis, the other unchanged
    ],
)
def test_matmul_upsampling_matches_onnxruntime_resize(source, target, coordinates):
    model = _resize_model(source, target, coordinates)
    x = np.random.default_rng(0).standard_normal((2, 1, *source)).astype(np.float32)
    expected = make_session(model).run(None, {"x": x})[0]  # type: ignore[attr-defined]
    shapes = {"x": (2, 1, *source), "up": (2, 1, *target)}
    assert lean_rewrites(model, shapes) == 2  # the Resize and the Gather
    ops = [node.op_type for node in model.graph.node]
    assert "Resize" not in ops and "Gather" not in ops and "Squeeze" in ops
    got = make_session(model).run(None, {"x": x})[0]  # type: ignore[attr-defined]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_upsampling_of_a_3d_map_needs_no_channel_axis():
    # [B, h, w] -> Unsqueeze(1) -> Resize -> Gather(0, axis 1): two MatMuls on [B, h, w]
    model = _resize_model((4, 6), (16, 9), "pytorch_half_pixel")
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axis"))
    graph.node.insert(0, helper.make_node("Unsqueeze", ["map", "axis"], ["x"]))
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("map", TensorProto.FLOAT, [2, 4, 6]))
    maps = np.random.default_rng(1).standard_normal((2, 4, 6)).astype(np.float32)
    expected = make_session(model).run(None, {"map": maps})[0]  # type: ignore[attr-defined]
    assert lean_rewrites(model, {"x": (2, 1, 4, 6), "up": (2, 1, 16, 9)}) == 1
    prune_graph(graph)
    assert [(node.op_type, node.input[0]) for node in graph.node] == [
        ("MatMul", "map"),
        ("MatMul", "up/rows"),
    ]
    got = make_session(model).run(None, {"map": maps})[0]  # type: ignore[attr-defined]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_scaled_gathers_and_direct_reshapes_keep_the_values():
    table = np.random.default_rng(2).standard_normal((5, 6)).astype(np.float32)
    constants = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(np.array(9.0, np.float32), "area"),
        numpy_helper.from_array(np.array([1], np.int64), "axis"),
        numpy_helper.from_array(np.array([-1, 2, 3], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "index"], ["rows"]),
        helper.make_node("Div", ["rows", "area"], ["weights"]),  # Grad-CAM's W[c] / hw
        helper.make_node("Unsqueeze", ["weights", "axis"], ["column"]),
        helper.make_node("Squeeze", ["column", "axis"], ["flat"]),
        helper.make_node("Reshape", ["flat", "shape"], ["grid"]),
    ]
    graph = helper.make_graph(
        nodes,
        "scaled",
        [helper.make_tensor_value_info("index", TensorProto.INT64, [4])],
        [
            helper.make_tensor_value_info("weights", TensorProto.FLOAT, [4, 6]),
            helper.make_tensor_value_info("grid", TensorProto.FLOAT, [4, 2, 3]),
        ],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"index": np.array([4, 0, 2, 4], np.int64)}
    expected = make_session(model).run(None, feeds)  # type: ignore[attr-defined]
    assert lean_rewrites(model, {}) == 2
    prune_graph(model.graph)
    assert [node.op_type for node in model.graph.node] == ["Gather", "Unsqueeze", "Reshape"]
    got = make_session(model).run(None, feeds)  # type: ignore[attr-defined]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_interpolation_matrix_is_torch_bilinear_upsampling():
    raw = torch.rand(3, 1, 4, 6)
    expected = F.interpolate(raw, size=(16, 9), mode="bilinear", align_corners=False)
    rows = torch.from_numpy(interpolation_matrix(4, 16, "pytorch_half_pixel"))
    columns = torch.from_numpy(interpolation_matrix(6, 9, "pytorch_half_pixel"))
    torch.testing.assert_close(rows @ raw @ columns.T, expected, rtol=1e-5, atol=1e-6)


def test_interpolation_matrix_by_hand():
    # 2 -> 4 samples at x = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1)
    assert interpolation_matrix(2, 4, "half_pixel").tolist() == [
        [1.0, 0.0],
        [0.75, 0.25],
        [0.25, 0.75],
        [0.0, 1.0],
    ]
    assert interpolation_matrix(3, 1, "pytorch_half_pixel").tolist() == [[1.0, 0.0, 0.0]]
    assert interpolation_matrix(3, 1, "half_pixel").tolist() == [[0.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="align_corners"):
        interpolation_matrix(2, 4, "align_corners")


def test_other_resizes_are_left_alone():
    model = _resize_model((4, 4), (8, 8), "align_corners")
    nearest = _resize_model((4, 4), (8, 8), "half_pixel")
    for attribute in nearest.graph.node[0].attribute:
        if attribute.name == "mode":
            attribute.s = b"nearest"
    shapes = {"x": (2, 1, 4, 4), "up": (2, 1, 8, 8)}
    for proto in (model, nearest):
        lean_rewrites(proto, shapes)
        assert [node.op_type for node in proto.graph.node] == ["Resize", "Squeeze"]


def _fused_ops(proto: onnx.ModelProto, folder: Path) -> list[str]:
    """The operators onnxruntime runs after its graph optimisations."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(folder / "optimised.onnx")
    options.log_severity_level = 4
    onnxruntime.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


def test_grafted_qdq_backbone_stays_fused(tmp_path):
    model = Zoo(tmp_path)["qdq-int8"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grafted = graft_onnx(model.path, method="cam", input_size=model.input_size)
    original = _fused_ops(onnx.load(model.path), tmp_path)
    fused = _fused_ops(grafted, tmp_path)  # type: ignore[arg-type]
    for op in ("QLinearConv", "QLinearGlobalAveragePool"):
        assert fused.count(op) == original.count(op) > 0, op
    assert "Conv" not in fused and "GlobalAveragePool" not in fused
    # the map is dequantized channel-last, where the fused convolution leaves it: no
    # Transpose back to NCHW for the head (the rewrite's transpose cancels onnxruntime's)
    assert fused.count("Transpose") == original.count("Transpose")
    head = [node for node in grafted.graph.node if node.op_type == "Transpose"]  # type: ignore[union-attr]
    assert [helper.get_attribute_value(node.attribute[0]) for node in head] == [[0, 2, 3, 1]]


def test_channel_last_map_gives_the_same_heatmap():
    """``MatMul(w [B, 1, C], Reshape(map, [B, C, h*w]))`` and its channel-last form agree
    with the map weighted by hand (``einsum``) on a dequantized ``[2, 3, 2, 4]`` map."""
    generator = np.random.default_rng(3)
    q = generator.integers(0, 255, (2, 3, 2, 4)).astype(np.uint8)
    w = generator.standard_normal((2, 3)).astype(np.float32)
    constants = [
        numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
        numpy_helper.from_array(np.array(7, np.uint8), "zero"),
        numpy_helper.from_array(np.array([0, 0, -1], np.int64), "flat"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([-1, 2, 4], np.int64), "map_shape"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["a"]),
        helper.make_node("Reshape", ["a", "flat"], ["a_flat"]),
        helper.make_node("Unsqueeze", ["w", "axis1"], ["w_row"]),
        helper.make_node("MatMul", ["w_row", "a_flat"], ["m"]),
        helper.make_node("Reshape", ["m", "map_shape"], ["heatmap_lowres"]),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [
            helper.make_tensor_value_info("q", TensorProto.UINT8, [2, 3, 2, 4]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3]),
        ],
        [helper.make_tensor_value_info("heatmap_lowres", TensorProto.FLOAT, [2, 2, 4])],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"q": q, "w": w}
    expected = np.einsum("bc,bchw->bhw", w, 0.1 * (q.astype(np.float32) - 7))
    before = make_session(model).run(None, feeds)[0]  # type: ignore[attr-defined]
    assert lean_rewrites(model, {"a": (2, 3, 2, 4)}) == 1
    assert [node.op_type for node in model.graph.node] == [
        "DequantizeLinear",
        "Transpose",
        "Reshape",
        "Unsqueeze",
        "MatMul",
        "Reshape",
    ]
    after = make_session(model).run(None, feeds)[0]  # type: ignore[attr-defined]
    np.testing.assert_allclose(before, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-5)
    float_map = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    float_map.graph.node[0].op_type = "Identity"  # a float map: left as it is
    assert lean_rewrites(float_map, {"a": (2, 3, 2, 4)}) == 0


def test_unsigned_activations_dequantize_to_the_same_values():
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(-3, np.int8), "zero")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["a"]),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])],
        [scale, zero],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.linspace(-8, 8, 64, dtype=np.float32)  # saturates both ends of int8
    expected = make_session(model).run(None, {"x": x})[0]  # type: ignore[attr-defined]
    assert lean_rewrites(model, {}) == 1
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    unsigned = constants[model.graph.node[0].input[2]]
    assert unsigned.dtype == np.uint8 and int(unsigned) == 125
    got = make_session(model).run(None, {"x": x})[0]  # type: ignore[attr-defined]
    np.testing.assert_array_equal(got, expected)


def test_reshape_of_its_own_leading_extents_copies_them():
    # Reshape(x, Concat(Slice(Shape(x), 0, 2), [-1])) -> Reshape(x, [0, 0, -1])
    constants = [
        numpy_helper.from_array(np.array([0], np.int64), "start"),
        numpy_helper.from_array(np.array([2], np.int64), "end"),
        numpy_helper.from_array(np.array([-1], np.int64), "rest"),
    ]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "start", "end", "start"], ["leading"]),
        helper.make_node("Concat", ["leading", "rest"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 3, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 15])],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(3).standard_normal((2, 4, 3, 5)).astype(np.float32)
    expected = make_session(model).run(None, {"x": x})[0]  # type: ignore[attr-defined]
    assert lean_rewrites(model, {}) == 1
    prune_graph(model.graph)
    assert [node.op_type for node in model.graph.node] == ["Reshape"]
    shape = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert shape[model.graph.node[0].input[1]].tolist() == [0, 0, -1]
    got = make_session(model).run(None, {"x": x})[0]  # type: ignore[attr-defined]
    np.testing.assert_array_equal(got, expected)


def test_min_max_magnitude_without_two_absolute_values():
    # Max(Abs(ReduceMin(x)), Abs(ReduceMax(x))) -> Max(ReduceMax(x), Neg(ReduceMin(x)))
    nodes = [
        helper.make_node("ReduceMin", ["x"], ["low"], axes=[1], keepdims=1),
        helper.make_node("ReduceMax", ["x"], ["high"], axes=[1], keepdims=1),
        helper.make_node("Abs", ["low"], ["low_abs"]),
        helper.make_node("Abs", ["high"], ["high_abs"]),
        helper.make_node("Max", ["low_abs", "high_abs"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "magnitude",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array(  # all positive, all negative, both signs, one zero
        [[1, 2, 3, 4, 5, 6], [-6, -5, -4, -3, -2, -1], [-7, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, 0]],
        np.float32,
    )
    expected = make_session(model).run(None, {"x": x})[0]  # type: ignore[attr-defined]
    assert lean_rewrites(model, {}) == 1
    prune_graph(model.graph)
    assert sorted(node.op_type for node in model.graph.node) == [
        "Max",
        "Neg",
        "ReduceMax",
        "ReduceMin",
    ]
    got = make_session(model).run(None, {"x": x})[0]  # type: ignore[attr-defined]
    np.testing.assert_array_equal(got, expected)
    assert got.ravel().tolist() == [6, 6, 7, 0]
