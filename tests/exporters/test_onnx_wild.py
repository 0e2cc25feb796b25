"""ONNX files from the wild: each zoo file (tests/helpers/onnx_zoo.py) explained like the reference.

For every file a real exporter could have written (old opsets, a ``-1`` or symbolic batch,
Constant-node weights, external data, float16, int8, NHWC and uint8 inputs, Softmax /
LogSoftmax / Sigmoid / L2-normalised outputs, two outputs, greyscale, PaddleOCR's classifier,
a Keras and a TFLite classifier converted by tf2onnx) CAM and Grad-CAM are compared with an independent map
(tests/helpers/reference_cam.py: the tensor before the pooling tapped from the ORIGINAL file by
onnxruntime, the head's matrix read off the graph), at the library level (``graft_onnx`` then
``OnnxExplainer``) and served from an ``onnx:`` config over the Open Inference Protocol.
Files that hold nothing to explain (no ``[B, C]`` output, missing external data) must be
refused in one line, and a server must report them not ready.

Maps match when their correlation is above 0.99 or they differ by less than 1e-3 anywhere;
float16 and int8 files are compared with the map of their own (dequantized) graph, and the
correlation of that map with the float model's is printed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from onnx_zoo import BUILT_HERE, REFUSED, ZOO, Zoo, ZooModel, zoo_classifier
from reference_cam import correlation, reference_maps
from tolerances import assert_top_classes

from fam_core.exporters.graft import graft_onnx
from fam_core.graphs.onnx_runtime import OnnxExplainer

EMBEDDINGS = ("l2-reduce", "l2-lpnorm")
"""L2-normalised embeddings: explained as served, by FAM / Grad-FAM, not by the classifier's
CAM of the logits before the normalisation (tests/exporters/test_onnx_outputs.py checks them against
the torch FAM and the un-normalised Grad-FAM)."""
SERVABLE = tuple(name for name in ZOO if name not in REFUSED and name not in EMBEDDINGS)
QUANTIZED = ("float16-io32", "float16", "qdq-int8", "dynamic-int8-head", "fer-tflite")
METHODS = ("cam", "gradcam")
SERVED = SERVABLE
"""The files served over OIP: every servable one, each asked for CAM and Grad-CAM."""
BATCH = 3
MIN_CORRELATION = 0.99
MAX_DIFFERENCE = 1e-3


def preprocessing(model: ZooModel) -> dict[str, tuple[float, ...]]:
    """Mean 0 and std 1 per channel: the models take [0, 1] pixels. A uint8 model sets
    none: it normalises its pixels itself, and the graft feeds it 0-255."""
    if model.input_dtype == "uint8":
        return {}
    return {"mean": (0.0,) * model.channels, "std": (1.0,) * model.channels}


TIMEOUT = 60


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("onnx-zoo"))


def pixels(model: ZooModel, seed: int = 5) -> np.ndarray:
    """``[B, 3, H, W]`` uint8 images; ``R = G = B`` for a greyscale model, so that any
    grey conversion whose weights sum to one gives the channel the model reads."""
    generator = np.random.default_rng(seed)
    values = generator.integers(0, 256, (BATCH, 3, *model.input_size), dtype=np.uint8)
    if model.channels == 1:
        values[:, 1:] = values[:, :1]
    return values


def in_unit_range(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32) / np.float32(255.0)


def assert_maps_match(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    for i, (got, want) in enumerate(zip(actual, expected, strict=True)):
        difference = float(np.abs(got - want).max())
        if difference < MAX_DIFFERENCE:
            continue
        r = correlation(got, want)
        assert r > MIN_CORRELATION, (
            f"{what}, image {i}: correlation {r:.4f} <= {MIN_CORRELATION} and max |difference| "
            f"{difference:.2e} >= {MAX_DIFFERENCE}"
        )


def report_float_correlation(zoo: Zoo, model: ZooModel, maps: np.ndarray, method: str) -> None:
    if model.float_twin is None:
        return
    images = in_unit_range(pixels(model))
    own = reference_maps(model, images)
    twin = reference_maps(zoo[model.float_twin], images, classes=own.classes)
    print(
        f"{model.name} {method}: correlation with the float model's map {correlation(maps, twin.maps[method]):.4f}"
    )


# -- the reference itself


def torch_source(model: ZooModel) -> tuple[torch.nn.Module, torch.Tensor]:
    """The float torch classifier a zoo file was exported from, and its input for the
    test images."""
    images = torch.from_numpy(in_unit_range(pixels(model)))
    if model.name == "greyscale":
        return zoo_classifier("zoo-greyscale", channels=1), images[:, :1]
    if model.name == "uint8-input":  # the graph's own Cast -> Sub -> Div
        return zoo_classifier(), (torch.from_numpy(pixels(model)).float() - 127.5) / 127.5
    return zoo_classifier(), images


TORCH_SOURCED = tuple(name for name in BUILT_HERE if name not in REFUSED and name not in QUANTIZED)


@pytest.mark.parametrize("name", TORCH_SOURCED)
def test_reference_maps_equal_cam_from_the_torch_model(zoo, name) -> None:
    """The reference (onnxruntime taps, W read off the graph) against hooks on the torch
    classifier the file was exported from."""
    model = zoo[name]
    source, inputs = torch_source(model)
    with torch.no_grad():
        features = source.features(inputs).double()
        logits = source(inputs)
    reference = reference_maps(model, in_unit_range(pixels(model)))
    assert_top_classes(reference.classes, logits)
    np.testing.assert_allclose(reference.activations, features.numpy(), rtol=1e-4, atol=1e-4)
    weight = source.fc.weight.detach().double()
    np.testing.assert_allclose(reference.weight, weight.numpy(), atol=1e-6)
    rows = weight[torch.from_numpy(reference.classes)]
    cam = torch.einsum("bn,bnhw->bhw", rows, features).numpy()
    np.testing.assert_allclose(reference.raw["cam"], cam, rtol=1e-4, atol=1e-4)


SOFTMAX_OUTPUTS = ("softmax", "paddle-softmax", "ppocr-cls", "fer-keras", "fer-tflite")


@pytest.mark.parametrize("name", SOFTMAX_OUTPUTS)
def test_reference_head_reproduces_the_file_s_softmax(zoo, name) -> None:
    """``W`` read off the graph and the tapped maps give the file's own output: for
    ``p = softmax(W mean(A) + b)``, ``log p`` centred over the classes is ``W mean(A)``
    centred, up to a constant per image (the bias cancels between two images)."""
    model = zoo[name]
    reference = reference_maps(model, in_unit_range(pixels(model)))
    pooled = reference.activations.mean(axis=(2, 3)) @ reference.weight.T  # [B, C]
    logs = np.log(reference.outputs)
    differences = [values[0] - values[1:] for values in (pooled, logs)]
    centred = [d - d.mean(axis=1, keepdims=True) for d in differences]
    scale = np.abs(centred[0]).max()
    assert scale > 0.1, "the images give the same output: the test would not see a wrong W"
    np.testing.assert_allclose(centred[1], centred[0], atol=1e-4 * scale)


def test_gradcam_of_a_linear_head_is_cam_over_hw() -> None:
    """For GAP + linear, ``dz_c/dA`` is ``W[c] / hw`` at every position (autograd), so
    Grad-CAM's weights are CAM's divided by ``hw`` and its map is ``ReLU(CAM) / hw``."""
    model = zoo_classifier()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    features = model.features(images).detach().requires_grad_(True)
    logits = model.fc(model.pool(features).flatten(1))
    classes = logits.argmax(1)
    (gradient,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), features)
    area = features.shape[2] * features.shape[3]
    weights = gradient.mean(dim=(2, 3))  # Grad-CAM's channel weights
    torch.testing.assert_close(weights * area, model.fc.weight[classes].detach())
    gradcam = torch.relu(torch.einsum("bn,bnhw->bhw", weights, features))
    cam = torch.einsum("bn,bnhw->bhw", model.fc.weight[classes], features)
    torch.testing.assert_close(gradcam, torch.relu(cam) / area)


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantized_files_stay_close_to_the_float_model(zoo, name) -> None:
    model = zoo[name]
    images = in_unit_range(pixels(model))
    own = reference_maps(model, images)
    twin = reference_maps(zoo[model.float_twin], images, classes=own.classes)
    assert_top_classes(own.classes, torch.from_numpy(twin.outputs), 0.05)
    scale = np.abs(twin.weight).max()
    assert np.abs(own.weight - twin.weight).max() <= 0.01 * scale  # dequantized W, read off
    for method in METHODS:
        r = correlation(own.maps[method], twin.maps[method])
        print(f"{name} {method}: own graph's map vs the float model's, correlation {r:.4f}")
        assert r > 0.9, f"{name} {method}: correlation {r:.4f} with the float model's map"


# -- the library: graft_onnx, then OnnxExplainer


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", SERVABLE)
def test_grafted_file_explains_like_the_reference(zoo, name, method, tmp_path) -> None:
    model = zoo[name]
    images = in_unit_range(pixels(model))
    reference = reference_maps(model, images)
    path = graft_onnx(
        model.path,
        method=method,
        task="classifier",
        input_size=model.input_size,
        class_input=True,
        out_path=tmp_path / f"{name}-{method}.onnx",
        **preprocessing(model),
    )
    runner = OnnxExplainer(path)
    explanation = runner(
        runner.preprocess(torch.from_numpy(images)), class_index=reference.classes.tolist()
    )
    assert runner.method == method
    assert_top_classes(reference.classes, explanation.extras["logits"], 0.05)
    height, width = reference.activations.shape[2:]
    weights = reference.weight[reference.classes]  # CAM: W[c]; Grad-CAM: W[c] / hw
    expected = weights / (height * width) if method == "gradcam" else weights
    scale = np.abs(expected).max()
    difference = np.abs(explanation.weights.numpy() - expected).max() / scale
    tolerance = 1e-4 if model.precision == "float32" else 2e-2
    assert difference <= tolerance, (
        f"{name} {method} weights: max |difference| / {scale:.3g} = {difference:.2e}"
    )
    maps = explanation.maps.numpy()
    assert_maps_match(maps, reference.maps[method], f"{name} {method}")
    report_float_correlation(zoo, model, maps, method)


@pytest.mark.parametrize("name", REFUSED)
def test_refused_file_is_a_one_line_value_error(zoo, name, tmp_path) -> None:
    model = zoo[name]
    with pytest.raises(ValueError) as error:
        graft_onnx(model.path, method="cam", task="classifier", out_path=tmp_path / "g.onnx")
    message = str(error.value)
    assert "\n" not in message.strip() and model.refusal in message, message


# -- served from onnx: configs, over the Open Inference Protocol


def write_config(folder: Path, model: ZooModel) -> None:
    folder.mkdir(parents=True)
    shutil.copy(model.path, folder / "model.onnx")
    data = model.path.with_name("weights.data")
    if data.is_file():
        shutil.copy(data, folder)
    height, width = model.input_size
    lines = "".join(f"{key}: {list(values)}\n" for key, values in preprocessing(model).items())
    (folder / "config.yaml").write_text(
        f"name: {model.name}\ntask: classifier\nonnx: model.onnx\n"
        f"input_size: [{height}, {width}]\nresize: resize\n{lines}"
    )


@pytest.fixture(scope="module")
def server(zoo, tmp_path_factory):
    """A server over every servable file of ``SERVED`` that exists and the refused ones
    (a third-party file that is missing fails its own tests, not the others)."""
    from fam_core.pipeline import ModelRegistry
    from fam_core.server import FamServer, ServerConfig

    root = tmp_path_factory.mktemp("wild-models")
    for name in (*SERVED, *REFUSED):
        try:
            model = zoo[name]
        except FileNotFoundError:
            continue
        write_config(root / name, model)
    registry = ModelRegistry.from_directory(root, keep_going=True)
    with FamServer(registry, ServerConfig(port=0)) as running:
        yield running


@pytest.fixture(scope="module")
def oip(channel):
    from fam_core.server.stubs import grpc_service_pb2_grpc

    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def infer(oip, model: str, values: np.ndarray, method: str):  # noqa: ANN201
    from fam_core.server.stubs import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="pixels", datatype="UINT8", shape=list(values.shape))
    request.raw_input_contents.append(np.ascontiguousarray(values).tobytes())
    request.parameters["method"].string_param = method
    request.outputs.add(name="scores")
    request.outputs.add(name="heatmap")
    return oip.ModelInfer(request, timeout=TIMEOUT)


def outputs_of(response) -> dict[str, np.ndarray]:  # noqa: ANN001
    dtypes = {"FP32": "<f4", "FP16": "<f2"}
    return {
        output.name: np.frombuffer(raw, dtype=dtypes[output.datatype]).reshape(output.shape)
        for output, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", SERVED)
def test_served_file_explains_like_the_reference(zoo, server, oip, name, method) -> None:
    from fam_core.server.stubs import grpc_service_pb2 as pb

    model = zoo[name]  # a missing third-party file fails here, with what to run
    reasons = {failed.name: failed.reason for failed in server.pipeline.registry.failed()}
    assert oip.ModelReady(pb.ModelReadyRequest(name=name), timeout=TIMEOUT).ready, (
        f"{name} is not ready: {reasons.get(name)}"
    )
    values = pixels(model)
    got = outputs_of(infer(oip, name, values, method))
    classes = got["scores"].argmax(axis=1)
    reference = reference_maps(model, in_unit_range(values), classes=classes)
    assert_top_classes(classes, torch.from_numpy(reference.outputs), 0.05)
    heatmap = got["heatmap"].astype(np.float32)
    assert_maps_match(heatmap, reference.maps[method], f"{name} {method} over OIP")
    report_float_correlation(zoo, model, heatmap, method)


@pytest.mark.parametrize("name", REFUSED)
def test_refused_file_is_not_ready_with_a_one_line_reason(zoo, server, oip, name) -> None:
    from fam_core.server.stubs import grpc_service_pb2 as pb

    model = zoo[name]
    assert not oip.ModelReady(pb.ModelReadyRequest(name=name), timeout=TIMEOUT).ready
    (failed,) = [f for f in server.pipeline.registry.failed() if f.name == name]
    assert "\n" not in failed.reason and model.refusal in failed.reason, failed.reason
    with pytest.raises(grpc.RpcError) as error:
        infer(oip, name, pixels(model), "cam")
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "\n" not in error.value.details() and model.refusal in error.value.details()
