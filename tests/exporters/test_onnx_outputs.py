"""ONNX outputs as exporters write them: the logits behind a trailing Softmax / LogSoftmax /
Sigmoid, L2-normalised embeddings, several outputs, real operator names in messages, and
one-line refusals of outputs that hold no image-level score (CTC, detection, segmentation).

Graphs are written with ``onnx.helper`` as PaddlePaddle writes them (global average pooling,
a Reshape whose shape comes from Shape -> Slice -> Concat, MatMul + Add, the activation, a
trailing Identity) or exported from small seeded torch modules with
``torch.onnx.export(dynamo=False)``. Expected values are hand-computed (CAM's weights are the
classifier's row, Grad-CAM's that row over ``hw``), identities (explaining the output equals
explaining the logits by name; Grad-FAM does not see an L2 normalisation of the embedding,
since the cosine similarity does not) or the torch explainers on the same weights.
"""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import user_export
from serving_helpers import loopback, png_bytes, running_server
from torch import nn

from fam_core.cli import main
from fam_core.explainers import FAM, GradCAM
from fam_core.exporters.graft import graft_onnx, inspect_onnx
from fam_core.exporters.onnx_dataflow import analyse_graph, choose_output
from fam_core.exporters.onnx_head import analyse_head
from fam_core.graphs import onnx_format as fmt
from fam_core.graphs.onnx_runtime import OnnxExplainer
from fam_core.models.store import ModelConfig
from fam_core.pipeline import EncodedImage, ExplainRequest, ModelRegistry, Pipeline

SIZE = 16
CLASSES = 5
CHANNELS = 8
OPSET = 17
ATOL = 1e-5


def seeded(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def image_batch(count: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, SIZE, SIZE)).astype(np.float32)


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs=None) -> list[np.ndarray]:
    """``proto`` run by onnxruntime, with ``outputs`` (values of the graph) added."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    present = {value.name for value in copy.graph.output}
    for name in outputs or ():
        if name not in present:
            copy.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = onnxruntime.InferenceSession(
        copy.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(outputs, feeds)


def model_of(nodes, inputs, outputs, initializers, name: str = "graph") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return proto


def image_value(height: int = SIZE, width: int = SIZE) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, height, width])


def backbone(name: str, height: int = SIZE, width: int = SIZE, strides=(2, 2)):
    """Conv -> Relu: ``relu_0.tmp_0`` ``[B, 8, H / 2, W / 2]``, PaddlePaddle's value names."""
    weight = seeded(name).standard_normal((CHANNELS, 3, 3, 3)).astype(np.float32) * 0.3
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "conv_w"],
            ["conv_0.tmp_0"],
            pads=[1, 1, 1, 1],
            strides=list(strides),
            name="p2o.Conv.0",
        ),
        helper.make_node("Relu", ["conv_0.tmp_0"], ["relu_0.tmp_0"], name="p2o.Relu.0"),
    ]
    return nodes, [numpy_helper.from_array(weight, "conv_w")]


def classifier_weights(name: str) -> tuple[np.ndarray, np.ndarray]:
    generator = seeded(name + "/fc")
    return (
        generator.standard_normal((CHANNELS, CLASSES)).astype(np.float32),
        generator.standard_normal(CLASSES).astype(np.float32),
    )


def paddle_classifier(activation: str = "Softmax", *, named: bool = True) -> onnx.ModelProto:
    """GAP -> Reshape (shape from Shape -> Slice -> Concat) -> MatMul -> Add -> activation ->
    Identity, as PaddlePaddle writes a classifier (output ``save_infer_model/scale_0.tmp_0``)."""
    nodes, initializers = backbone(activation)
    matrix, bias = classifier_weights(activation)
    initializers += [
        numpy_helper.from_array(matrix, "fc_w"),
        numpy_helper.from_array(bias, "fc_b"),
        numpy_helper.from_array(np.array([0], np.int64), "start"),
        numpy_helper.from_array(np.array([1], np.int64), "end"),
        numpy_helper.from_array(np.array([-1], np.int64), "rest"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", ["relu_0.tmp_0"], ["pool_0.tmp_0"]),
        helper.make_node("Shape", ["pool_0.tmp_0"], ["shape_0"]),
        helper.make_node("Slice", ["shape_0", "start", "end"], ["batch_0"]),
        helper.make_node("Concat", ["batch_0", "rest"], ["new_shape_0"], axis=0),
        helper.make_node("Reshape", ["pool_0.tmp_0", "new_shape_0"], ["flatten_0.tmp_0"]),
        helper.make_node("MatMul", ["flatten_0.tmp_0", "fc_w"], ["linear_0.tmp_0"]),
        helper.make_node("Add", ["linear_0.tmp_0", "fc_b"], ["linear_0.tmp_1"]),
        helper.make_node(activation, ["linear_0.tmp_1"], ["act_0.tmp_0"]),
        helper.make_node("Identity", ["act_0.tmp_0"], ["save_infer_model/scale_0.tmp_0"]),
    ]
    for position, node in enumerate(nodes):
        if named and not node.name:
            node.name = f"p2o.{node.op_type}.{position}"
    output = helper.make_tensor_value_info(
        "save_infer_model/scale_0.tmp_0", TensorProto.FLOAT, ["N", CLASSES]
    )
    return model_of(nodes, [image_value()], [output], initializers, f"paddle-{activation}")


LOGITS = "linear_0.tmp_1"
OUTPUT = "save_infer_model/scale_0.tmp_0"
ACTIVATIONS = {
    "Softmax": ("softmax", lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)),
    "LogSoftmax": ("log_softmax", lambda z: z - np.log(np.exp(z).sum(1, keepdims=True))),
    "Sigmoid": ("sigmoid", lambda z: 1 / (1 + np.exp(-z))),
}


# -- A. the logits behind a trailing activation


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_a_classifier_is_explained_through_its_logits(activation, method, tmp_path) -> None:
    proto = paddle_classifier(activation)
    images = image_batch()
    path = graft_onnx(proto, method=method, out_path=tmp_path / "auto.onnx")
    by_name = graft_onnx(proto, method=method, output_name=LOGITS, out_path=tmp_path / "named.onnx")
    runner, named = OnnxExplainer(path), OnnxExplainer(by_name)
    actual, expected = runner(images), named(images)
    for field in ("maps", "raw", "weights", "scores"):
        np.testing.assert_allclose(getattr(actual, field), getattr(expected, field), atol=ATOL)
    assert actual.extras["output"] == LOGITS and actual.extras["head"] == "linear"
    assert actual.extras["output_activation"] == ACTIVATIONS[activation][0]
    assert runner.output_activation == ACTIVATIONS[activation][0]
    assert runner.metadata[fmt.KEY_GRAPH_OUTPUT] == OUTPUT
    assert "output_activation" not in expected.extras and named.output_activation is None
    # the logits output holds the logits; the graph's own output is their activation
    logits, probabilities = run(proto, {"x": images}, [LOGITS, OUTPUT])
    np.testing.assert_allclose(actual.extras["logits"], logits, rtol=1e-5, atol=ATOL)
    function = ACTIVATIONS[activation][1]
    np.testing.assert_allclose(function(logits.astype(np.float64)), probabilities, atol=1e-5)
    # hand-computed: CAM's weights are the classifier's column of the class, Grad-CAM's / hw
    matrix, _ = classifier_weights(activation)
    classes = actual.extras["class_index"].numpy()
    assert (classes == logits.argmax(1)).all()
    hw = (SIZE // 2) ** 2
    expected_weights = matrix[:, classes].T / (1 if method == "cam" else hw)
    np.testing.assert_allclose(actual.weights, expected_weights, rtol=1e-5, atol=1e-6)


class PaddleStyle(nn.Module):
    """Convolutions, global average pooling, ``reshape(batch, -1)``, a linear classifier and
    a trailing activation: the module ``logits`` leaves the activation out."""

    def __init__(self, activation: str) -> None:
        super().__init__()
        torch.manual_seed(zlib.crc32(activation.encode()) % 1000)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, 1, 1), nn.ReLU()
        )
        self.fc = nn.Linear(12, CLASSES)
        self.activation = activation

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.fc(pooled.reshape(pooled.shape[0], -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.logits(x)
        if self.activation == "softmax":
            return torch.softmax(z, dim=1)
        if self.activation == "log_softmax":
            return torch.log_softmax(z, dim=1)
        return torch.sigmoid(z)


class Logits(nn.Module):
    def __init__(self, model: PaddleStyle) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logits(x)


def torch_export(model: nn.Module, size: int = SIZE, **options: object) -> onnx.ModelProto:
    return user_export(
        model,
        torch.rand(1, 3, size, size),
        input_names=["x"],
        dynamic_axes={"x": {0: "n"}},
        **options,
    )


@pytest.mark.parametrize("activation", ["softmax", "log_softmax", "sigmoid"])
def test_a_torch_exported_classifier_matches_gradcam_of_its_logits(activation) -> None:
    model = PaddleStyle(activation).eval()
    proto = torch_export(model)
    runner_proto = graft_onnx(proto, method="gradcam")
    images = torch.from_numpy(image_batch(seed=4))
    maps, lowres, weights = run(
        runner_proto, {"image": images.numpy()}, ["heatmap", "heatmap_lowres", "weights"]
    )
    logits = Logits(model).eval()
    with torch.no_grad():
        classes = logits(images).argmax(1).tolist()
    expected = GradCAM(logits, "model.features.3", classifier=True)(images, target=classes)
    np.testing.assert_allclose(maps, expected.maps.numpy(), atol=1e-4)
    np.testing.assert_allclose(weights, expected.weights.numpy(), rtol=1e-4, atol=1e-6)
    scale = float(np.abs(expected.raw.numpy()).max())
    np.testing.assert_allclose(lowres, expected.raw.numpy(), atol=1e-4 * scale)
    meta = {entry.key: entry.value for entry in runner_proto.metadata_props}
    assert meta[fmt.KEY_OUTPUT_ACTIVATION] == activation
    assert meta["head"] == "linear"


def test_naming_the_output_overrides_the_walk_back() -> None:
    proto = paddle_classifier()
    assert choose_output(proto, None).explained == LOGITS
    named = choose_output(proto, OUTPUT)
    assert named.explained == OUTPUT and named.activation is None
    report = inspect_onnx(proto, output_name=OUTPUT)
    assert report.output_name == OUTPUT and report.head_kind == "jacobian"
    assert "explained  " not in str(report)
    # an embedding's output is what is compared: no walk back for FAM
    assert analyse_graph(proto, None, None, walk_back=False).output == OUTPUT


# -- D. head discovery through pooling and affine operators, real operator names


def pooled_head(kind: str) -> onnx.ModelProto:
    """The backbone, global pooling written as ``kind``, an affine classifier, a Softmax."""
    nodes, initializers = backbone(kind)
    matrix, bias = classifier_weights(kind)
    initializers += [
        numpy_helper.from_array(matrix.T.copy(), "fc_w"),
        numpy_helper.from_array(bias, "fc_b"),
    ]
    half = SIZE // 2
    if kind == "averagepool":
        initializers.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
        nodes += [
            helper.make_node("AveragePool", ["relu_0.tmp_0"], ["p"], kernel_shape=[half, half]),
            helper.make_node("Squeeze", ["p", "axes"], ["flat"]),
            helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
        ]
    elif kind == "reducemean":
        initializers.append(numpy_helper.from_array(matrix, "fc_w_t"))
        nodes += [
            helper.make_node("ReduceMean", ["relu_0.tmp_0"], ["flat"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["flat", "fc_w_t"], ["product"]),
            helper.make_node("Add", ["product", "fc_b"], ["logits"]),
        ]
    else:  # GlobalAveragePool, Flatten, Gemm
        nodes += [
            helper.make_node("GlobalAveragePool", ["relu_0.tmp_0"], ["p"]),
            helper.make_node("Flatten", ["p"], ["flat"]),
            helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
        ]
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    output = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", CLASSES])
    return model_of(nodes, [image_value()], [output], initializers, kind)


@pytest.mark.parametrize("kind", ["averagepool", "reducemean", "globalaveragepool"])
def test_affine_heads_behind_a_softmax_are_read_exactly(kind) -> None:
    proto = pooled_head(kind)
    head = analyse_head(proto)
    matrix, bias = classifier_weights(kind)
    np.testing.assert_allclose(head.matrix, matrix.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head.bias, bias, rtol=1e-5, atol=1e-5)
    assert "Softmax" not in head.nodes
    report = str(inspect_onnx(proto))
    assert f"head: global average pooling + affine map [{CLASSES} x {CHANNELS}]" in report
    assert "explained  logits  [B, 5]: the logits before the Softmax writing 'probabilities'" in (
        report
    )


@pytest.mark.parametrize("named", [True, False])
def test_inspect_names_the_softmax_never_an_identity(named) -> None:
    proto = paddle_classifier(named=named)
    softmax = "'p2o.Softmax.9' (Softmax)" if named else "the Softmax writing 'act_0.tmp_0'"
    report = str(inspect_onnx(proto))
    assert f"the logits before {softmax}" in report
    assert f"output  {OUTPUT}  [B, 5]" in report
    explained = str(inspect_onnx(proto, output_name=OUTPUT))  # the probabilities, by name
    assert f"not affine (first non-affine node {softmax})" in explained
    assert f"(first non-linear layer: {softmax})" in explained
    assert "Identity" not in explained.split("interpreted in torch")[0]
    assert "@0" not in explained and "onnx_head" not in explained
    with pytest.raises(ValueError, match=r"first non-affine node is .*Softmax") as error:
        graft_onnx(proto, method="cam", output_name=OUTPUT, nonlinear_head="error")
    assert f"output_name={LOGITS!r} is the value before it" in str(error.value)
    with pytest.raises(ValueError, match=r"CAM needs global average pooling") as error:
        graft_onnx(proto, method="cam", output_name=OUTPUT)
    assert softmax in str(error.value) and "onnx_head" not in str(error.value)


# -- B. L2-normalised embeddings


class Normalised(nn.Module):
    """Convolutions, global average pooling, a linear projection, L2 normalisation."""

    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(zlib.crc32(how.encode()) % 1000)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, 1, 1), nn.ReLU()
        )
        self.projection = nn.Linear(12, 6)
        self.how = how

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.features(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(x)
        if self.how == "normalize":
            return F.normalize(z, dim=1)
        return z / torch.sqrt((z * z).sum(dim=1, keepdim=True)).clamp_min(1e-12)


def projection_output(proto: onnx.ModelProto) -> str:
    return next(node.output[0] for node in proto.graph.node if node.op_type == "Gemm")


@pytest.mark.parametrize("how", ["normalize", "sqrt"])
def test_an_l2_normalised_embedding_is_explained_as_served(how) -> None:
    model = Normalised(how).eval()
    proto = torch_export(model)
    choice = choose_output(proto, None)
    assert choice.normalisation is not None and choice.explained == choice.declared
    assert choice.normalisation.endswith("Div")
    assert ("ReduceL2" if how == "normalize" else "Sqrt") in choice.normalisation
    report = str(inspect_onnx(proto))
    assert f"L2-normalised in the graph ({choice.normalisation}): explained as served" in report
    if how != "normalize":  # the grafts below take the traced path: once is enough
        return
    images = torch.from_numpy(image_batch(seed=5))
    references = np.random.default_rng(6).standard_normal((4, 6)).astype(np.float32)
    feeds = {"image": images.numpy(), "references": references}
    names = ["heatmap", "weights", "scores"]
    # Grad-FAM: the cosine similarity ignores the normalisation, so its gradient does too
    normalised = run(graft_onnx(proto, method="gradfam"), feeds, names)
    raw = run(
        graft_onnx(proto, method="gradfam", output_name=projection_output(proto)), feeds, names
    )
    np.testing.assert_allclose(normalised[0], raw[0], atol=1e-4)
    np.testing.assert_allclose(normalised[1], raw[1], rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(normalised[2], raw[2], atol=1e-5)
    # FAM maps its weights through the normalisation's Jacobian, as the torch FAM does
    grafted = graft_onnx(proto, method="fam")
    meta = {entry.key: entry.value for entry in grafted.metadata_props}
    assert meta["head"] == "jacobian"
    assert meta[fmt.KEY_OUTPUT_NORMALISATION] == choice.normalisation
    heatmap, weights = run(grafted, feeds, names[:2])
    expected = FAM(model, "features.3", task="embedding")(
        images, target=torch.from_numpy(references)
    )
    np.testing.assert_allclose(heatmap, expected.maps.numpy(), atol=1e-4)
    scale = float(np.abs(expected.weights.numpy()).max())
    np.testing.assert_allclose(weights, expected.weights.numpy(), atol=1e-4 * scale)


def normalisation_graph(kind: str) -> onnx.ModelProto:
    """The backbone pooled to ``z`` ``[B, 8]`` and L2-normalised as ``kind`` writes it."""
    nodes, initializers = backbone(kind)
    nodes += [
        helper.make_node("GlobalAveragePool", ["relu_0.tmp_0"], ["p"]),
        helper.make_node("Flatten", ["p"], ["z"]),
    ]
    initializers.append(numpy_helper.from_array(np.array(1e-12, np.float32), "eps"))
    initializers.append(numpy_helper.from_array(np.array([1], np.int64), "axis"))
    if kind == "lpnormalization":
        nodes.append(helper.make_node("LpNormalization", ["z"], ["e"], axis=1, p=2))
    elif kind == "reducel2-max":
        nodes += [
            helper.make_node("ReduceL2", ["z"], ["n"], axes=[1], keepdims=1),
            helper.make_node("Max", ["n", "eps"], ["m"]),
            helper.make_node("Div", ["z", "m"], ["e"]),
        ]
    elif kind == "sumsquare-reciprocal":
        nodes += [
            helper.make_node("Mul", ["z", "z"], ["s"]),
            helper.make_node("ReduceSum", ["s", "axis"], ["t"], keepdims=1),
            helper.make_node("Sqrt", ["t"], ["n"]),
            helper.make_node("Clip", ["n", "eps"], ["m"]),
            helper.make_node("Reciprocal", ["m"], ["r"]),
            helper.make_node("Mul", ["z", "r"], ["e"]),
        ]
    else:  # not a normalisation: z divided by the norm of another value (2 z)
        nodes += [
            helper.make_node("Add", ["z", "z"], ["other"]),
            helper.make_node("ReduceL2", ["other"], ["n"], axes=[1], keepdims=1),
            helper.make_node("Div", ["z", "n"], ["e"]),
        ]
    output = helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", CHANNELS])
    return model_of(nodes, [image_value()], [output], initializers, kind)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("lpnormalization", "LpNormalization"),
        ("reducel2-max", "ReduceL2 -> Max -> Div"),
        ("sumsquare-reciprocal", "Mul -> ReduceSum -> Sqrt -> Clip -> Reciprocal, Mul"),
        ("other-norm", None),
    ],
)
def test_l2_normalisations_are_recognised(kind, expected) -> None:
    proto = normalisation_graph(kind)
    assert choose_output(proto, None).normalisation == expected
    (embedding,) = run(proto, {"x": image_batch()})
    norms = np.linalg.norm(embedding, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5) == (expected is not None)


# -- C. several outputs


class TwoOutputs(nn.Module):
    """A feature map, then the logits and the pooled features."""

    def __init__(self, first: str) -> None:
        super().__init__()
        torch.manual_seed(zlib.crc32(first.encode()) % 1000)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(8, CLASSES)
        self.first = first

    def forward(self, x: torch.Tensor):
        maps = self.features(x)
        pooled = maps.mean(dim=(2, 3))
        if self.first == "map":  # a detection-style map output first, then the class head
            return maps, self.fc(pooled)
        return self.fc(pooled), pooled


def test_several_outputs_are_listed_and_the_first_b_d_one_is_explained() -> None:
    proto = torch_export(TwoOutputs("logits"), output_names=["logits", "features"])
    report = inspect_onnx(proto)
    text = str(report)
    assert "graph outputs (2, * the one explained):" in text
    assert "  * logits  [B, 5]" in text and "    features  [B, 8]" in text
    assert report.output_name == "logits" and report.output_dim == CLASSES
    named = inspect_onnx(proto, output_name="features")
    assert "  * features  [B, 8]" in str(named) and named.output_dim == CHANNELS
    proto = torch_export(TwoOutputs("map"), output_names=["maps", "classes"])
    report = inspect_onnx(proto)
    assert report.output_name == "classes"
    assert "    maps  [B, 8, 8, 8]" in str(report) and "  * classes  [B, 5]" in str(report)
    grafted = graft_onnx(proto, method="cam")
    meta = {entry.key: entry.value for entry in grafted.metadata_props}
    assert meta[fmt.KEY_EXPLAINED_OUTPUT] == "classes"


# -- E. outputs with no image-level score: one line, everywhere


def ctc_recogniser() -> onnx.ModelProto:
    """A text recogniser: the map pooled over its height, a score per time step and
    character ``[B, 25, 97]``, a Softmax over the characters (PaddleOCR's CRNN head)."""
    nodes, initializers = backbone("ctc", height=8, width=100, strides=(2, 4))
    weights = seeded("ctc/fc").standard_normal((CHANNELS, 97)).astype(np.float32)
    initializers.append(numpy_helper.from_array(weights, "fc_w"))
    nodes += [
        helper.make_node("ReduceMean", ["relu_0.tmp_0"], ["column"], axes=[2], keepdims=0),
        helper.make_node("Transpose", ["column"], ["steps"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["steps", "fc_w"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["logits"], axis=2),
    ]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 25, 97])
    return model_of(nodes, [image_value(8, 100)], [output], initializers, "ctc")


def segmenter() -> onnx.ModelProto:
    """A segmentation head: a 1x1 convolution to 4 classes per pixel, upsampled back."""
    nodes, initializers = backbone("segmentation")
    weights = seeded("segmentation/head").standard_normal((4, CHANNELS, 1, 1)).astype(np.float32)
    initializers += [
        numpy_helper.from_array(weights, "head_w"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
    ]
    nodes += [
        helper.make_node("Conv", ["relu_0.tmp_0", "head_w"], ["classes"]),
        helper.make_node("Resize", ["classes", "", "scales"], ["segments"], mode="linear"),
    ]
    output = helper.make_tensor_value_info("segments", TensorProto.FLOAT, ["N", 4, SIZE, SIZE])
    return model_of(nodes, [image_value()], [output], initializers, "segmentation")


def no_map_classifier() -> onnx.ModelProto:
    """Logits ``[B, 5]`` from the image's channel means: no feature map on the way."""
    matrix, bias = classifier_weights("no-map")
    initializers = [
        numpy_helper.from_array(matrix[:3].T.copy(), "fc_w"),
        numpy_helper.from_array(bias, "fc_b"),
    ]
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["p"]),
        helper.make_node("Flatten", ["p"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])
    return model_of(nodes, [image_value()], [output], initializers, "no-map")


CTC_LINE = (
    "output 'logits' is [B, 25, 97] (a score per time step or per box, as CTC text "
    "recognisers and detectors write): fam-core explains an image-level score [B, D] (an "
    "embedding or logits); name one with output: (output_name=)"
)
SEGMENTATION_LINE = (
    "output 'segments' is [B, 4, 16, 16] (a score per pixel, as segmentation models write): "
    "fam-core explains an image-level score [B, D] (an embedding or logits); name one with "
    "output: (output_name=)"
)
NO_MAP_LINE = "output 'logits' [B, 5] is computed from no feature map [B, C, h, w]"
REFUSED = {  # name -> (graph, task, input size, the refusal)
    "ctc": (ctc_recogniser, "classifier", [8, 100], CTC_LINE),
    "segmentation": (segmenter, "classifier", [SIZE, SIZE], SEGMENTATION_LINE),
    "no-map": (no_map_classifier, "classifier", [SIZE, SIZE], NO_MAP_LINE),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_outputs_with_no_image_level_score_are_refused_in_one_line(name, tmp_path) -> None:
    factory, task, size, line = REFUSED[name]
    proto = factory()
    method = "cam" if task == "classifier" else "fam"
    for call in (
        lambda: graft_onnx(proto, method=method),
        lambda: graft_onnx(proto, method="gradcam"),
        lambda: inspect_onnx(proto),
    ):
        with pytest.raises(ValueError) as error:
            call()
        assert str(error.value).startswith(line) and "\n" not in str(error.value)
    path = tmp_path / f"{name}.onnx"
    onnx.save_model(proto, str(path))
    with pytest.raises(ValueError) as error:
        OnnxExplainer(path, graft={"method": method})
    assert str(error.value).startswith(line)


def test_several_outputs_none_of_them_a_score_are_all_named() -> None:
    proto = segmenter()
    proto.graph.output.append(
        helper.make_tensor_value_info("relu_0.tmp_0", TensorProto.FLOAT, ["N", 8, 8, 8])
    )
    with pytest.raises(ValueError) as error:
        graft_onnx(proto, method="cam")
    message = str(error.value)
    assert message.startswith(SEGMENTATION_LINE) and "\n" not in message
    assert message.endswith(
        "; the graph's outputs: 'segments' [B, 4, 16, 16], 'relu_0.tmp_0' [B, 8, 8, 8]"
    )


def write_config(folder: Path, name: str, proto: onnx.ModelProto, task: str, size) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(folder / "model.onnx"))
    config = {"name": name, "task": task, "onnx": "model.onnx", "input_size": size}
    (folder / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    return folder / "config.yaml"


@pytest.mark.parametrize("name", ["ctc", "segmentation"])
def test_the_cli_refuses_them_with_exit_code_2_and_one_line(name, tmp_path, capsys) -> None:
    factory, task, size, line = REFUSED[name]
    proto = factory()
    path = tmp_path / f"{name}.onnx"
    onnx.save_model(proto, str(path))
    config = write_config(tmp_path / name, name, proto, task, size)
    image = tmp_path / "image.png"
    image.write_bytes(png_bytes(3, (size[0], size[1])))
    for argv in (
        ["inspect", str(path)],
        ["inspect", str(config)],
        ["explain", str(image), "--model", str(config), "--out", str(tmp_path / "out")],
    ):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
        assert line in captured.err and captured.err.startswith("fam: error: ")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A registry of two grafted classifiers (Softmax and Sigmoid outputs) and the refused
    graphs, loaded as a server loads them (``keep_going``)."""
    root = tmp_path_factory.mktemp("outputs")
    configs = {
        "softmax": write_config(
            root / "softmax", "softmax", paddle_classifier("Softmax"), "classifier", [SIZE, SIZE]
        ),
        "sigmoid": write_config(
            root / "sigmoid", "sigmoid", paddle_classifier("Sigmoid"), "classifier", [SIZE, SIZE]
        ),
    }
    for name, (factory, task, size, _) in REFUSED.items():
        configs[name] = write_config(root / name, name, factory(), task, size)
    registry = ModelRegistry.load(list(configs.values()), keep_going=True)
    return registry, configs


@pytest.mark.parametrize("activation", ["Softmax", "Sigmoid"])
def test_served_scores_are_the_graphs_probabilities(served, activation) -> None:
    registry, configs = served
    name = activation.lower()
    png = png_bytes(21, (SIZE, SIZE))
    pipeline = Pipeline(registry, batching=None)
    (result,) = pipeline.explain(ExplainRequest(model=name, images=(EncodedImage(png),))).results
    config = ModelConfig.from_file(configs[name])
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0
    image = config.normalize(config.fit(torch.from_numpy(pixels).permute(2, 0, 1)).unsqueeze(0))
    (probabilities,) = run(paddle_classifier(activation), {"x": image.numpy()})
    np.testing.assert_allclose(result.scores, probabilities[0], atol=1e-5)
    assert result.prediction.index == int(probabilities[0].argmax())
    assert result.heatmap is not None


def test_a_server_reports_refused_models_not_ready_and_serves_the_others(served) -> None:
    import grpc

    from fam_core.server import ServerConfig
    from fam_core.server.stubs import fam_pb2, fam_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc

    registry, _ = served
    assert registry.names() == ["sigmoid", "softmax"]
    reasons = {failed.name: failed.reason for failed in registry.failed()}
    assert sorted(reasons) == sorted(REFUSED)
    for name, (_, _, _, line) in REFUSED.items():
        assert reasons[name] == f"onnx: {line}" if name != "no-map" else line in reasons[name]
        assert "\n" not in reasons[name]
    with (
        running_server(registry, ServerConfig(port=0), grace=1.0) as server,
        loopback(server.port) as channel,
    ):
        grpc.channel_ready_future(channel).result(timeout=30)
        oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ready = grpc_service_pb2.ModelReadyRequest
        for name in REFUSED:
            assert not oip.ModelReady(ready(name=name), timeout=30).ready
        for name in ("softmax", "sigmoid"):
            assert oip.ModelReady(ready(name=name), timeout=30).ready
        stub = fam_pb2_grpc.FamServiceStub(channel)
        image = fam_pb2.Image(encoded=png_bytes(22, (SIZE, SIZE)))
        answer = stub.Explain(fam_pb2.ExplainRequest(model="softmax", images=[image]), timeout=30)
        assert len(answer.results) == 1
        with pytest.raises(grpc.RpcError) as error:
            stub.Explain(fam_pb2.ExplainRequest(model="ctc", images=[image]), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "[B, 25, 97]" in error.value.details()
