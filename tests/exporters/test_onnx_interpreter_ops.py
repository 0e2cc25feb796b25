"""The ONNX head interpreter against onnxruntime, operator by operator.

Each case is a one-node (or few-node) graph built with ``onnx.helper`` at the opset whose form
it tests (attributes before inputs, each mode), run by onnxruntime and by :class:`OnnxModule`
on the same random input. Float results match to rtol 1e-5 / atol 1e-6 unless a case says
why not; quantized values match exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import user_export

from fam_core.exporters.onnx_torch import SUPPORTED_OPS, OnnxModule, unsupported_ops

onnxruntime = pytest.importorskip("onnxruntime")

NCHW = (2, 3, 7, 7)


@dataclass
class Case:
    """``op`` on the input ``x`` of ``shape`` and constant inputs ``constants`` (``None``: an
    absent optional input) at ``opset``."""

    op: str
    opset: int
    attributes: dict[str, Any] = field(default_factory=dict)
    constants: list[Any] = field(default_factory=list)
    shape: tuple[int, ...] = NCHW
    positive: bool = False  # the input drawn from (0.5, 2) instead of a normal distribution
    rtol: float = 1e-5
    atol: float = 1e-6


def model(
    nodes: list[onnx.NodeProto],
    opset: int,
    shape: tuple[int | str, ...],
    initializers: list[onnx.TensorProto] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_empty_tensor_value_info(nodes[-1].output[0])],
        list(initializers),
    )
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", max(opset, 7))])
    return proto


def one_node(case: Case) -> onnx.ModelProto:
    names, initializers = ["x"], []
    for position, value in enumerate(case.constants):
        if value is None:
            names.append("")
            continue
        names.append(f"c{position}")
        initializers.append(numpy_helper.from_array(np.asarray(value), f"c{position}"))
    node = helper.make_node(case.op, names, ["y"], **case.attributes)
    return model([node], case.opset, case.shape, initializers)


def onnxruntime_output(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    # each operator's own kernel: no fusion (onnxruntime turns QDQ pairs into quantized ops)
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0]


def sample(shape: tuple[int, ...], positive: bool = False, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if positive:
        return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def assert_matches_onnxruntime(
    proto: onnx.ModelProto, x: np.ndarray, rtol: float = 1e-5, atol: float = 1e-6
) -> torch.Tensor:
    want = onnxruntime_output(proto, x)
    got = OnnxModule(proto)(torch.from_numpy(x))
    assert tuple(got.shape) == want.shape
    np.testing.assert_allclose(
        got.detach().double().numpy(), want.astype(np.float64), rtol=rtol, atol=atol
    )
    return got


def f32(*values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def i64(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


_RNG = np.random.default_rng(1)
_SLOPES = _RNG.uniform(-0.5, 0.5, (3, 1, 1)).astype(np.float32)

ACTIVATIONS = {
    "HardSwish": Case("HardSwish", 14),
    "HardSigmoid": Case("HardSigmoid", 6),
    "HardSigmoid-alpha-beta": Case("HardSigmoid", 6, {"alpha": 0.3, "beta": 0.4}),
    "PRelu-per-channel-C11": Case("PRelu", 9, constants=[_SLOPES]),
    "PRelu-trailing-axis": Case(
        "PRelu", 16, constants=[_RNG.uniform(-0.5, 0.5, 7).astype(np.float32)]
    ),
    "PRelu-C-on-2d": Case(
        "PRelu", 16, constants=[_RNG.uniform(-0.5, 0.5, 5).astype(np.float32)], shape=(4, 5)
    ),
    "PRelu-scalar": Case("PRelu", 16, constants=[np.float32(0.25)]),
    "PRelu-one-element": Case("PRelu", 9, constants=[f32(0.1)]),
    "LeakyRelu": Case("LeakyRelu", 6),
    "LeakyRelu-alpha": Case("LeakyRelu", 16, {"alpha": 0.2}),
    "Elu": Case("Elu", 6),
    "Elu-alpha": Case("Elu", 6, {"alpha": 0.5}),
    "Selu": Case("Selu", 6),
    "Selu-alpha-gamma": Case("Selu", 6, {"alpha": 1.5, "gamma": 1.2}),
    "Softplus": Case("Softplus", 1),
    "Softsign": Case("Softsign", 1),
    "Mish": Case("Mish", 18),
    "ThresholdedRelu": Case("ThresholdedRelu", 10, {"alpha": 0.5}),
    "Celu": Case("Celu", 12, {"alpha": 2.0}),
    "Clip-attributes": Case("Clip", 6, {"min": -0.5, "max": 0.7}),
    "Clip-inputs": Case("Clip", 11, constants=[np.float32(-0.5), np.float32(0.7)]),
    "Clip-relu6": Case("Clip", 13, constants=[np.float32(0.0), np.float32(6.0)]),
}


def pooling_windows(op: str, opset: int) -> dict[str, Case]:
    """The window geometries both pooling operators are checked on, as cases of ``op``."""
    return {
        f"{op}-ceil-pads": Case(
            op,
            opset,
            {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
            shape=(2, 3, 8, 8),
        ),
        f"{op}-ceil-no-window-in-end-padding": Case(
            op,
            opset,
            {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
        ),
        f"{op}-same-upper": Case(
            op,
            opset,
            {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
            shape=(2, 3, 8, 8),
        ),
    }


CASES = {
    **ACTIVATIONS,
    "Clip-attributes-default": Case("Clip", 6),
    "Clip-min-input-only": Case("Clip", 11, constants=[np.float32(-0.2)]),
    "Clip-max-input-only": Case("Clip", 13, constants=[None, np.float32(0.3)]),
    "Clip-no-bounds": Case("Clip", 13),
    "LogSoftmax-axis-last": Case("LogSoftmax", 13, {"axis": -1}),
    "LogSoftmax-axis-1": Case("LogSoftmax", 13, {"axis": 1}),
    "LogSoftmax-opset11-default-flattens": Case("LogSoftmax", 11),
    "LogSoftmax-opset11-axis-2": Case("LogSoftmax", 11, {"axis": 2}),
    "Softmax-opset11-default-flattens": Case("Softmax", 11),
    "Softmax-opset13-default": Case("Softmax", 13),
    # pooling
    "MaxPool-k3-s2-p1": Case(
        "MaxPool", 12, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    ),
    "MaxPool-k2-s2": Case("MaxPool", 8, {"kernel_shape": [2, 2], "strides": [2, 2]}),
    "MaxPool-ceil": Case(
        "MaxPool", 12, {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}
    ),
    **pooling_windows("MaxPool", 12),
    "MaxPool-same-lower": Case(
        "MaxPool", 12, {"kernel_shape": [2, 2], "strides": [1, 1], "auto_pad": "SAME_LOWER"}
    ),
    "MaxPool-valid": Case(
        "MaxPool", 12, {"kernel_shape": [3, 2], "strides": [2, 1], "auto_pad": "VALID"}
    ),
    "MaxPool-dilations": Case("MaxPool", 12, {"kernel_shape": [2, 2], "dilations": [2, 2]}),
    "MaxPool-asymmetric-pads": Case("MaxPool", 12, {"kernel_shape": [3, 3], "pads": [0, 1, 2, 0]}),
    "MaxPool-1d": Case(
        "MaxPool", 12, {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}, shape=(2, 3, 9)
    ),
    "AveragePool-k3-s2-p1": Case(
        "AveragePool", 11, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    ),
    "AveragePool-count-include-pad": Case(
        "AveragePool",
        11,
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
    ),
    "AveragePool-opset7": Case(
        "AveragePool",
        7,
        {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
    ),
    "AveragePool-ceil": Case(
        "AveragePool", 10, {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}
    ),
    "AveragePool-ceil-pads-include": Case(
        "AveragePool",
        11,
        {
            "kernel_shape": [3, 3],
            "strides": [2, 2],
            "pads": [1, 1, 1, 1],
            "ceil_mode": 1,
            "count_include_pad": 1,
        },
        shape=(2, 3, 8, 8),
    ),
    **pooling_windows("AveragePool", 11),
    "AveragePool-same-lower-include": Case(
        "AveragePool",
        11,
        {"kernel_shape": [2, 2], "auto_pad": "SAME_LOWER", "count_include_pad": 1},
    ),
    "AveragePool-valid": Case(
        "AveragePool", 11, {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "VALID"}
    ),
    "AveragePool-asymmetric-pads": Case(
        "AveragePool", 11, {"kernel_shape": [3, 3], "pads": [0, 1, 2, 0]}
    ),
    "AveragePool-dilations": Case(
        "AveragePool", 19, {"kernel_shape": [2, 2], "dilations": [2, 2], "pads": [1, 1, 1, 1]}
    ),
    "AveragePool-1d": Case(
        "AveragePool", 11, {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}, shape=(2, 3, 9)
    ),
    "GlobalMaxPool": Case("GlobalMaxPool", 1),
    "GlobalLpPool": Case("GlobalLpPool", 2),
    "LpPool": Case(
        "LpPool", 18, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "p": 2}
    ),
    "Conv-asymmetric-pads": Case(
        "Conv", 11, {"pads": [0, 1, 2, 0]}, [_RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)]
    ),
    "Conv-same-upper": Case(
        "Conv",
        11,
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
        [_RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)],
        shape=(2, 3, 8, 8),
    ),
    "Conv-same-lower": Case(
        "Conv",
        11,
        {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
        [_RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)],
        shape=(2, 3, 8, 8),
    ),
    "Conv-valid": Case(
        "Conv",
        11,
        {"auto_pad": "VALID", "strides": [2, 1]},
        [
            _RNG.standard_normal((4, 3, 3, 3)).astype(np.float32),
            _RNG.standard_normal(4).astype(np.float32),
        ],
    ),
    # padding
    "Pad-opset2-constant": Case("Pad", 2, {"pads": [0, 0, 1, 2, 0, 0, 2, 1], "value": 1.5}),
    "Pad-opset2-reflect": Case("Pad", 2, {"pads": [0, 0, 2, 1, 0, 0, 1, 3], "mode": "reflect"}),
    "Pad-opset2-edge": Case("Pad", 2, {"pads": [0, 0, 2, 1, 0, 0, 1, 3], "mode": "edge"}),
    "Pad-inputs-constant": Case(
        "Pad", 11, constants=[i64(0, 0, 1, 1, 0, 0, 1, 1), np.float32(-2.0)]
    ),
    "Pad-inputs-constant-default": Case("Pad", 13, constants=[i64(0, 1, 1, 0, 0, 0, 2, 1)]),
    "Pad-inputs-reflect": Case("Pad", 11, {"mode": "reflect"}, [i64(0, 0, 3, 1, 0, 0, 2, 2)]),
    "Pad-inputs-edge": Case("Pad", 13, {"mode": "edge"}, [i64(0, 0, 3, 1, 0, 0, 2, 2)]),
    "Pad-negative-crops": Case("Pad", 13, constants=[i64(0, 0, -1, 2, 0, 0, 1, -2)]),
    "Pad-axes": Case("Pad", 18, constants=[i64(1, 2, 2, 1), np.float32(0.5), i64(-1, 2)]),
    "Pad-wrap": Case("Pad", 19, {"mode": "wrap"}, [i64(0, 0, 2, 1, 0, 0, 1, 3)]),
    # resizing
    "Resize-opset10-nearest-up": Case("Resize", 10, {"mode": "nearest"}, [f32(1, 1, 2, 2)]),
    "Resize-opset10-nearest-down": Case(
        "Resize", 10, {"mode": "nearest"}, [f32(1, 1, 0.5, 0.5)], shape=(2, 3, 8, 8)
    ),
    "Resize-opset10-linear": Case("Resize", 10, {"mode": "linear"}, [f32(1, 1, 2, 1.5)]),
    "Resize-nearest-asymmetric-floor": Case(
        "Resize",
        11,
        {
            "mode": "nearest",
            "coordinate_transformation_mode": "asymmetric",
            "nearest_mode": "floor",
        },
        [f32(), f32(1, 1, 2, 2)],
    ),
    "Resize-nearest-half-pixel-ceil": Case(
        "Resize",
        11,
        {"mode": "nearest", "nearest_mode": "round_prefer_ceil"},
        [f32(), f32(1, 1, 1.5, 1.5)],
    ),
    "Resize-nearest-half-pixel-floor-down": Case(
        "Resize", 13, {"mode": "nearest"}, [None, f32(1, 1, 0.6, 0.6)]
    ),
    "Resize-nearest-ties-prefer-floor": Case(
        "Resize", 13, {"mode": "nearest"}, [None, f32(1, 1, 0.5, 0.5)], shape=(2, 3, 8, 8)
    ),
    "Resize-nearest-ties-prefer-ceil": Case(
        "Resize",
        13,
        {"mode": "nearest", "nearest_mode": "round_prefer_ceil"},
        [None, f32(1, 1, 0.5, 0.5)],
        shape=(2, 3, 8, 8),
    ),
    "Resize-nearest-ceil-sizes": Case(
        "Resize", 13, {"mode": "nearest", "nearest_mode": "ceil"}, [None, None, i64(2, 3, 10, 5)]
    ),
    "Resize-nearest-tf-half-pixel": Case(
        "Resize",
        11,
        {"mode": "nearest", "coordinate_transformation_mode": "tf_half_pixel_for_nn"},
        [f32(), f32(1, 1, 2, 2)],
    ),
    "Resize-linear-pytorch-half-pixel": Case(
        "Resize",
        11,
        {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
        [f32(), f32(1, 1, 2, 2)],
    ),
    "Resize-linear-align-corners": Case(
        "Resize",
        11,
        {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
        [f32(), f32(), i64(2, 3, 13, 9)],
    ),
    "Resize-linear-half-pixel-scales": Case(
        "Resize", 13, {"mode": "linear"}, [None, f32(1, 1, 1.5, 2)]
    ),
    "Resize-linear-half-pixel-sizes-down": Case(
        "Resize", 13, {"mode": "linear"}, [None, None, i64(2, 3, 4, 5)]
    ),
    "Resize-linear-asymmetric": Case(
        "Resize",
        13,
        {"mode": "linear", "coordinate_transformation_mode": "asymmetric"},
        [None, f32(1, 1, 2, 2)],
    ),
    "Resize-cubic": Case(
        "Resize", 13, {"mode": "cubic"}, [None, f32(1, 1, 2, 2)], rtol=1e-4, atol=1e-5
    ),
    "Resize-cubic-exclude-outside": Case(
        "Resize",
        13,
        {"mode": "cubic", "cubic_coeff_a": -0.5, "exclude_outside": 1},
        [None, None, i64(2, 3, 11, 9)],
        rtol=1e-4,
        atol=1e-5,
    ),
    "Resize-axes-sizes": Case(
        "Resize", 18, {"mode": "linear", "axes": [2, 3]}, [None, None, i64(12, 10)]
    ),
    "Resize-keep-aspect-not-larger": Case(
        "Resize",
        18,
        {"mode": "nearest", "axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"},
        [None, None, i64(14, 20)],
    ),
    "Resize-half-pixel-symmetric": Case(
        "Resize",
        19,
        {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"},
        [None, f32(1, 1, 1.7, 2.3)],
    ),
    "Upsample-opset9-nearest": Case("Upsample", 9, {"mode": "nearest"}, [f32(1, 1, 2, 3)]),
    "Upsample-opset9-linear": Case("Upsample", 9, {"mode": "linear"}, [f32(1, 1, 2, 2)]),
    "Upsample-opset7-nearest": Case(
        "Upsample", 7, {"mode": "nearest", "scales": [1.0, 1.0, 3.0, 2.0]}
    ),
    "Upsample-opset7-linear": Case(
        "Upsample", 7, {"mode": "linear", "scales": [1.0, 1.0, 2.0, 2.0]}
    ),
    # several inputs, einsum
    "Sum-broadcast": Case(
        "Sum",
        13,
        constants=[
            _RNG.standard_normal(7).astype(np.float32),
            _RNG.standard_normal((1, 3, 1, 1)).astype(np.float32),
        ],
    ),
    "Sum-one-input": Case("Sum", 13),
    "Mean-broadcast": Case(
        "Mean",
        13,
        constants=[
            _RNG.standard_normal(7).astype(np.float32),
            _RNG.standard_normal((1, 3, 1, 1)).astype(np.float32),
        ],
    ),
    "Einsum-channel-weights": Case(
        "Einsum", 12, {"equation": "bchw,c->bhw"}, [_RNG.standard_normal(3).astype(np.float32)]
    ),
    "Einsum-token-projection": Case(
        "Einsum",
        12,
        {"equation": "bti, ij -> btj"},
        [_RNG.standard_normal((5, 4)).astype(np.float32)],
        shape=(2, 3, 5),
    ),
    "Einsum-ellipsis": Case(
        "Einsum", 12, {"equation": "...c,c->..."}, [_RNG.standard_normal(7).astype(np.float32)]
    ),
    # reductions, normalizations
    "ReduceL2-axes-attribute": Case("ReduceL2", 13, {"axes": [2, 3]}),
    "ReduceL2-axes-input": Case("ReduceL2", 18, {"keepdims": 0}, [i64(1)]),
    "ReduceL2-all": Case("ReduceL2", 18),
    "ReduceL1": Case("ReduceL1", 13, {"axes": [1]}),
    "ReduceSumSquare": Case("ReduceSumSquare", 18, {"keepdims": 0}, [i64(-1, -2)]),
    "ReduceLogSumExp": Case("ReduceLogSumExp", 13, {"axes": [1, 3]}),
    "ReduceLogSumExp-input": Case("ReduceLogSumExp", 18, {"keepdims": 0}, [i64(2)]),
    "ReduceLogSum": Case("ReduceLogSum", 13, {"axes": [2]}, positive=True),
    "ReduceProd": Case("ReduceProd", 13, {"axes": [2, 3], "keepdims": 0}, positive=True),
    "ReduceProd-input": Case("ReduceProd", 18, {}, [i64(1)]),
    "ReduceMin": Case("ReduceMin", 13, {"axes": [1]}),
    "LpNormalization-p2": Case("LpNormalization", 1, {"axis": 1, "p": 2}),
    "LpNormalization-p1": Case("LpNormalization", 1, {"axis": -1, "p": 1}),
    "InstanceNormalization": Case(
        "InstanceNormalization",
        6,
        {"epsilon": 1e-3},
        [_RNG.standard_normal(3).astype(np.float32), _RNG.standard_normal(3).astype(np.float32)],
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_each_operator_matches_onnxruntime(case: Case) -> None:
    proto = one_node(case)
    assert unsupported_ops(proto) == []
    assert_matches_onnxruntime(proto, sample(case.shape, case.positive), case.rtol, case.atol)


@pytest.mark.parametrize("case", ACTIVATIONS.values(), ids=ACTIVATIONS.keys())
def test_gradients_flow_through_each_activation(case: Case) -> None:
    x = torch.from_numpy(sample(case.shape)).requires_grad_(True)
    (gradient,) = torch.autograd.grad(OnnxModule(one_node(case))(x).sum(), x)
    assert bool(torch.isfinite(gradient).all()) and bool((gradient != 0).any())


# Quantization: QuantizeLinear's values exactly, DequantizeLinear(QuantizeLinear(x)) with the
# straight-through gradient, and onnxruntime's dynamic-quantization patterns.


def const(name: str, value: Any) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def quantize(opset: int, scale: Any, zero: Any = None, axis: int | None = None, dequantize=True):
    options = {} if axis is None else {"axis": axis}
    names = ["scale"] if zero is None else ["scale", "zero"]
    nodes = [helper.make_node("QuantizeLinear", ["x", *names], ["q"], **options)]
    if dequantize:
        nodes.append(helper.make_node("DequantizeLinear", ["q", *names], ["y"], **options))
    constants = [const("scale", scale)] + ([] if zero is None else [const("zero", zero)])
    return model(nodes, opset, NCHW, constants)


QUANTIZERS = {
    "per-tensor-uint8-opset10": (10, np.float32(0.02), np.uint8(128), None),
    "per-tensor-int8": (13, np.float32(0.01), np.int8(-3), None),
    "no-zero-point-uint8": (13, np.float32(0.01), None, None),
    "per-axis-int8": (13, f32(0.01, 0.02, 0.005), np.array([0, 5, -7], np.int8), 1),
    "per-axis-uint8-last-axis": (
        19,
        np.linspace(0.003, 0.03, 7, dtype=np.float32),
        np.arange(120, 127, dtype=np.uint8),
        -1,
    ),
    "saturating-int8": (19, np.float32(0.004), np.int8(10), None),
}


@pytest.mark.parametrize(
    ("opset", "scale", "zero", "axis"), QUANTIZERS.values(), ids=QUANTIZERS.keys()
)
def test_quantize_linear_values_are_exact(opset, scale, zero, axis) -> None:
    x = sample(NCHW) * 2
    got = assert_matches_onnxruntime(quantize(opset, scale, zero, axis, dequantize=False), x, 0, 0)
    assert bool((got == got.round()).all())


@pytest.mark.parametrize(
    ("opset", "scale", "zero", "axis"), QUANTIZERS.values(), ids=QUANTIZERS.keys()
)
def test_dequantize_of_quantize_matches_and_passes_the_gradient_straight_through(
    opset, scale, zero, axis
) -> None:
    x = sample(NCHW) * 2
    proto = quantize(opset, scale, zero, axis)
    assert_matches_onnxruntime(proto, x)
    inputs = torch.from_numpy(x).requires_grad_(True)
    (gradient,) = torch.autograd.grad(OnnxModule(proto)(inputs).sum(), inputs)
    np.testing.assert_allclose(gradient.numpy(), 1.0, rtol=1e-6)


def test_saturation_is_reached() -> None:
    """The saturating case is one: some values clip to the int8 range (and still match)."""
    x = torch.from_numpy(sample(NCHW) * 2)
    q = OnnxModule(quantize(19, np.float32(0.004), np.int8(10), dequantize=False))(x)
    assert float(q.max()) == 127 and float(q.min()) == -128


def test_dequantized_weights_feed_matmul_and_conv() -> None:
    """The QDQ weight pattern: int8 initializers dequantized per output channel, an int32
    bias, into MatMul and Conv."""
    rng = np.random.default_rng(2)
    weight = rng.integers(-128, 128, (4, 3, 3, 3), dtype=np.int8)
    matrix = rng.integers(-128, 128, (7, 5), dtype=np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wf"], axis=0),
        helper.make_node("DequantizeLinear", ["b", "b_scale"], ["bf"]),
        helper.make_node("Conv", ["x", "wf", "bf"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("DequantizeLinear", ["m", "m_scale", "m_zero"], ["mf"], axis=1),
        helper.make_node("MatMul", ["c", "mf"], ["y"]),
    ]
    constants = [
        const("w", weight),
        const("w_scale", rng.uniform(0.001, 0.01, 4).astype(np.float32)),
        const("w_zero", np.array([0, 1, -2, 3], np.int8)),
        const("b", rng.integers(-1000, 1000, 4).astype(np.int32)),
        const("b_scale", np.float32(0.0005)),
        const("m", matrix),
        const("m_scale", rng.uniform(0.001, 0.01, 5).astype(np.float32)),
        const("m_zero", np.zeros(5, np.int8)),
    ]
    x = sample(NCHW)
    assert_matches_onnxruntime(model(nodes, 13, NCHW, constants), x)


def dynamic_quantization(opset: int, consumer: str, weight: np.ndarray, weight_zero: Any):
    """onnxruntime's ``quantize_dynamic`` pattern: DynamicQuantizeLinear, then MatMulInteger
    or ConvInteger, Cast to float, times the input's and the weight's scales."""
    options = {"pads": [1, 1, 1, 1]} if consumer == "ConvInteger" else {}
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "q_scale", "q_zero"]),
        helper.make_node(consumer, ["q", "w", "q_zero", "w_zero"], ["integers"], **options),
        helper.make_node("Cast", ["integers"], ["floats"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["q_scale", "w_scale"], ["scale"]),
        helper.make_node("Mul", ["floats", "scale"], ["y"]),
    ]
    constants = [
        const("w", weight),
        const("w_zero", weight_zero),
        const("w_scale", np.float32(0.01)),
    ]
    return model(nodes, opset, NCHW, constants)


_WEIGHTS = np.random.default_rng(3)
DYNAMIC = {
    "MatMulInteger-uint8": (
        "MatMulInteger",
        _WEIGHTS.integers(0, 256, (7, 4), dtype=np.uint8),
        np.uint8(128),
    ),
    "MatMulInteger-int8-per-column": (
        "MatMulInteger",
        # 7-bit weights, as quantize_dynamic's reduce_range writes them: onnxruntime's uint8 x
        # int8 kernels on AVX2 saturate sums of two products at int16
        _WEIGHTS.integers(-64, 64, (7, 4), dtype=np.int8),
        np.array([0, 3, -2, 1], np.int8),
    ),
    "ConvInteger-uint8": (
        "ConvInteger",
        _WEIGHTS.integers(0, 256, (4, 3, 3, 3), dtype=np.uint8),
        np.uint8(120),
    ),
}


@pytest.mark.parametrize(
    ("consumer", "weight", "weight_zero"), DYNAMIC.values(), ids=DYNAMIC.keys()
)
def test_dynamic_quantization_patterns_match_and_have_the_dequantized_gradient(
    consumer, weight, weight_zero
) -> None:
    proto = dynamic_quantization(13, consumer, weight, weight_zero)
    x = sample(NCHW)
    assert_matches_onnxruntime(proto, x, rtol=1e-5, atol=1e-5)
    if consumer != "MatMulInteger":
        return
    inputs = torch.from_numpy(x).requires_grad_(True)
    (gradient,) = torch.autograd.grad(OnnxModule(proto)(inputs).sum(), inputs)
    dequantized = (weight.astype(np.float64) - weight_zero.astype(np.float64)) * 0.01
    want = np.broadcast_to(dequantized.sum(axis=1), NCHW)  # d sum(x @ W) / dx
    np.testing.assert_allclose(gradient.numpy(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", [1.0, 1e-3], ids=["unit", "small"])
def test_dynamic_quantize_linear_outputs(scale: float) -> None:
    """y, y_scale and y_zero_point each as onnxruntime computes them (through DequantizeLinear
    and on their own)."""
    x = sample(NCHW) * scale
    dequantized = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    assert_matches_onnxruntime(model(dequantized, 11, NCHW), x)
    for position, name in enumerate(["q", "s", "z"]):
        nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])]
        nodes.append(helper.make_node("Identity", [name], [f"out{position}"]))
        assert_matches_onnxruntime(model(nodes, 11, NCHW), x, 0, 0)


def test_sizes_computed_from_the_input_shape_stay_shape_values() -> None:
    """Resize whose sizes come from Shape / Slice / Add / Clip / Concat: integer arithmetic on
    shapes the interpreter keeps as Python ints (so a dynamic batch stays symbolic)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "two"], ["batch_channels"]),
        helper.make_node("Slice", ["shape", "two", "four"], ["hw"]),
        helper.make_node("Add", ["hw", "hw"], ["doubled"]),
        helper.make_node("Add", ["doubled", "grow"], ["grown"]),
        helper.make_node("Clip", ["grown", "low", "high"], ["capped"]),
        helper.make_node("Concat", ["batch_channels", "capped"], ["sizes"], axis=0),
        helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear"),
    ]
    constants = [
        const("zero", i64(0)),
        const("two", i64(2)),
        const("four", i64(4)),
        const("grow", i64(1, -3)),
        const("low", np.int64(0)),
        const("high", np.int64(13)),
    ]
    proto = model(nodes, 13, ["batch", 3, 7, 7], constants)
    got = assert_matches_onnxruntime(proto, sample((5, 3, 7, 7)))
    assert tuple(got.shape) == (5, 3, 13, 11)


def test_an_unknown_operator_is_still_named() -> None:
    nodes = [
        helper.make_node("HardSwish", ["x"], ["h"]),
        helper.make_node("NonMaxSuppression", ["h"], ["n"]),
        helper.make_node("Custom", ["n"], ["y"], domain="com.example"),
    ]
    proto = model(nodes, 14, NCHW)
    assert unsupported_ops(proto) == ["NonMaxSuppression", "com.example.Custom"]
    with pytest.raises(ValueError, match="operators NonMaxSuppression, com.example.Custom,"):
        OnnxModule(proto)


def test_supported_ops_lists_the_vision_operators() -> None:
    expected = {case.op for case in CASES.values()} | {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
    }
    assert expected <= set(SUPPORTED_OPS)
    assert list(SUPPORTED_OPS) == sorted(SUPPORTED_OPS)


def test_an_unsupported_form_of_a_supported_operator_says_which() -> None:
    case = Case(
        "Resize",
        13,
        {"coordinate_transformation_mode": "tf_crop_and_resize"},
        [f32(0, 0, 0, 0, 1, 1, 1, 1), f32(1, 1, 2, 2)],
    )
    with pytest.raises(ValueError, match="tf_crop_and_resize"):
        OnnxModule(one_node(case))(torch.from_numpy(sample(NCHW)))


class ConvolutionalHead(torch.nn.Module):
    """The operators torch.onnx.export writes for the layers of small vision classifiers."""

    def __init__(self, opset: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.prelu = torch.nn.PReLU(3, init=0.2)
        self.norm = torch.nn.InstanceNorm2d(3, affine=True)
        self.fc = torch.nn.Linear(3, 4)
        self.ceil_mode = opset >= 10
        self.bilinear = opset >= 11  # before, torch's bilinear has no ONNX equivalent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(x, (1, 2, 2, 1), mode="reflect")
        x = torch.nn.functional.pad(x, (1, 0, 0, 1), mode="replicate")
        x = torch.nn.functional.pad(x, (1, 1, 1, 1), value=0.5)
        x = self.norm(self.prelu(x))
        x = torch.nn.functional.hardswish(x) + torch.nn.functional.mish(x)
        x = torch.nn.functional.max_pool2d(x, 3, 2, 1, ceil_mode=self.ceil_mode)
        x = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        x = torch.nn.functional.avg_pool2d(x, 2, 2, count_include_pad=False)
        if self.bilinear:
            x = torch.nn.functional.interpolate(x, size=(9, 7), mode="bilinear")
        x = torch.nn.functional.elu(x) + torch.nn.functional.hardsigmoid(x)
        x = torch.nn.functional.adaptive_max_pool2d(x, 1).flatten(1)
        return torch.log_softmax(self.fc(x), dim=1)


@pytest.mark.parametrize("opset", [9, 11, 17])
def test_a_head_exported_by_torch_matches_torch_and_onnxruntime(opset: int) -> None:
    """Real exporter output: the pads of F.pad as a constant subgraph (folded), Upsample at
    opset 9, Resize after, PRelu's [C, 1, 1] slope, InstanceNormalization."""
    head = ConvolutionalHead(opset).eval()
    proto = user_export(
        head,
        torch.rand(1, *NCHW[1:]),
        opset_version=opset,
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
    )
    ops = {node.op_type for node in proto.graph.node}
    assert {"Pad", "PRelu", "MaxPool", "AveragePool", "HardSigmoid"} <= ops
    assert ("Upsample" if opset < 10 else "Resize") in ops
    interpreted = {op for op, *_ in OnnxModule(proto).nodes}
    assert not {"Constant", "ConstantOfShape", "Transpose", "Cast"} & interpreted  # folded
    x = sample((3, *NCHW[1:]))
    got = assert_matches_onnxruntime(proto, x, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(
            got.numpy(), head(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5
        )


def test_the_module_traces_with_a_symbolic_batch_gradient_included() -> None:
    """What the graft's export does (``make_fx`` with a symbolic batch, through autograd):
    no operator reads tensor values into Python, and the trace runs another batch size."""
    from torch.fx.experimental.proxy_tensor import make_fx

    nodes = [
        helper.make_node("Pad", ["x", "pads", "fill"], ["padded"]),
        helper.make_node(
            "MaxPool", ["padded"], ["pooled"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1
        ),
        helper.make_node("Resize", ["pooled", "", "scales"], ["resized"], mode="linear"),
        helper.make_node(
            "AveragePool", ["resized"], ["averaged"], kernel_shape=[2, 2], pads=[1, 1, 0, 0]
        ),
        helper.make_node("HardSwish", ["averaged"], ["activated"]),
        helper.make_node("DynamicQuantizeLinear", ["activated"], ["q", "s", "z"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dequantized"]),
        helper.make_node("Cast", ["bounds"], ["bounds32"], to=TensorProto.INT32),  # folded
        helper.make_node("Split", ["bounds32"], ["start", "end"], axis=0),
        helper.make_node("Slice", ["dequantized", "start", "end", "axis"], ["y"]),
    ]
    constants = [
        const("bounds", i64(1, 5)),
        const("axis", i64(3)),
        const("pads", i64(0, 0, 1, 1, 0, 0, 1, 1)),
        const("fill", np.float32(0.5)),
        const("scales", f32(1, 1, 2, 2)),
    ]
    module = OnnxModule(model(nodes, 14, ["batch", 3, 7, 7], constants))

    def value_and_gradient(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = module(x)
            (gradient,) = torch.autograd.grad((y * y).sum(), x)
        return y, gradient

    traced = make_fx(value_and_gradient, tracing_mode="symbolic", _allow_non_fake_inputs=True)(
        torch.from_numpy(sample(NCHW))
    )
    x = torch.from_numpy(sample((5, *NCHW[1:]), seed=1))
    for got, want in zip(traced(x), value_and_gradient(x), strict=True):
        np.testing.assert_allclose(
            got.detach().numpy(), want.detach().numpy(), rtol=1e-5, atol=1e-6
        )


def test_operators_on_constants_alone_are_folded_whatever_they_are() -> None:
    """Range and Sin are not interpreted, but on constants they are folded once (a
    positional table); the same Sin on the input is named."""
    table = [
        helper.make_node("Range", ["start", "limit", "delta"], ["positions"]),
        helper.make_node("Cast", ["positions"], ["floats"], to=TensorProto.FLOAT),
        helper.make_node("Sin", ["floats"], ["table"]),
        helper.make_node("Mul", ["x", "table"], ["y"]),
    ]
    constants = [
        const("start", np.int64(0)),
        const("limit", np.int64(7)),
        const("delta", np.int64(1)),
    ]
    proto = model(table, 13, NCHW, constants)
    assert unsupported_ops(proto) == []
    assert_matches_onnxruntime(proto, sample(NCHW))
    on_input = model([helper.make_node("Sin", ["x"], ["y"])], 13, NCHW)
    assert unsupported_ops(on_input) == ["Sin"]
    with pytest.raises(ValueError, match="the head uses the ONNX operator Sin,"):
        OnnxModule(on_input)
