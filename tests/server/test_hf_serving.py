"""Models nobody here wrote, served: Hugging Face ``transformers`` models (small configs, seeded
random weights, see ``hf_factories.py``) behind every config source, over gRPC (fam.v1 and
the Open Inference Protocol) and TorchServe, checked against the library's own explanation.

Every config leaves ``target_layer`` out: it is found from the dataflow. Sources:
``factory:`` (the factory module next to the config, ``weights:`` a state dict),
``exported_program:`` (``torch.export.save`` of the HF module, which returns a
``ModelOutput``) and ``onnx:`` (a plain ``torch.onnx.export``, grafted at load: ViT's class
token and ConvNeXt's mean-then-LayerNorm heads are not affine, and are grafted through their
per-sample Jacobian, the head interpreted in torch). An ONNX graph whose head uses an
operator the graft cannot interpret (``Atan``) is refused: the server starts the others and
reports that one not ready with its one-line reason.

The library's explanation: the explainer of the served method with ``target_layer=None``
and the config's ``output``/``task``, on the eager module with the same weights, on the image
preprocessed by the config (``fit`` then ``normalize``). Heatmaps travel as float16.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from serving_helpers import loopback, png_bytes, running_server

from fam_core.explainers import get_explainer
from fam_core.models.store import ModelConfig
from fam_core.pipeline import BatchingConfig, ModelRegistry, heatmap_from_bytes
from fam_core.server import ServerConfig
from fam_core.server.oip import pack_bytes, unpack_bytes
from fam_core.server.stubs import fam_pb2, fam_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc

transformers = pytest.importorskip("transformers")
import hf_factories  # noqa: E402 - needs transformers

FACTORIES = Path(hf_factories.__file__)
SIZE = hf_factories.SIZE
TIMEOUT = 60
HEATMAP_ATOL = 2e-3  # float16 on the wire (2.4e-4 at 1.0), and onnxruntime vs torch

# name -> (factory, task, output, with prototypes)
FACTORY_MODELS = {
    "hf-resnet-reid": ("resnet", "embedding", "pooler_output", True),
    "hf-resnet-classifier": ("resnet_classifier", "classifier", None, False),
    "hf-convnext": ("convnext", "embedding", "pooler_output", False),
    "hf-mobilenetv2": ("mobilenetv2", "embedding", "pooler_output", True),
    "hf-vit": ("vit", "embedding", "pooler_output", False),
    "hf-dinov2": ("dinov2", "embedding", "pooler_output", True),
}
EXPORTED_MODELS = {"hf-resnet-exported": ("resnet", "embedding", "pooler_output", True)}
ONNX_MODELS = {  # plain torch.onnx.export files, grafted at load
    "hf-resnet-classifier-onnx": ("resnet_classifier", "classifier", None, False),
    "hf-mobilenetv2-onnx": ("mobilenetv2", "embedding", None, False),
    "hf-convnext-onnx": ("convnext", "embedding", None, False),
    "hf-vit-onnx": ("vit", "embedding", None, False),
}
REFUSED = "hf-atan-onnx"
ALL_MODELS = {**FACTORY_MODELS, **EXPORTED_MODELS, **ONNX_MODELS}
ONNX_GRAFT_REASON = "the head uses the ONNX operator Atan, which the graft cannot interpret"


class AtanEmbedding(torch.nn.Module):
    """A ResNet embedding squashed by ``atan``: an operator the graft does not interpret."""

    def __init__(self) -> None:
        super().__init__()
        self.model = hf_factories.resnet()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.atan(self.model(images).pooler_output.flatten(1))


def build(factory: str) -> torch.nn.Module:
    return getattr(hf_factories, factory)()


def write_config(folder: Path, **keys: object) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in keys.items() if v is not None}))
    return path


def prototypes_of(model: torch.nn.Module, output: str | None, seed: int) -> torch.Tensor:
    """Three prototypes: embeddings of random images."""
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    explainer = get_explainer("fam")(model, None, output=output, task="embedding")
    with torch.no_grad():
        return explainer.embed(images)


def make_models(root: Path) -> dict[str, Path]:
    """Each model's folder with its config.yaml (and factory module, weights, prototypes)."""
    folders: dict[str, Path] = {}
    for index, (name, (factory, task, output, with_prototypes)) in enumerate(ALL_MODELS.items()):
        folder = root / name
        folder.mkdir(parents=True)
        model = build(factory)
        prototypes = None
        if with_prototypes:
            torch.save(prototypes_of(model, output, seed=index), folder / "prototypes.pt")
            prototypes = "prototypes.pt"
        keys: dict[str, object] = {
            "name": name,
            "task": task,
            "output": output,
            "input_size": SIZE,
            "prototypes": prototypes,
            "class_names": ["a", "b", "c"] if with_prototypes else None,
        }
        if name in FACTORY_MODELS:
            shutil.copy(FACTORIES, folder / FACTORIES.name)
            torch.save(model.state_dict(), folder / "weights.pt")
            keys.update(factory=f"hf_factories:{factory}", weights="weights.pt")
        elif name in EXPORTED_MODELS:
            example = torch.rand(2, 3, SIZE, SIZE)
            batch = torch.export.Dim("batch", min=1, max=64)
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, folder / "model.pt2")
            keys.update(exported_program="model.pt2")
        else:
            export_onnx(model, folder / "model.onnx")
            keys.update(onnx="model.onnx", output=None)
        write_config(folder, **keys)
        folders[name] = folder
    refused = root / REFUSED
    refused.mkdir()
    export_onnx(AtanEmbedding().eval(), refused / "model.onnx")
    write_config(refused, name=REFUSED, task="embedding", onnx="model.onnx", input_size=SIZE)
    folders[REFUSED] = refused
    return folders


def export_onnx(model: torch.nn.Module, path: Path) -> None:
    """A plain export, as a user would write it: default names, a fixed batch of one."""
    from onnx_helpers import user_export

    user_export(model, torch.rand(1, 3, SIZE, SIZE), path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("hf-models"))


def eager(folders: dict[str, Path], name: str) -> torch.nn.Module:
    """The eager module with the served model's weights."""
    factory = ALL_MODELS[name][0]
    model = build(factory)
    weights = folders[name] / "weights.pt"
    if weights.is_file():  # exported and ONNX models were saved from build(factory) itself
        model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def library_explanation(
    folders: dict[str, Path],
    name: str,
    png: bytes,
    method: str,
    *,
    target_class: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(heatmap [H, W], scores, predicted)`` of the library on the decoded PNG."""
    factory, task, output, _ = ALL_MODELS[name]
    if name in ONNX_MODELS:  # the graph's output is the logits / the pooled embedding
        output = "pooler_output" if task == "embedding" else None
    config = ModelConfig.from_file(folders[name] / "config.yaml")
    model = eager(folders, name)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0
    image = config.fit(torch.from_numpy(pixels).permute(2, 0, 1))
    inputs = config.normalize(image.unsqueeze(0))
    explainer = get_explainer(method)(model, None, output=output, task=task, input_size=SIZE)
    with torch.no_grad():
        outputs = explainer.embed(inputs)
    prototypes = config.load_prototypes()
    target: object
    if task == "classifier":
        scores = torch.softmax(outputs, dim=1)[0]
        predicted = int(scores.argmax())
        target = predicted if target_class is None else target_class
    elif prototypes is not None:
        scores = torch.nn.functional.cosine_similarity(outputs, prototypes, dim=1)
        predicted = int(scores.argmax())
        target = prototypes[predicted].view(1, 1, -1)
    else:
        scores, predicted, target = torch.zeros(0), -1, None  # the embedding explains itself
    return explainer(inputs, target).maps[0], scores, predicted


@pytest.fixture(scope="module")
def server(folders):
    registry = ModelRegistry.load(
        [folders[name] / "config.yaml" for name in (*ALL_MODELS, REFUSED)], keep_going=True
    )
    config = ServerConfig(port=0, batching=BatchingConfig(8, 1.0))
    with running_server(registry, config) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server):  # waits until the server reports SERVING
    with loopback(server.port) as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        health = health_pb2_grpc.HealthStub(channel)
        end = time.monotonic() + TIMEOUT
        serving = health_pb2.HealthCheckResponse.SERVING
        while health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status != serving:
            assert time.monotonic() < end, "the server did not report SERVING in time"
            time.sleep(0.1)
        yield channel


IMAGES = {"square": png_bytes(11, (SIZE, SIZE)), "wide": png_bytes(12, (72, 100))}


def test_the_ungraftable_onnx_model_is_refused_in_one_line_and_the_others_serve(
    server, channel
) -> None:
    registry = server.pipeline.registry
    assert registry.names() == sorted(ALL_MODELS)
    (failed,) = registry.failed()
    assert failed.name == REFUSED and "\n" not in failed.reason
    assert failed.reason.startswith("onnx: ")
    assert re.search(ONNX_GRAFT_REASON, failed.reason), failed.reason
    oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    ready = grpc_service_pb2.ModelReadyRequest
    assert not oip.ModelReady(ready(name=REFUSED), timeout=TIMEOUT).ready
    assert all(oip.ModelReady(ready(name=name), timeout=TIMEOUT).ready for name in ALL_MODELS)
    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest
    assert health.Check(check(service=REFUSED)).status == health_pb2.HealthCheckResponse.NOT_SERVING
    stub = fam_pb2_grpc.FamServiceStub(channel)
    request = fam_pb2.ExplainRequest(
        model=REFUSED, images=[fam_pb2.Image(encoded=IMAGES["square"])]
    )
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        stub.Explain(request, timeout=10)
    assert time.monotonic() - started < 5
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Atan" in error.value.details()


@pytest.mark.parametrize("name", sorted(FACTORY_MODELS))
def test_model_info_reports_the_layer_found_from_the_dataflow(channel, folders, name) -> None:
    stub = fam_pb2_grpc.FamServiceStub(channel)
    info = stub.ModelInfo(fam_pb2.ModelInfoRequest(model=name), timeout=TIMEOUT)
    factory, task, output, _ = FACTORY_MODELS[name]
    explainer = get_explainer("fam")(eager(folders, name), None, output=output, task=task)
    assert info.target_layer == explainer.target_layer
    assert info.backbone == f"factory hf_factories:{factory}"
    assert list(info.input_shape) == [SIZE, SIZE]


def explain(channel, name: str, png: bytes, **fields: object) -> fam_pb2.Result:
    stub = fam_pb2_grpc.FamServiceStub(channel)
    request = fam_pb2.ExplainRequest(model=name, images=[fam_pb2.Image(encoded=png)], **fields)
    (result,) = stub.Explain(request, timeout=TIMEOUT).results
    return result


def assert_matches_the_library(
    result_heatmap: torch.Tensor,
    scores: list[float],
    predicted: int,
    expected: tuple[torch.Tensor, torch.Tensor, int],
    atol: float,
) -> None:
    heatmap, want_scores, want_predicted = expected
    assert float(heatmap.max() - heatmap.min()) > 0.5, "the library's map is flat"
    assert result_heatmap.shape == heatmap.shape
    assert (result_heatmap - heatmap).abs().max() <= atol
    assert predicted == want_predicted
    np.testing.assert_allclose(scores, want_scores.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("image", sorted(IMAGES))
@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_fam_v1_explain_matches_the_library(channel, folders, name, image) -> None:
    png = IMAGES[image]
    result = explain(channel, name, png)
    method = "cam" if ALL_MODELS[name][1] == "classifier" else "fam"
    assert result.heatmap.method == method and result.heatmap.dtype == "float16"
    served = heatmap_from_bytes(result.heatmap.data, tuple(result.heatmap.shape))
    expected = library_explanation(folders, name, png, method)
    assert_matches_the_library(
        served, list(result.scores), result.prediction.index, expected, HEATMAP_ATOL
    )


@pytest.mark.parametrize(
    ("name", "method", "target_class"),
    [
        ("hf-resnet-classifier", "gradcam", 2),  # not the predicted class (0)
        ("hf-resnet-classifier", "fam", 1),
        ("hf-vit", "gradfam", None),
        ("hf-dinov2", "gradfam", None),
        ("hf-convnext", "gradcam", None),
    ],
)
def test_other_methods_and_a_given_class_match_the_library(
    channel, folders, name, method, target_class
) -> None:
    png = IMAGES["square"]
    fields: dict[str, object] = {"method": method}
    if target_class is not None:
        fields["target_class"] = target_class
    result = explain(channel, name, png, **fields)
    assert result.heatmap.method == method
    served = heatmap_from_bytes(result.heatmap.data, tuple(result.heatmap.shape))
    expected = library_explanation(folders, name, png, method, target_class=target_class)
    assert_matches_the_library(
        served, list(result.scores), result.prediction.index, expected, HEATMAP_ATOL
    )


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_oip_model_infer_matches_the_library(channel, folders, name) -> None:
    oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    png = IMAGES["wide"]
    request = grpc_service_pb2.ModelInferRequest(model_name=name)
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(pack_bytes([png]))
    response = oip.ModelInfer(request, timeout=TIMEOUT)
    outputs = {
        o.name: (o, raw)
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    heatmap_out, heatmap_raw = outputs["heatmap"]
    assert heatmap_out.datatype == "FP16" and list(heatmap_out.shape) == [1, SIZE, SIZE]
    served = torch.from_numpy(
        np.frombuffer(heatmap_raw, dtype="<f2").astype(np.float32).reshape(SIZE, SIZE)
    )
    scores_out, scores_raw = outputs["scores"]
    scores = np.frombuffer(scores_raw, dtype="<f4").reshape(list(scores_out.shape))[0]
    method = heatmap_out.parameters["method"].string_param
    expected = library_explanation(folders, name, png, method)
    (label,) = unpack_bytes(outputs["label"][1])
    _, _, predicted = expected
    config = ModelConfig.from_file(folders[name] / "config.yaml")
    if predicted >= 0:
        want = config.class_names[predicted] if config.class_names else str(predicted)
        assert label.decode() == want
    assert_matches_the_library(served, list(scores), predicted, expected, HEATMAP_ATOL)


def test_an_exported_hf_program_serves_in_a_process_without_transformers(folders) -> None:
    """The program's output is a ``ModelOutput``; loading it must not need transformers."""
    script = (
        "import json, sys, torch\n"
        "from fam_core.pipeline import ServedModel\n"
        "from fam_core.pipeline.engine import Job, run_jobs\n"
        f"served = ServedModel.load({str(folders['hf-resnet-exported'])!r})\n"
        f"inputs = torch.rand(2, 3, {SIZE}, {SIZE}, generator=torch.Generator().manual_seed(4))\n"
        "(computed,) = run_jobs(served, [Job(inputs, 'fam')])\n"
        "print(json.dumps({'transformers': 'transformers' in sys.modules,\n"
        "                  'raw': computed.raw.tolist(), 'scores': computed.scores.tolist()}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert not got["transformers"]
    model = eager(folders, "hf-resnet-exported")
    config = ModelConfig.from_file(folders["hf-resnet-exported"] / "config.yaml")
    inputs = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    explainer = get_explainer("fam")(model, None, output="pooler_output", task="embedding")
    prototypes = config.load_prototypes()
    with torch.no_grad():
        embedding = explainer.embed(inputs)
    scores = torch.nn.functional.cosine_similarity(
        embedding.unsqueeze(1), prototypes.unsqueeze(0), dim=2
    )
    torch.testing.assert_close(torch.tensor(got["scores"]), scores, atol=1e-5, rtol=1e-4)
    expected = explainer(inputs, prototypes[scores.argmax(dim=1)].unsqueeze(1)).raw
    torch.testing.assert_close(torch.tensor(got["raw"]), expected, atol=1e-4, rtol=1e-4)


# -- TorchServe: one server, two factory models archived as `fam archive CONFIG` does

TORCHSERVE_MODELS = ("hf-resnet-reid", "hf-dinov2")


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory, folders):
    from torchserve_helpers import Server, torchserve_missing

    reason = torchserve_missing()
    if reason is not None:
        pytest.skip(reason)
    builds = tuple({"name_or_config": folders[name] / "config.yaml"} for name in TORCHSERVE_MODELS)
    root = tmp_path_factory.mktemp("hf-torchserve")
    running = Server(root, archives=(), extra=builds, batch_size=2, max_batch_delay_ms=10)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def test_fam_archive_carries_the_factory_module(folders, tmp_path, capsys) -> None:
    pytest.importorskip("model_archiver", reason="torch-model-archiver is not installed")
    import zipfile

    from fam_core.cli import main

    config = folders["hf-dinov2"] / "config.yaml"
    assert main(["archive", str(config), "--out", str(tmp_path)]) == 0
    assert "note" not in capsys.readouterr().err  # nothing to install in TorchServe's Python
    with zipfile.ZipFile(tmp_path / "hf-dinov2.mar") as archive:
        names = set(archive.namelist())
        packed = yaml.safe_load(archive.read("config.yaml"))
    assert {"hf_factories.py", "weights.pt", "prototypes.pt", "fam_handler.py"} <= names
    assert packed["factory"] == "hf_factories:dinov2" and packed.get("target_layer") is None


@pytest.mark.parametrize("image", sorted(IMAGES))
@pytest.mark.parametrize("name", TORCHSERVE_MODELS)
def test_torchserve_predictions_match_the_library(torchserve, folders, name, image) -> None:
    from torchserve_helpers import decode_heatmap, http

    png = IMAGES[image]
    status, body, _ = http("POST", f"{torchserve.inference}/predictions/{name}", png)
    assert status == 200, body[:500]
    (result,) = json.loads(body)["results"]
    assert result["heatmap"]["method"] == "fam" and result["heatmap"]["shape"] == [SIZE, SIZE]
    expected = library_explanation(folders, name, png, "fam")
    assert_matches_the_library(
        decode_heatmap(result["heatmap"]),
        result["scores"],
        result["prediction"]["index"],
        expected,
        HEATMAP_ATOL,
    )


def test_fam_inspect_reports_layers_of_factory_and_onnx_configs(folders, capsys) -> None:
    from fam_core.cli import main

    def inspect(name: str) -> str:
        assert main(["inspect", str(folders[name] / "config.yaml")]) == 0
        return capsys.readouterr().out

    report = inspect("hf-resnet-reid")
    assert "target layer: encoder.stages.3\n" in report and "output: [64] (embedding)" in report
    report = inspect("hf-dinov2")
    assert "target layer: encoder.layer.1\n" in report
    assert "head after the target layer: jacobian" in report  # the class token's last block
    report = inspect("hf-resnet-classifier-onnx")
    assert "chosen target tensor: /resnet/encoder/stages.3/" in report
    assert "head: global average pooling + affine map [5 x 64]" in report
    report = inspect("hf-convnext-onnx")
    assert "head: jacobian: not affine (first non-affine node" in report
    assert "LayerNormalization" in report and "interpreted in torch" in report
    report = inspect(REFUSED)
    assert "head: cannot be grafted: " in report and "Atan" in report


def test_an_onnx_config_names_the_graph_output_to_explain(folders, tmp_path) -> None:
    import onnx

    from fam_core.pipeline import ServedModel

    source = folders["hf-mobilenetv2-onnx"]
    graph = onnx.load(str(source / "model.onnx"), load_external_data=False)
    pooled = [o.name for o in graph.graph.output if len(o.type.tensor_type.shape.dim) == 2]
    (name,) = pooled  # the pooled embedding; the other output is the feature map itself
    keys = yaml.safe_load((source / "config.yaml").read_text())
    shutil.copy(source / "model.onnx", tmp_path / "model.onnx")
    write_config(tmp_path, **{**keys, "output": name})
    served = ServedModel.load(tmp_path)
    assert served.output_dim == 1280 and served.config.output == name
    write_config(tmp_path, **{**keys, "output": "no-such-output"})
    with pytest.raises(ValueError, match="no-such-output") as error:
        ServedModel.load(tmp_path)
    assert "\n" not in str(error.value)
    write_config(tmp_path, **{**keys, "output": 1})
    with pytest.raises(ValueError, match="output: expected the name of a graph output"):
        ModelConfig.from_file(tmp_path / "config.yaml")
