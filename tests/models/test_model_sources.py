"""Model configs with every torch source (backbone, factory, exported_program), served and
explained as in-process torch; bad configs; a server with one model that failed to load."""

from __future__ import annotations

import sys
import textwrap
import time
import zipfile
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import HandlerContext, load_handler, make_model_dir, png_bytes, running_server

from fam_core import load_model
from fam_core.cli import main
from fam_core.explainers import FAM, GradCAM, GradFAM
from fam_core.graphs.onnx_runtime import OnnxExplainer
from fam_core.models.store import ModelConfig
from fam_core.pipeline import (
    EncodedImage,
    ExplainRequest,
    ModelRegistry,
    NotFound,
    Pipeline,
    ServedModel,
    Unavailable,
    heatmap_from_bytes,
)
from fam_core.pipeline.engine import Job, run_jobs
from fam_core.pipeline.torch_backend import TorchBackend
from fam_core.server import ServerConfig
from fam_core.server.stubs import fam_pb2, fam_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc

NET_SOURCE = textwrap.dedent(
    '''
    """A small user model: conv features, then pooling and a linear head."""
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, num_classes: int = 5, width: int = 6) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                nn.Conv2d(4, width, 3, stride=2, padding=1), nn.ReLU(),
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(width, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.pool(self.features(x)).flatten(1))


    def build(num_classes: int = 5, width: int = 6) -> nn.Module:
        return Net(num_classes, width)


    NOT_CALLABLE = 3
    '''
)
CLASSES = ("a", "b", "c", "d", "e")


class Embedder(torch.nn.Module):
    """An embedding model whose pooling is a functional mean (its head is the identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(4, 6, 3, stride=2, padding=1),
            torch.nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3))


def write_config(folder: Path, **keys: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(keys, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def factory_dir(tmp_path_factory) -> Path:
    """A factory model with its module file next to its config, and trained-looking weights."""
    folder = tmp_path_factory.mktemp("factory")
    (folder / "tinynet.py").write_text(NET_SOURCE)
    torch.manual_seed(1)
    namespace: dict[str, object] = {}
    exec(compile(NET_SOURCE, "tinynet", "exec"), namespace)
    model = namespace["build"](num_classes=5, width=6)  # type: ignore[operator]
    torch.save(model.state_dict(), folder / "weights.pt")
    write_config(
        folder,
        name="tiny-classifier",
        task="classifier",
        factory="tinynet:build",
        factory_kwargs={"num_classes": 5, "width": 6},
        weights="weights.pt",
        target_layer="features",
        input_size=[32, 48],
        resize="letterbox",
        class_names=list(CLASSES),
    )
    return folder


@pytest.fixture(scope="module")
def exported_dir(tmp_path_factory) -> Path:
    """An embedding model saved with torch.export.save (dynamic batch), with prototypes."""
    folder = tmp_path_factory.mktemp("exported")
    torch.manual_seed(2)
    model = Embedder().eval()
    example = torch.rand(2, 3, 24, 24)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, folder / "model.pt2")
    torch.save(model.state_dict(), folder / "eager.pt")  # the test's in-process reference
    with torch.no_grad():
        torch.save(model(torch.rand(3, 3, 24, 24)), folder / "prototypes.pt")
    write_config(
        folder,
        name="tiny-embedder",
        task="embedding",
        exported_program="model.pt2",
        target_layer="features",
        input_size=24,
        class_names=["p", "q", "r"],
        prototypes="prototypes.pt",
    )
    return folder


def eager_embedder(folder: Path) -> torch.nn.Module:
    model = Embedder()
    model.load_state_dict(torch.load(folder / "eager.pt", weights_only=True))
    return model.eval()


def test_factory_from_a_file_next_to_the_config_loads_its_weights(factory_dir) -> None:
    model, config = load_model(factory_dir)
    assert config.source == "factory" and config.image_size == (32, 48)
    state = torch.load(factory_dir / "weights.pt", weights_only=True)
    assert torch.equal(model.fc.weight, state["fc.weight"])
    assert not model.training


def test_factory_from_an_installed_module(tmp_path, monkeypatch) -> None:
    """A module found on sys.path (not next to the config) builds the model."""
    package = tmp_path / "site"
    package.mkdir()
    (package / "fam_test_user_models.py").write_text(NET_SOURCE)
    monkeypatch.syspath_prepend(str(package))
    config = write_config(
        tmp_path / "model",
        name="installed",
        task="classifier",
        factory="fam_test_user_models:Net",
        factory_kwargs={"num_classes": 3},
        target_layer="features",
    )
    model, _ = load_model(config)
    assert type(model).__module__ == "fam_test_user_models"
    assert model(torch.rand(1, 3, 20, 20)).shape == (1, 3)


def test_factory_model_served_equals_in_process_torch(factory_dir) -> None:
    served = ServedModel.load(factory_dir)
    assert isinstance(served.backend, TorchBackend)
    assert served.feature_shape == (16, 24) and served.output_dim == 5
    model, _ = load_model(factory_dir)
    inputs = torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(5))
    (computed,) = run_jobs(served, [Job(inputs, "gradcam")])
    with torch.no_grad():
        predicted = model(inputs).argmax(dim=1)
    assert computed.predicted.tolist() == predicted.tolist()
    expected = GradCAM(model, "features", classifier=True)(inputs, predicted.tolist())
    torch.testing.assert_close(computed.raw, expected.raw)
    (given,) = run_jobs(served, [Job(inputs, "fam", target_class=2)])
    expected = FAM(model, "features", classifier=True)(inputs, [2, 2, 2])
    torch.testing.assert_close(given.raw, expected.raw)


def test_non_square_letterboxed_request_through_the_pipeline(factory_dir) -> None:
    pipeline = Pipeline(ModelRegistry.load([factory_dir]), batching=None)
    request = ExplainRequest("tiny-classifier", (EncodedImage(png_bytes(0, (60, 60))),))
    (result,) = pipeline.explain(request).results
    assert result.heatmap is not None and result.heatmap.shape == (32, 48)
    info = pipeline.describe("tiny-classifier")
    assert info.input_shape == (32, 48) and info.resize == "letterbox"
    assert info.backbone == "factory tinynet:build"


def test_exported_program_served_equals_the_eager_model(exported_dir) -> None:
    served = ServedModel.load(exported_dir)
    assert served.config.source == "exported_program" and served.output_dim == 6
    model = eager_embedder(exported_dir)
    prototypes = torch.load(exported_dir / "prototypes.pt", weights_only=True)
    inputs = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(6))
    for method, cls in (("fam", FAM), ("gradfam", GradFAM)):
        (computed,) = run_jobs(served, [Job(inputs, method)])
        with torch.no_grad():
            scores = torch.nn.functional.cosine_similarity(
                model(inputs).unsqueeze(1), prototypes.unsqueeze(0), dim=2
            )
        assert computed.predicted.tolist() == scores.argmax(dim=1).tolist()
        target = prototypes[scores.argmax(dim=1)].unsqueeze(1)
        expected = cls(model, "features")(inputs, target)
        torch.testing.assert_close(computed.raw, expected.raw, atol=1e-5, rtol=1e-4)


def test_exported_program_through_the_pipeline_matches_the_library(exported_dir) -> None:
    pipeline = Pipeline(ModelRegistry.load([exported_dir]), batching=None)
    png = png_bytes(3, (24, 24))
    request = ExplainRequest("tiny-embedder", (EncodedImage(png),), resolution="feature")
    (result,) = pipeline.explain(request).results
    served = pipeline.registry.get("tiny-embedder")
    pixels, inputs = pipeline._decode((EncodedImage(png),), served)
    model = eager_embedder(exported_dir)
    prototypes = torch.load(exported_dir / "prototypes.pt", weights_only=True)
    nearest = prototypes[result.prediction.index].view(1, 1, -1)
    expected = FAM(model, "features")(inputs, nearest).raw[0]
    low, high = expected.min(), expected.max()
    heatmap = heatmap_from_bytes(result.heatmap.data, result.heatmap.shape)
    assert (heatmap - (expected - low) / (high - low)).abs().max() <= 2e-3  # float16 wire


def torchscript_file(path: Path) -> Path:
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    return path


BAD_CASES = {
    "unknown key": ({"colour": "red"}, "unknown keys \\['colour'\\]"),
    "two sources": ({"exported_program": "model.pt2"}, "source: expected exactly one of"),
    "no source": ({"factory": None}, "source: expected exactly one of .*got none"),
    "bad factory string": ({"factory": "tinynet.build"}, "factory: expected 'package.module"),
    "kwargs of another source": ({"backbone_kwargs": {"width": 1}}, "backbone_kwargs: is not used"),
    "bad input size": ({"input_size": [32, 0]}, "input_size: expected an int or \\[H, W\\]"),
    "bad resize": ({"resize": "squash"}, "resize: expected one of"),
    "target tensor on torch": ({"target_tensor": "x"}, "target_tensor: is not used"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_configs_fail_with_one_line_naming_the_key(factory_dir, tmp_path, case) -> None:
    keys = yaml.safe_load((factory_dir / "config.yaml").read_text())
    change, message = BAD_CASES[case]
    keys.update(change)
    keys = {k: v for k, v in keys.items() if v is not None}
    path = write_config(tmp_path / "bad", **keys)
    with pytest.raises(ValueError, match=message) as error:
        ModelConfig.from_file(path)
    assert "\n" not in str(error.value)


LOAD_CASES = {
    "factory not importable": (
        {"factory": "no_such_package_fam.models:build"},
        "factory: cannot import module 'no_such_package_fam.models'.*install the package "
        "'no_such_package_fam'",
    ),
    "factory attribute missing": ({"factory": "tinynet:nope"}, "factory: module 'tinynet' has no"),
    "factory not callable": (
        {"factory": "tinynet:NOT_CALLABLE"},
        "factory: tinynet:NOT_CALLABLE is",
    ),
    "factory raises": (
        {"factory_kwargs": {"colours": 3}},
        "factory: tinynet:build\\(\\*\\*factory_kwargs\\) raised TypeError",
    ),
    "weights do not match": (
        {"factory_kwargs": {"num_classes": 7, "width": 6}},
        "weights: weights.pt does not match the module: .*size mismatch for fc.weight",
    ),
    "weights missing": ({"weights": "gone.pt"}, "weights: file .*gone.pt is missing"),
    "torchscript weights": (
        {"weights": "scripted.pt"},
        "weights: .*scripted.pt is a TorchScript file; use exported_program: or factory:",
    ),
    "exported program missing": (
        {"factory": None, "weights": None, "factory_kwargs": None, "exported_program": "x.pt2"},
        "exported_program: file .*x.pt2 is missing",
    ),
}


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_bad_sources_fail_at_load_with_one_line(factory_dir, tmp_path, case) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("tinynet.py", "weights.pt"):
        (folder / name).write_bytes((factory_dir / name).read_bytes())
    torchscript_file(folder / "scripted.pt")
    keys = yaml.safe_load((factory_dir / "config.yaml").read_text())
    change, message = LOAD_CASES[case]
    keys.update(change)
    path = write_config(folder, **{k: v for k, v in keys.items() if v is not None})
    for load in (load_model, ServedModel.load):
        with pytest.raises(ValueError, match=message) as error:
            load(path)
        assert "\n" not in str(error.value)
        assert str(error.value).startswith("model 'tiny-classifier': ")


def test_torchscript_weights_in_fam_explain_exit_2_with_one_line(factory_dir, tmp_path, capsys):
    folder = tmp_path / "scripted"
    folder.mkdir()
    (folder / "tinynet.py").write_bytes((factory_dir / "tinynet.py").read_bytes())
    torchscript_file(folder / "weights.pt")
    assert zipfile.is_zipfile(folder / "weights.pt")
    keys = yaml.safe_load((factory_dir / "config.yaml").read_text())
    write_config(folder, **keys)
    image = tmp_path / "image.png"
    image.write_bytes(png_bytes(1))
    code = main(["explain", str(image), "--model", str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "is a TorchScript file; use exported_program: or factory:" in err


def test_fam_explain_with_a_factory_config_writes_an_overlay(factory_dir, tmp_path, capsys):
    image = tmp_path / "wide.png"
    image.write_bytes(png_bytes(2, (40, 90)))
    out = tmp_path / "out"
    assert main(["explain", str(image), "--model", str(factory_dir), "--out", str(out)]) == 0
    assert (out / "wide_cam.png").is_file()


@pytest.fixture(scope="module")
def mixed_server(tmp_path_factory, factory_dir):
    """One good model, and one whose factory package is not installed."""
    root = make_model_dir(tmp_path_factory.mktemp("mixed"))
    bad = yaml.safe_load((factory_dir / "config.yaml").read_text())
    bad.update(name="broken", factory="no_such_package_fam.models:build", weights=None)
    bad_config = write_config(root / "broken", **{k: v for k, v in bad.items() if v is not None})
    registry = ModelRegistry.load([root / "default-classifier", bad_config], keep_going=True)
    with running_server(registry, ServerConfig(port=0)) as server:
        yield server


def test_registry_keeps_the_failure_and_answers_unavailable(mixed_server) -> None:
    registry = mixed_server.pipeline.registry
    assert registry.names() == ["default-classifier"]
    (failed,) = registry.failed()
    assert failed.name == "broken" and failed.task == "classifier"
    assert "install the package 'no_such_package_fam'" in failed.reason
    with pytest.raises(Unavailable, match="model 'broken' failed to load: factory: cannot"):
        registry.get("broken")
    with pytest.raises(NotFound):
        registry.get("nothing")


def test_grpc_server_serves_the_good_model_and_refuses_the_failed_one(mixed_server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{mixed_server.port}") as channel:
        stub = fam_pb2_grpc.FamServiceStub(channel)
        image = fam_pb2.Image(encoded=png_bytes(0))
        good = stub.Explain(fam_pb2.ExplainRequest(model="default-classifier", images=[image]))
        assert good.results[0].heatmap.shape == [84, 84]
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            stub.Explain(fam_pb2.ExplainRequest(model="broken", images=[image]), timeout=10)
        assert time.monotonic() - started < 5
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no_such_package_fam" in error.value.details()
        listed = {m.name: m for m in stub.ListModels(fam_pb2.ListModelsRequest()).models}
        assert listed["default-classifier"].status == "ready"
        assert listed["broken"].status == "failed" and "factory:" in listed["broken"].error
        with pytest.raises(grpc.RpcError) as info_error:
            stub.ModelInfo(fam_pb2.ModelInfoRequest(model="broken"))
        assert info_error.value.code() == grpc.StatusCode.UNAVAILABLE

        oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ready = grpc_service_pb2.ModelReadyRequest
        assert oip.ModelReady(ready(name="default-classifier")).ready
        assert not oip.ModelReady(ready(name="broken")).ready
        assert oip.ServerReady(grpc_service_pb2.ServerReadyRequest()).ready

        health = health_pb2_grpc.HealthStub(channel)
        status = health_pb2.HealthCheckResponse
        check = health_pb2.HealthCheckRequest
        assert health.Check(check(service="default-classifier")).status == status.SERVING
        assert health.Check(check(service="broken")).status == status.NOT_SERVING
        assert health.Check(check(service="")).status == status.SERVING


def test_serve_command_loads_models_and_refuses_when_none_loads(tmp_path, factory_dir) -> None:
    from fam_core.pipeline.models import load_registry

    registry = load_registry(None, [str(factory_dir), str(tmp_path / "missing.yaml")])
    assert registry.names() == ["tiny-classifier"]
    assert [f.name for f in registry.failed()] == ["missing"]
    with pytest.raises(ValueError, match="no model loaded: missing: unknown model"):
        load_registry(None, [str(tmp_path / "missing.yaml")])


def test_archive_of_a_factory_model_carries_its_module_and_loads_unpacked(
    factory_dir, tmp_path
) -> None:
    """The unpacked .mar (one flat folder, as TorchServe's model_dir) serves the same model."""
    pytest.importorskip("model_archiver", reason="torch-model-archiver is not installed")
    from fam_core.commands.archive import archive_notes, build_archive

    assert archive_notes(ModelConfig.from_file(factory_dir / "config.yaml")) == []
    path = build_archive(factory_dir, tmp_path / "archives")
    unpacked = tmp_path / "model_dir"
    with zipfile.ZipFile(path) as archive:
        assert {"config.yaml", "weights.pt", "tinynet.py", "fam_handler.py"} <= set(
            archive.namelist()
        )
        archive.extractall(unpacked)
    served = ServedModel.load(unpacked)
    inputs = torch.rand(1, 3, 32, 48)
    (got,) = run_jobs(served, [Job(inputs, "cam")])
    (want,) = run_jobs(ServedModel.load(factory_dir), [Job(inputs, "cam")])
    torch.testing.assert_close(got.raw, want.raw)


def test_archive_of_an_exported_program_flattens_its_file_names(exported_dir, tmp_path) -> None:
    pytest.importorskip("model_archiver", reason="torch-model-archiver is not installed")
    from fam_core.commands.archive import build_archive

    nested = tmp_path / "nested"
    (nested / "files").mkdir(parents=True)
    for name in ("model.pt2", "prototypes.pt"):
        (nested / "files" / name).write_bytes((exported_dir / name).read_bytes())
    keys = yaml.safe_load((exported_dir / "config.yaml").read_text())
    keys.update(exported_program="files/model.pt2", prototypes="files/prototypes.pt")
    write_config(nested, **keys)
    unpacked = tmp_path / "model_dir"
    with zipfile.ZipFile(build_archive(nested, tmp_path / "archives")) as archive:
        archive.extractall(unpacked)
    config = yaml.safe_load((unpacked / "config.yaml").read_text())
    assert (config["exported_program"], config["prototypes"]) == ("model.pt2", "prototypes.pt")
    assert ServedModel.load(unpacked).num_prototypes == 3


def test_archive_note_names_the_package_to_install(tmp_path, capsys) -> None:
    pytest.importorskip("model_archiver", reason="torch-model-archiver is not installed")
    package = tmp_path / "site"
    package.mkdir()
    (package / "fam_test_archived_models.py").write_text(NET_SOURCE)
    config = write_config(
        tmp_path / "model", name="installed", task="classifier",
        factory="fam_test_archived_models:build", target_layer="features",
    )  # fmt: skip
    assert main(["archive", str(config), "--out", str(tmp_path / "archives")]) == 0
    err = capsys.readouterr().err
    assert "install the package 'fam_test_archived_models' in TorchServe's Python" in err


def test_torchserve_handler_answers_503_with_the_reason_when_the_model_fails(tmp_path) -> None:
    pytest.importorskip("ts", reason="TorchServe is not installed")
    import json

    module = load_handler("fam_handler_under_test")
    folder = tmp_path / "model_dir"
    write_config(folder, name="broken", task="classifier", factory="no_such_package_fam:b")
    handler = module.FamHandler()
    context = HandlerContext(folder)
    handler.initialize(context)
    rows = handler.handle([{"body": b"x"}, {"body": b"y"}], context)
    assert [context.statuses[i][0] for i in range(2)] == [503, 503]
    body = json.loads(rows[0])
    assert "no_such_package_fam" in json.dumps(body) and "UNAVAILABLE" in json.dumps(body)


def test_torchserve_handler_without_fam_core_answers_503_instead_of_dying(
    tmp_path, monkeypatch
) -> None:
    pytest.importorskip("ts", reason="TorchServe is not installed")
    import json
    import sys

    monkeypatch.setitem(sys.modules, "fam_core.pipeline", None)  # its import now fails
    module = load_handler("fam_handler_without_fam_core")
    assert module.FAM_IMPORT_ERROR is not None
    handler = module.FamHandler()
    context = HandlerContext(tmp_path)
    context.model_name = "served-name"  # type: ignore[attr-defined]
    handler.initialize(context)
    (row,) = handler.handle([{"body": b"x"}], context)
    assert context.statuses[0][0] == 503
    message = json.loads(row)["message"]
    assert message.startswith("model 'served-name' failed to load: fam_core cannot be imported")
    assert sys.executable in message and "\n" not in message


def test_fam_export_of_a_factory_classifier_serves_like_torch(factory_dir, tmp_path) -> None:
    folder = tmp_path / "square"
    folder.mkdir()
    for name in ("tinynet.py", "weights.pt"):
        (folder / name).write_bytes((factory_dir / name).read_bytes())
    keys = yaml.safe_load((factory_dir / "config.yaml").read_text())
    keys.update(input_size=32, resize="crop")
    write_config(folder, **keys)
    graph = tmp_path / "tiny_cam.onnx"
    assert main(["export", str(folder), "--method", "cam", "--out", str(graph)]) == 0
    inputs = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    (got,) = run_jobs(ServedModel.load(graph), [Job(inputs, "cam")])
    (want,) = run_jobs(ServedModel.load(folder), [Job(inputs, "cam")])
    assert got.predicted.tolist() == want.predicted.tolist()
    torch.testing.assert_close(got.raw, want.raw, atol=1e-4, rtol=1e-4)


def test_fam_export_of_an_exported_program_matches_the_eager_model(exported_dir, tmp_path):
    """The unflattened program is traced by make_fx (the TorchScript tracer cannot)."""
    graph = tmp_path / "exported.onnx"
    assert main(["export", str(exported_dir), "--out", str(graph)]) == 0
    images = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(9))
    references = torch.rand(2, 6, generator=torch.Generator().manual_seed(10))
    got = OnnxExplainer(graph)(images, references=references)
    want = FAM(eager_embedder(exported_dir), "features")(images, target=references)
    torch.testing.assert_close(got.maps, want.maps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.weights, want.weights, atol=1e-4, rtol=1e-4)


def test_a_factory_that_imports_missing_transformers_names_the_hf_extra(
    tmp_path, monkeypatch
) -> None:
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "hub_model.py").write_text("import transformers\n\n\ndef build():\n    pass\n")
    path = write_config(folder, name="hub", task="embedding", factory="hub_model:build")
    monkeypatch.setitem(sys.modules, "transformers", None)  # not installed
    with pytest.raises(ValueError) as error:
        load_model(path)
    assert str(error.value) == (
        "model 'hub': factory: module 'hub_model' imports transformers, which is not "
        "installed: pip install 'fam-core[hf]'"
    )
