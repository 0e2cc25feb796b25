"""Plain ONNX files served from ``onnx:`` configs: every graftable method per request, and
greyscale inputs.

The models are tiny torch modules exported by plain ``torch.onnx.export`` (no fam-core
metadata); the expected heatmaps come from the library's own graft of each method
(:func:`fam_core.exporters.graft.graft_onnx` run by onnxruntime), fed the images the way the
server should preprocess them, computed here independently (crop-free sizes, hand-written
normalisation and BT.601 luminance).
"""

from __future__ import annotations

import io
import threading
import zlib
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import torch
from onnx_helpers import user_export
from PIL import Image
from torch import nn

from fam_core.cli import main
from fam_core.exporters.graft import graft_onnx
from fam_core.exporters.onnx_graph import drop_output
from fam_core.graphs.onnx_runtime import OnnxExplainer
from fam_core.images.read import decode_image
from fam_core.models.store import ModelConfig
from fam_core.pipeline import (
    EncodedImage,
    ExplainRequest,
    ModelRegistry,
    NotFound,
    Pipeline,
    heatmap_from_bytes,
)
from fam_core.pipeline.engine import Job, run_jobs
from fam_core.server import FamServer, ServerConfig
from fam_core.server.stubs import fam_pb2, fam_pb2_grpc
from fam_core.server.stubs import grpc_service_pb2 as oip_pb2
from fam_core.server.stubs import grpc_service_pb2_grpc as oip_pb2_grpc

SIZE = 16  # images are sent at this size: fitting them to the input is the identity
TOLERANCE = 2e-3  # float16 heatmaps against float32 onnxruntime maps
MEAN, STD = (0.45, 0.5, 0.55), (0.2, 0.25, 0.3)
TIMEOUT = 60


def _seeded(name: str) -> None:
    torch.manual_seed(zlib.crc32(name.encode()))


def _trunk(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1),
        nn.ReLU(),
    )


def classifier(channels: int = 3, classes: int = 5) -> nn.Module:
    """Conv maps ``[12, 8, 8]``, global average pooling, a linear classifier."""
    _seeded(f"classifier-{channels}")
    return nn.Sequential(
        _trunk(channels), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, classes)
    ).eval()


def embedder() -> nn.Module:
    """Conv maps, global average pooling, a linear projection to 6 dimensions."""
    _seeded("embedder")
    return nn.Sequential(_trunk(3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 6)).eval()


def mlp_classifier() -> nn.Module:
    """A head that is not linear after pooling: CAM cannot read class weights from it."""
    _seeded("mlp-classifier")
    return nn.Sequential(
        _trunk(3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 10),
        nn.Tanh(),
        nn.Linear(10, 4),
    ).eval()


def plain_export(model: nn.Module, path: Path, channels: int = 3) -> Path:
    user_export(
        model,
        torch.rand(1, channels, SIZE, SIZE),
        path,
        input_names=["input"],
        dynamic_axes={"input": {0: "batch"}},
    )
    return path


def _model_dir(root: Path, name: str, model: nn.Module, config: str, channels: int = 3) -> Path:
    folder = root / name
    folder.mkdir()
    plain_export(model, folder / "model.onnx", channels)
    (folder / "config.yaml").write_text(
        f"name: {name}\nonnx: model.onnx\ninput_size: {SIZE}\n{config}"
    )
    return folder


def _yaml_list(values) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


NORMALISATION = f"mean: {_yaml_list(MEAN)}\nstd: {_yaml_list(STD)}\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plain-onnx")
    _model_dir(root, "classifier", classifier(), f"task: classifier\n{NORMALISATION}")
    _model_dir(root, "embedder", embedder(), f"task: embedding\n{NORMALISATION}")
    _model_dir(
        root, "grey", classifier(channels=1), "task: classifier\nmean: [0.4]\nstd: [0.3]\n", 1
    )
    return root


@pytest.fixture(scope="module")
def registry(models) -> ModelRegistry:
    return ModelRegistry.load(
        [models / name / "config.yaml" for name in ("classifier", "embedder", "grey")]
    )


@pytest.fixture(scope="module")
def server(registry):
    with FamServer(registry, ServerConfig(port=0)) as running:
        yield running


def png(seed: int) -> bytes:
    """A colour ``SIZE`` x ``SIZE`` PNG (smooth, so its channels differ everywhere)."""
    generator = np.random.default_rng(seed)
    pixels = generator.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def rgb(data: bytes) -> np.ndarray:
    """``[3, SIZE, SIZE]`` float32 in [0, 1], decoded by Pillow here."""
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
    return pixels.transpose(2, 0, 1)


def normalised(pixels: np.ndarray, mean, std) -> torch.Tensor:
    mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    return torch.from_numpy(((pixels - mean) / std).astype(np.float32)[None])


def library_graft(path: Path, method: str, **options) -> OnnxExplainer:
    """The library's own graft of ``method`` onto the plain file, run by onnxruntime."""
    grafted = graft_onnx(path, method=method, out_path=path.with_name(f"{method}.onnx"), **options)
    return OnnxExplainer(grafted)


def fam_explain(channel, model: str, image: bytes, method: str = "", **fields):
    stub = fam_pb2_grpc.FamServiceStub(channel)
    request = fam_pb2.ExplainRequest(
        model=model, images=[fam_pb2.Image(encoded=image)], method=method, **fields
    )
    (result,) = stub.Explain(request, timeout=TIMEOUT).results
    return result.heatmap.method, heatmap_from_bytes(
        result.heatmap.data, tuple(result.heatmap.shape)
    )


def oip_infer(channel, model: str, image: bytes, method: str):
    stub = oip_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = oip_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(len(image).to_bytes(4, "little") + image)
    request.parameters["method"].string_param = method
    reply = stub.ModelInfer(request, timeout=TIMEOUT)
    names = [output.name for output in reply.outputs]
    heatmap = reply.outputs[names.index("heatmap")]
    values = np.frombuffer(reply.raw_output_contents[names.index("heatmap")], dtype=np.float16)
    return heatmap.parameters["method"].string_param, torch.from_numpy(
        values.astype(np.float32).reshape(tuple(heatmap.shape))[0]
    )


def test_plain_classifier_serves_cam_and_gradcam_per_request(models, registry, channel) -> None:
    served = registry.get("classifier")
    assert served.methods == ("cam", "gradcam") and served.default_method == "cam"
    info = fam_pb2_grpc.FamServiceStub(channel).ModelInfo(
        fam_pb2.ModelInfoRequest(model="classifier"), timeout=TIMEOUT
    )
    assert list(info.methods) == ["cam", "gradcam"] and info.default_method == "cam"
    image = png(5)  # its CAM has negative evidence, which Grad-CAM's ReLU drops
    inputs = normalised(rgb(image), MEAN, STD)
    path = models / "classifier" / "model.onnx"
    explained = {}
    for method in ("cam", "gradcam"):
        want = library_graft(path, method, mean=MEAN, std=STD)(inputs)
        for front in (fam_explain, oip_infer):
            answered, heatmap = front(channel, "classifier", image, method)
            assert answered == method
            assert (heatmap - want.maps[0]).abs().max() <= TOLERANCE, (front.__name__, method)
        explained[method] = want
    assert explained["cam"].raw.min() < 0 <= explained["gradcam"].raw.min()
    assert (explained["cam"].maps - explained["gradcam"].maps).abs().max() > 0.02
    assert fam_explain(channel, "classifier", image)[0] == "cam"  # the default


def test_feature_resolution_runs_the_graph_without_its_input_size_branch(models) -> None:
    """``resolution="feature"``: the same low-resolution map from a session whose graph has no
    ``heatmap`` output and none of the nodes only it read (no upsampling, no min-max over the
    full map); the maps are the raw map min-max normalised by hand here."""
    runner = library_graft(models / "classifier" / "model.onnx", "cam", mean=MEAN, std=STD)
    inputs = torch.cat([normalised(rgb(png(seed)), MEAN, STD) for seed in (5, 6)])
    full = runner(inputs)
    feature = runner(inputs, resolution="feature")
    torch.testing.assert_close(feature.raw, full.raw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feature.scores, full.scores)
    low = full.raw.flatten(1).amin(1).view(-1, 1, 1)
    high = full.raw.flatten(1).amax(1).view(-1, 1, 1)
    torch.testing.assert_close(feature.maps, (full.raw - low) / (high - low), rtol=0, atol=1e-5)
    assert feature.maps.shape == full.raw.shape and full.maps.shape[-2:] == (SIZE, SIZE)
    assert feature.extras["resolution"] == "feature" and "resolution" not in full.extras
    lean = [value.name for value in runner._feature_graph().get_outputs()]
    assert "heatmap" not in lean and "heatmap_lowres" in lean
    assert runner._feature_graph() is runner._feature_graph()  # made once
    nodes = len(onnx.load(str(runner.path)).graph.node)
    lean_nodes = drop_output(onnx.load(str(runner.path)), "heatmap").graph.node
    assert len(lean_nodes) < nodes - 4  # the upsampling and the full-size min-max
    assert not {"ReduceMin", "ReduceMax", "Resize"} & {node.op_type for node in lean_nodes}
    with pytest.raises(
        ValueError, match=r"resolution must be one of \['input', 'feature'\], got 'pixel'"
    ):
        runner(inputs, resolution="pixel")


def test_a_feature_resolution_request_is_served_without_input_size_maps(
    models, registry, channel
) -> None:
    """Over fam.v1 a feature-resolution heatmap is the min-max of the same raw map; the
    pipeline runs the graph's feature-resolution session and makes no input-size maps."""
    image = png(5)
    inputs = normalised(rgb(image), MEAN, STD)
    want = library_graft(models / "classifier" / "model.onnx", "gradcam", mean=MEAN, std=STD)(
        inputs, resolution="feature"
    )
    _, heatmap = fam_explain(
        channel, "classifier", image, "gradcam", resolution=fam_pb2.RESOLUTION_FEATURE
    )
    assert heatmap.shape == want.raw.shape[1:]
    assert (heatmap - want.maps[0]).abs().max() <= TOLERANCE
    served = registry.get("classifier")
    (feature,) = run_jobs(served, [Job(inputs, "gradcam", resolution="feature")])
    (full,) = run_jobs(served, [Job(inputs, "gradcam")])
    assert feature.maps is None and full.maps is not None and full.maps.shape[-2:] == (SIZE, SIZE)
    torch.testing.assert_close(feature.raw, full.raw, rtol=1e-5, atol=1e-6)
    low = feature.raw.flatten(1).amin(1).view(-1, 1, 1)
    high = feature.raw.flatten(1).amax(1).view(-1, 1, 1)  # made once, by the runner
    torch.testing.assert_close(
        feature.feature_maps, (feature.raw - low) / (high - low), atol=1e-5, rtol=0
    )
    assert full.feature_maps is None
    assert Job(inputs, "cam", resolution="feature").batch_key() != Job(inputs, "cam").batch_key()


def test_plain_embedding_model_serves_fam_and_gradfam(models, registry) -> None:
    assert registry.get("embedder").methods == ("fam", "gradfam")
    pipeline = Pipeline(registry, batching=None)
    image, reference = png(2), png(3)
    path = models / "embedder" / "model.onnx"
    maps = {}
    for method in ("fam", "gradfam"):
        runner = library_graft(path, method, mean=MEAN, std=STD)
        probe = torch.ones(1, 6)
        embedded = runner(normalised(rgb(reference), MEAN, STD), references=probe)
        want = runner(normalised(rgb(image), MEAN, STD), references=embedded.extras["embedding"])
        request = ExplainRequest(
            "embedder",
            (EncodedImage(image),),
            method=method,
            references=(EncodedImage(reference),),
        )
        (result,) = pipeline.explain(request).results
        heatmap = heatmap_from_bytes(result.heatmap.data, result.heatmap.shape)
        assert result.heatmap.method == method
        assert (heatmap - want.maps[0]).abs().max() <= TOLERANCE
        assert result.explained_score == pytest.approx(float(want.scores[0]), abs=1e-4)
        maps[method] = want.maps[0]
    assert (maps["fam"] - maps["gradfam"]).abs().max() > 0.05
    pipeline.close()


@pytest.mark.parametrize(
    ("method", "reason", "code"),
    [
        ("scorefam", "method 'scorefam': not exportable to ONNX", grpc.StatusCode.NOT_FOUND),
        ("fam", "method 'fam': grafted onto embedding models only", grpc.StatusCode.NOT_FOUND),
        ("nope", "unknown method 'nope'", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_methods_the_file_cannot_take_are_refused(channel, method, reason, code) -> None:
    """A method the file does not serve is NOT_FOUND; a name that is no method at all is
    INVALID_ARGUMENT: both as for a torch model."""
    expected = f"model 'classifier': {reason}"
    with pytest.raises(grpc.RpcError) as fam_error:
        fam_explain(channel, "classifier", png(4), method)
    with pytest.raises(grpc.RpcError) as oip_error:
        oip_infer(channel, "classifier", png(4), method)
    for error in (fam_error.value, oip_error.value):
        assert error.code() == code
        assert error.details().startswith(expected), error.details()
        assert "expected one of ['cam', 'gradcam']" in error.details()


def test_each_method_is_grafted_once_under_concurrent_first_requests(models, monkeypatch) -> None:
    from fam_core.pipeline import onnx_methods

    grafted: list[str] = []
    real = onnx_methods.OnnxExplainer

    def counting(path, *args, graft=None, **kwargs):
        grafted.append(graft["method"])
        return real(path, *args, graft=graft, **kwargs)

    registry = ModelRegistry.load([models / "classifier" / "config.yaml"], keep_going=False)
    backend = registry.get("classifier").backend
    monkeypatch.setattr(onnx_methods, "OnnxExplainer", counting)
    start = threading.Barrier(4)
    runners = []

    def first_request() -> None:
        start.wait()
        runners.append(backend.runner_for("gradcam"))

    threads = [threading.Thread(target=first_request) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert grafted == ["gradcam"]  # "cam", the default, was grafted at load
    assert len({id(runner) for runner in runners}) == 1 and runners[0].method == "gradcam"
    assert backend.runner_for("cam") is backend.runner


@pytest.mark.parametrize(
    ("name", "model", "default"),
    [("mlp", mlp_classifier, "gradcam"), ("linear", classifier, "cam")],
)
def test_a_plain_classifier_is_grafted_once_at_load(tmp_path, monkeypatch, name, model, default):
    """The default method is known from the graph's analysis before any graft: a head CAM
    cannot read is grafted with Grad-CAM only, not tried with CAM first."""
    from fam_core.exporters import graft

    grafted: list[str] = []
    real = graft.graft_onnx

    def counting(model, **options):
        grafted.append(options["method"])
        return real(model, **options)

    folder = _model_dir(tmp_path, name, model(), f"task: classifier\n{NORMALISATION}")
    monkeypatch.setattr(graft, "graft_onnx", counting)
    served = ModelRegistry.load([folder / "config.yaml"], keep_going=False).get(name)
    assert grafted == [default] and served.default_method == default


def test_a_head_cam_cannot_read_serves_gradcam_only(tmp_path) -> None:
    folder = _model_dir(
        tmp_path, "mlp", mlp_classifier(), f"task: classifier\nmethod: gradcam\n{NORMALISATION}"
    )
    served = ModelRegistry.load([folder / "config.yaml"], keep_going=False).get("mlp")
    assert served.methods == ("gradcam",) and served.default_method == "gradcam"
    with pytest.raises(NotFound, match=r"method 'cam': the head is not global average pooling"):
        served.check_method("cam")
    (tmp_path / "mlp" / "config.yaml").write_text(
        f"name: mlp\nonnx: model.onnx\ninput_size: {SIZE}\ntask: classifier\n{NORMALISATION}"
    )
    plain = ModelRegistry.load([folder / "config.yaml"], keep_going=False).get("mlp")
    assert plain.default_method == "gradcam" and plain.methods == ("gradcam",)  # not CAM
    assert "CAM needs global average pooling" in plain.default_choice.reason


def test_config_method_is_the_default_and_is_checked_at_load(tmp_path) -> None:
    folder = _model_dir(
        tmp_path, "chosen", classifier(), f"task: classifier\nmethod: gradcam\n{NORMALISATION}"
    )
    served = ModelRegistry.load([folder / "config.yaml"], keep_going=False).get("chosen")
    assert served.default_method == "gradcam" and served.methods == ("cam", "gradcam")
    assert served.backend.runner.method == "gradcam"  # grafted at load
    (folder / "config.yaml").write_text(
        f"name: chosen\nonnx: model.onnx\ninput_size: {SIZE}\ntask: classifier\nmethod: scorefam\n"
    )
    (failed,) = ModelRegistry.load([folder / "config.yaml"]).failed()
    assert failed.reason == "method: 'scorefam' not exportable to ONNX"


def test_torch_config_method_is_the_default(tmp_path) -> None:
    from serving_helpers import make_model_dir

    root = make_model_dir(tmp_path)
    config = root / "default-classifier" / "config.yaml"
    written = ModelConfig.from_file(config)
    replace(written, method="gradcam").to_file(config)
    served = ModelRegistry.load([config], keep_going=False).get("default-classifier")
    assert served.default_method == "gradcam"
    replace(written, method="nope").to_file(config)
    (failed,) = ModelRegistry.load([config]).failed()
    assert failed.reason.startswith("method: unknown method 'nope'")


def test_inspect_lists_the_methods_and_why_not_the_others(models, capsys) -> None:
    assert main(["inspect", str(models / "classifier" / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert "methods (classifier): cam, gradcam\n" in out
    assert "  scorefam: not exportable to ONNX\n" in out
    assert "  fam: grafted onto embedding models only (a classifier takes cam, gradcam)\n" in out
    assert main(["inspect", str(models / "embedder" / "model.onnx")]) == 0  # no config: both
    out = capsys.readouterr().out
    assert "methods (classifier): cam, gradcam\n" in out
    assert "methods (embedding): fam, gradfam\n" in out
    assert "  fam:" not in out and "  layercam: not exportable to ONNX\n" in out
    assert main(["inspect", str(models / "grey" / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert "[B, 1, 16, 16]" in out and "methods (classifier): cam, gradcam\n" in out
    assert "candidate target tensors (4," in out and "Gather" not in out  # no probe adapter


def test_luminance_is_pillows_convert_l_before_its_rounding() -> None:
    from fam_core.images.read import to_channels

    pixels = np.random.default_rng(5).integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    pillow = np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.float32)
    ours = to_channels(torch.from_numpy(pixels).permute(2, 0, 1).float(), 1)[0].numpy()
    assert np.abs(ours - pillow).max() <= 0.5 + 1e-3  # Pillow rounds to 8 bits


def test_greyscale_classifier_is_served_on_the_luminance(models, registry, channel) -> None:
    served = registry.get("grey")
    assert served.config.channels == 1 and served.config.mean == (0.4,)
    image = png(6)
    pixels = rgb(image)
    luminance = 0.299 * pixels[0] + 0.587 * pixels[1] + 0.114 * pixels[2]
    inputs = normalised(luminance[None], (0.4,), (0.3,))
    assert torch.allclose(decode_image(image), torch.from_numpy(pixels))
    for method in ("cam", "gradcam"):
        runner = library_graft(models / "grey" / "model.onnx", method, mean=(0.4,), std=(0.3,))
        assert runner.channels == 1
        want = runner(inputs).maps[0]
        answered, heatmap = fam_explain(channel, "grey", image, method)
        assert answered == method and (heatmap - want).abs().max() <= TOLERANCE
        # the graft's runner gives greyscale graphs the luminance of RGB images too
        ran = runner(runner.preprocess(torch.from_numpy(pixels)))
        assert (ran.maps[0] - want).abs().max() <= 1e-4


def test_greyscale_graft_takes_one_channel_and_other_counts_are_refused(tmp_path) -> None:
    import onnx

    grey = plain_export(classifier(channels=1), tmp_path / "grey.onnx", channels=1)
    grafted = graft_onnx(grey, method="gradcam", mean=(0.5,), std=(0.25,))
    (image,) = grafted.graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert image.name == "image" and dims == ["batch", 1, SIZE, SIZE]
    names = [t.name for t in grafted.graph.initializer]
    names += [name for node in grafted.graph.node for name in (node.name, *node.input)]
    assert not [name for name in names if "fam_channels" in name]  # the probe adapter is gone
    props = {prop.key: prop.value for prop in grafted.metadata_props}
    assert '"channels": 1' in props["preprocessing"]
    _seeded("four")
    four = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    path = plain_export(nn.Sequential(four, nn.Flatten(), nn.Linear(8, 3)), tmp_path / "4.onnx", 4)
    with pytest.raises(ValueError, match=r"has 4 channels: expected 1 \(greyscale\) or 3"):
        graft_onnx(onnx.load(str(path)), method="cam")


def test_greyscale_model_with_three_channel_normalisation_is_refused(tmp_path) -> None:
    folder = _model_dir(
        tmp_path, "grey3", classifier(channels=1), f"task: classifier\n{NORMALISATION}", 1
    )
    (failed,) = ModelRegistry.load([folder / "config.yaml"]).failed()
    assert failed.reason == (
        "mean: model.onnx takes 1 channel(s): got 3 values for a 1-channel (greyscale) "
        "model: expected one value, e.g. [0.5]"
    )
    (folder / "config.yaml").write_text(
        f"name: grey3\nonnx: model.onnx\ninput_size: {SIZE}\ntask: classifier\nstd: [0.3]\n"
    )
    (failed,) = ModelRegistry.load([folder / "config.yaml"]).failed()
    assert failed.reason.startswith("mean: model.onnx takes 1 channel(s)")
    assert failed.reason.endswith("(ImageNet's mean: the default)")
    with pytest.raises(ValueError, match=r"^std: got 3 values for a 1-channel"):
        graft_onnx(folder / "model.onnx", method="cam", mean=(0.5,))


GREY_FACTORY = """
from torch import nn


def build():
    trunk = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU()
    )
    return nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))
"""


def test_torch_greyscale_config_matches_the_onnx_greyscale_model(tmp_path, channel) -> None:
    """``channels: 1`` on a torch config: the same luminance, so the same CAM as the ONNX
    graph of the same weights (served by the module's server)."""
    folder = tmp_path / "grey-torch"
    folder.mkdir()
    (folder / "grey_factory.py").write_text(GREY_FACTORY)
    torch.save(classifier(channels=1).state_dict(), folder / "weights.pt")
    (folder / "config.yaml").write_text(
        "name: grey-torch\ntask: classifier\nfactory: grey_factory:build\nweights: weights.pt\n"
        f"input_size: {SIZE}\nchannels: 1\nmean: [0.4]\nstd: [0.3]\ntarget_layer: '0'\n"
    )
    registry = ModelRegistry.load([folder / "config.yaml"], keep_going=False)
    assert registry.get("grey-torch").feature_shape == (8, 8)
    pipeline = Pipeline(registry, batching=None)
    image = png(7)
    for method in ("cam", "gradcam"):
        (result,) = pipeline.explain(
            ExplainRequest("grey-torch", (EncodedImage(image),), method=method)
        ).results
        heatmap = heatmap_from_bytes(result.heatmap.data, result.heatmap.shape)
        _, served_onnx = fam_explain(channel, "grey", image, method)
        assert (heatmap - served_onnx).abs().max() <= TOLERANCE
    pipeline.close()
    (folder / "config.yaml").write_text(
        (folder / "config.yaml").read_text().replace("mean: [0.4]", "mean: [0.4, 0.4, 0.4]")
    )
    (failed,) = ModelRegistry.load([folder / "config.yaml"]).failed()
    assert "mean: got 3 values for a 1-channel (greyscale) model" in failed.reason


def test_fam_explain_chooses_the_method_of_a_plain_onnx_model(models, tmp_path, capsys) -> None:
    image = tmp_path / "image.png"
    image.write_bytes(png(8))
    config = str(models / "classifier" / "config.yaml")
    out = tmp_path / "out"
    for method in ("cam", "gradcam"):
        argv = ["explain", str(image), "--model", config, "--method", method, "--out", str(out)]
        assert main(argv) == 0
        assert (out / f"image_{method}.png").is_file()
    capsys.readouterr()
    argv = ["explain", str(image), "--model", config, "--method", "scorefam", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "method 'scorefam': not exportable to ONNX" in err
