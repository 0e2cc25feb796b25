"""ONNX export: parity of every output with torch (FAM, autograd, torchcam), the file format,
a run with onnxruntime alone, and clear errors."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from model_helpers import conv4_config
from tolerances import assert_top_classes
from torch import nn

from fam_core.anatomy.pooling import GlobalPool
from fam_core.cli import main
from fam_core.data.flowers import SPLITS, make_flowers
from fam_core.explainers.fam.fam import FAM
from fam_core.explainers.fam.gradfam import GradFAM
from fam_core.explainers.postprocess import min_max, upsample
from fam_core.exporters import export_model
from fam_core.exporters.analytic import similarity_gradient
from fam_core.graphs import onnx_format as fmt
from fam_core.graphs.onnx_runtime import OnnxExplainer
from fam_core.maths.similarity import similarity
from fam_core.models.backbones import build_backbone
from fam_core.models.store import IMAGENET_MEAN, IMAGENET_STD

SIZE = 84
ATOL = 1e-4
# (backbone, target layer, embedding_dim): some embeddings go through a linear head (eq. 18)
BACKBONES = [
    ("conv4", "block4", None),
    ("conv64f", "block4", 12),
    ("resnet12", "layer4", None),
    ("resnet18", "layer4", 20),
]
NUM_CLASSES = 7


def make_model(name: str, *, embedding_dim: int | None = None, num_classes: int | None = None):
    torch.manual_seed(zlib.crc32(name.encode()) % 1000)  # hash() of a str varies per process
    model = build_backbone(name, width=0.25, embedding_dim=embedding_dim, num_classes=num_classes)
    # non-trivial BatchNorm statistics so eval-mode BN is not the identity
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    flowers = normalise(make_flowers(SPLITS["novel"][:5], per_class=1, seed=3).images)
    random = torch.randn(5, 3, SIZE, SIZE, generator=generator)
    return {"random5": random, "random1": random[:1], "flowers5": flowers, "flowers1": flowers[3:4]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """Export lazily, once per (backbone, method); returns (model, OnnxExplainer, layer)."""
    cache: dict[tuple[str, str], tuple[nn.Module, OnnxExplainer, str]] = {}
    folder = tmp_path_factory.mktemp("onnx")

    def get(backbone: str, method: str):
        key = (backbone, method)
        if key not in cache:
            name, layer, dim = next(b for b in BACKBONES if b[0] == backbone)
            if method in ("fam", "gradfam"):
                model = make_model(name, embedding_dim=dim)
            else:
                model = make_model(name, num_classes=NUM_CLASSES)
            path = export_model(
                model,
                method=method,
                path=folder / f"{name}_{method}.onnx",
                target_layer=layer,
                input_size=SIZE,
            )
            cache[key] = (model, OnnxExplainer(path), layer)
        return cache[key]

    return get


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Within ATOL absolute for values in [-1, 1] (heatmaps, cosine scores, FAM weights);
    outputs of larger magnitude (un-normalised maps, logits) are compared relative to their
    largest value, since float32 resolves ~1e-7 of it (a map of ~500 has 6e-5 steps)."""
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    scale = max(1.0, expected.abs().max().item())
    difference = (actual.float() - expected.float()).abs().max().item() / scale
    assert difference <= ATOL, f"{what}: max |difference| / {scale:.3g} = {difference:.2e}"


def hooked(model: nn.Module, layer: str, images: torch.Tensor, grad: bool = False):
    """The model's outputs and the target layer's activations (kept in the graph if grad)."""
    captured: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _m, _i, output: captured.append(output)
    )
    try:
        with torch.set_grad_enabled(grad):
            outputs = model(images)
    finally:
        handle.remove()
    return outputs, captured[-1]


BATCHES = ["random1", "random5", "flowers1", "flowers5"]


@pytest.mark.parametrize("backbone", [b[0] for b in BACKBONES])
@pytest.mark.parametrize("batch", BATCHES)
def test_fam_parity_with_torch_fam(backbone, batch, exported, inputs) -> None:
    model, runner, layer = exported(backbone, "fam")
    images = inputs[batch]
    references = FAM(model, layer).embed(torch.randn(4, 3, SIZE, SIZE)) + 0.1
    expected = FAM(model, target_layer=layer)(images, target=references)
    actual = runner(images, references=references)
    close(actual.maps, expected.maps, "heatmap")
    close(actual.raw, expected.raw, "heatmap_lowres")
    close(actual.weights, expected.weights, "weights")
    close(actual.scores, expected.scores, "explained score")
    with torch.no_grad():
        embedding = model(images)
    close(actual.extras["embedding"], embedding, "embedding")
    pair_scores = similarity(embedding, references.expand(len(images), -1, -1), "cosine")
    close(actual.extras["pair_scores"], pair_scores, "scores")
    assert actual.method == "fam" and actual.target_layer == layer


def autograd_gradfam(model, layer, images, references):
    """Grad-FAM by autograd: w = spatial mean of dS/dA, S = mean_k cos(z', r_k) (eq. 11).

    In float64: the cosine gradient is orthogonal to the embedding, so the weighted sum of
    the maps cancels heavily and a float32 reference would be the noisier side.
    """
    model, images, references = copy.deepcopy(model).double(), images.double(), references.double()
    outputs, activations = hooked(model, layer, images.clone().requires_grad_(True), grad=True)
    score = similarity(outputs, references.expand(len(images), -1, -1), "cosine").mean(dim=1)
    (gradient,) = torch.autograd.grad(score.sum(), activations)
    weights = gradient.mean(dim=(2, 3))
    raw = torch.relu(torch.einsum("bn,bnhw->bhw", weights, activations.detach()))
    return weights.float(), raw.float(), upsample(raw, images.shape[-2:])


@pytest.mark.parametrize("backbone", [b[0] for b in BACKBONES])
@pytest.mark.parametrize("batch", BATCHES)
def test_gradfam_parity_with_autograd(backbone, batch, exported, inputs) -> None:
    model, runner, layer = exported(backbone, "gradfam")
    images = inputs[batch]
    # references far from parallel to the embeddings: cos ~ 0.99 makes dS/dz' a difference of
    # nearly equal vectors (eq. 14's gradient), ill-conditioned in any float32 implementation
    generator = torch.Generator().manual_seed(2)
    references = torch.rand(3, model.embedding_dim, generator=generator)
    weights, raw, maps = autograd_gradfam(model, layer, images, references)
    actual = runner(images, references=references)
    # weights are tiny (1/hw of a cosine gradient): compare them relative to their scale
    scale = weights.abs().amax(dim=1, keepdim=True)
    close(actual.weights / scale, weights / scale, "weights (relative)")
    close(actual.raw / raw.amax(), raw / raw.amax(), "heatmap_lowres (relative)")
    close(actual.maps, maps, "heatmap")


@pytest.mark.parametrize("backbone", [b[0] for b in BACKBONES])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_cam_and_gradcam_parity_with_torchcam(method, backbone, batch, exported, inputs) -> None:
    from torchcam.methods import CAM, GradCAM

    model, runner, layer = exported(backbone, method)
    images = inputs[batch]
    actual = runner(images)
    logits, _ = hooked(model, layer, images)
    close(actual.extras["logits"], logits, "logits")
    classes = actual.extras["class_index"]
    assert_top_classes(classes, logits)
    close(actual.scores, logits.gather(1, classes[:, None]).squeeze(1), "explained logit")
    row = model.fc.weight.detach()[classes]
    if method == "cam":
        extractor = CAM(model, target_layer=layer, fc_layer="fc", input_shape=(3, SIZE, SIZE))
        expected_weights = row  # eq. 1
    else:
        extractor = GradCAM(model, target_layer=layer, input_shape=(3, SIZE, SIZE))
        # for GAP + linear head, d y_c / dA = W[c] / hw everywhere (eq. 2-3)
        expected_weights = row / (actual.raw.shape[1] * actual.raw.shape[2])
    try:
        with torch.set_grad_enabled(method == "gradcam"):
            scores = model(images)
            (torchcam_map,) = extractor(classes.tolist(), scores)
    finally:
        extractor.remove_hooks()
    close(actual.weights, expected_weights, "weights")
    close(min_max(actual.raw, dim=(1, 2)), torchcam_map, "heatmap_lowres (normalised)")
    close(actual.maps, upsample(torchcam_map, images.shape[-2:]), "heatmap")


def test_gradcam_through_two_linear_layers_equals_autograd(tmp_path, inputs) -> None:
    model = make_model("conv4", embedding_dim=10, num_classes=NUM_CLASSES)
    runner = OnnxExplainer(
        export_model(model, method="gradcam", path=tmp_path / "g.onnx", input_size=SIZE)
    )
    images = inputs["flowers5"]
    outputs, activations = hooked(model, "block4", images.clone().requires_grad_(True), True)
    classes = torch.tensor([0, 3, 6, 2, 1])
    (gradient,) = torch.autograd.grad(outputs.gather(1, classes[:, None]).sum(), activations)
    actual = OnnxExplainer(
        export_model(
            model, method="gradcam", path=tmp_path / "c.onnx", input_size=SIZE, class_input=True
        )
    )(images, class_index=classes)
    close(actual.weights, gradient.mean(dim=(2, 3)), "weights")
    expected_raw = torch.relu(torch.einsum("bn,bnhw->bhw", gradient.mean(dim=(2, 3)), activations))
    close(actual.raw, expected_raw.detach(), "heatmap_lowres")
    assert actual.scores.shape == (5,)
    assert_top_classes(runner(images).extras["class_index"], outputs)


@pytest.mark.parametrize("kind", ["cosine", "dot", "euclidean"])
def test_similarity_gradient_equals_autograd(kind) -> None:
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(4, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    references = torch.randn(4, 3, 6, generator=generator, dtype=torch.float64)
    (expected,) = torch.autograd.grad(similarity(z, references, kind).mean(dim=1).sum(), z)
    torch.testing.assert_close(
        similarity_gradient(z.detach(), references, kind), expected, atol=1e-12, rtol=0
    )


def test_gradfam_with_max_pooling_equals_autograd(tmp_path, inputs) -> None:
    torch.manual_seed(0)
    model = build_backbone("conv4", width=0.25, pooling="max", embedding_dim=6).eval()
    runner = OnnxExplainer(
        export_model(model, method="gradfam", path=tmp_path / "m.onnx", input_size=SIZE)
    )
    images, references = inputs["random5"], torch.randn(2, 6)
    weights, _, maps = autograd_gradfam(model, "block4", images, references)
    actual = runner(images, references=references)
    scale = weights.abs().amax(dim=1, keepdim=True)
    close(actual.weights / scale, weights / scale, "weights (relative)")
    close(actual.maps, maps, "heatmap")


def test_fam_best_reference_and_baked_references(tmp_path, inputs) -> None:
    model = make_model("conv4")
    images = inputs["flowers5"]
    with torch.no_grad():  # each of the first four images is closest to its own reference
        references = model(images[:4]) + 0.01 * torch.randn(4, 16)
    best = OnnxExplainer(
        export_model(model, method="fam", path=tmp_path / "b.onnx", input_size=SIZE, explain="best")
    )
    baked = OnnxExplainer(
        export_model(
            model, method="fam", path=tmp_path / "k.onnx", input_size=SIZE, references=references
        )
    )
    chosen = similarity(model(images).detach(), references.expand(5, -1, -1)).argmax(dim=1)
    assert chosen.unique().numel() > 1  # the images pick different references
    expected = FAM(model, "block4")(images, target=references[chosen].unsqueeze(1))
    actual = best(images, references=references)
    close(actual.maps, expected.maps, "best heatmap")
    close(actual.weights, expected.weights, "best weights")
    close(actual.scores, expected.scores, "best score")
    from_input = FAM(model, "block4")(images, target=references)
    from_constants = baked(images)
    close(from_constants.maps, from_input.maps, "baked heatmap")
    close(from_constants.extras["pair_scores"].mean(1), from_input.scores, "baked scores")
    assert baked.metadata[fmt.KEY_REFERENCES] == "baked"
    assert baked.metadata[fmt.KEY_NUM_REFERENCES] == "4"


def test_file_format_metadata_and_checker(tmp_path) -> None:
    model = make_model("conv4", num_classes=NUM_CLASSES)
    config = conv4_config(
        "toy",
        "classifier",
        weights="w.pt",
        input_size=64,
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.25, 0.3),
        class_names=tuple("abcdefg"),
    )
    path = export_model(model, config, method="cam", path=tmp_path / "m.onnx", class_input=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no external-data file
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in proto.graph.initializer)
    assert proto.opset_import[0].version == 17
    props = {p.key: p.value for p in proto.metadata_props}
    assert props[fmt.KEY_METHOD] == "cam" and props[fmt.KEY_TARGET_LAYER] == "block4"
    assert json.loads(props[fmt.KEY_PREPROCESSING]) == {
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.25, 0.3],
        "size": [64, 64],
        "range": [0, 1],
        "resize": "crop",  # the config's resize policy, read back by OnnxExplainer
    }
    assert props[fmt.KEY_VERSION] and props[fmt.KEY_CLASS_TARGET] == "input"
    assert json.loads(props[fmt.KEY_CLASS_NAMES]) == list("abcdefg")
    assert [i.name for i in proto.graph.input] == ["image", "class_index"]
    assert [o.name for o in proto.graph.output] == [
        "logits",
        "heatmap",
        "heatmap_lowres",
        "weights",
    ]
    heatmap = next(o for o in proto.graph.output if o.name == "heatmap")
    dims = heatmap.type.tensor_type.shape.dim
    assert [dims[0].dim_param, dims[1].dim_value, dims[2].dim_value] == ["batch", 64, 64]
    assert all(value.doc_string for value in (*proto.graph.input, *proto.graph.output))
    runner = OnnxExplainer(path)
    assert runner.input_size == (64, 64) and runner.class_names == list("abcdefg")
    images01 = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(runner.preprocess(images01), config.normalize(images01))


def test_runs_with_onnxruntime_alone(tmp_path, inputs) -> None:
    model = make_model("resnet18", embedding_dim=20)
    path = export_model(model, method="fam", path=tmp_path / "r.onnx", input_size=SIZE)
    images, references = inputs["flowers5"], torch.randn(3, 20)
    np.savez(tmp_path / "in.npz", image=images.numpy(), references=references.numpy())
    script = textwrap.dedent(
        f"""
        import sys, json
        import numpy as np, onnxruntime as ort
        session = ort.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
        feeds = dict(np.load({str(tmp_path / "in.npz")!r}))
        names = [o.name for o in session.get_outputs()]
        outputs = session.run(None, feeds)
        np.savez({str(tmp_path / "out.npz")!r}, **dict(zip(names, outputs)))
        meta = session.get_modelmeta().custom_metadata_map
        print(json.dumps({{"method": meta["method"], "leaked": [m for m in ("torch", "fam_core") if m in sys.modules]}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"method": "fam", "leaked": []}
    outputs = {k: torch.from_numpy(v) for k, v in np.load(tmp_path / "out.npz").items()}
    expected = FAM(model, "layer4")(images, target=references)
    close(outputs["heatmap"], expected.maps, "heatmap")
    close(outputs["weights"], expected.weights, "weights")
    close(outputs["scores"].mean(dim=1), expected.scores, "scores")


@pytest.fixture(scope="module")
def fam_runner(exported) -> OnnxExplainer:
    return exported("conv4", "fam")[1]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda r: r(torch.rand(2, 3, 64, 64), torch.rand(2, 16)), ValueError, "[B, 3, 84, 84]"),
        (lambda r: r(torch.rand(3, 84, 84), torch.rand(2, 16)), ValueError, "[B, 3, 84, 84]"),
        (lambda r: r(torch.rand(2, 1, 84, 84), torch.rand(2, 16)), ValueError, "[B, 3, 84, 84]"),
        (lambda r: r(torch.rand(0, 3, 84, 84), torch.rand(2, 16)), ValueError, "empty batch"),
        (
            lambda r: r(torch.rand(2, 3, 84, 84, dtype=torch.float64), torch.rand(2, 16)),
            TypeError,
            "images must be float32",
        ),
        (
            lambda r: r(np.zeros((2, 3, 84, 84), np.uint8), torch.rand(2, 16)),
            TypeError,
            "images must be float32",
        ),
        (lambda r: r([[0.0]], torch.rand(2, 16)), TypeError, "torch.Tensor or numpy array"),
        (lambda r: r(torch.rand(2, 3, 84, 84)), ValueError, "pass references [K, D]"),
        (lambda r: r(torch.rand(2, 3, 84, 84), torch.rand(2, 15)), ValueError, "[K, 16]"),
        (lambda r: r(torch.rand(2, 3, 84, 84), torch.rand(0, 16)), ValueError, "K >= 1"),
        (
            lambda r: r(torch.rand(2, 3, 84, 84), torch.rand(2, 16).double()),
            TypeError,
            "references must be float32",
        ),
        (
            lambda r: r(torch.rand(2, 3, 84, 84), torch.rand(2, 16), class_index=1),
            ValueError,
            "takes no class_index",
        ),
    ],
)
def test_runtime_rejects_bad_inputs(fam_runner, call, error, message) -> None:
    with pytest.raises(error) as caught:
        call(fam_runner)
    assert message in str(caught.value)


def test_runtime_rejects_bad_class_index(tmp_path) -> None:
    model = make_model("conv4", num_classes=NUM_CLASSES)
    path = export_model(model, method="cam", path=tmp_path / "c.onnx", input_size=SIZE)
    top1 = OnnxExplainer(path)
    with pytest.raises(ValueError, match="takes no references"):
        top1(torch.rand(1, 3, SIZE, SIZE), references=torch.rand(1, 16))
    runner = OnnxExplainer(
        export_model(
            model, method="cam", path=tmp_path / "i.onnx", input_size=SIZE, class_input=True
        )
    )
    images = torch.rand(2, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="pass class_index"):
        runner(images)
    with pytest.raises(ValueError, match=r"0 <= class_index < 7"):
        runner(images, class_index=[1, 7])
    with pytest.raises(ValueError, match="got 3 class indices for a batch of 2"):
        runner(images, class_index=[1, 2, 3])
    with pytest.raises(TypeError, match="integers"):
        runner(images, class_index=[1.0, 2.0])
    assert runner(images, class_index=4).extras["class_index"].tolist() == [4, 4]


def test_nonlinear_heads_are_exported_through_their_jacobian(tmp_path) -> None:
    """An MLP projector (ReLU) and GeM pooling have no constant-matrix graph: the export
    traces the explainer itself, and matches it; ``nonlinear_head='error'`` refuses them."""
    torch.manual_seed(0)
    mlp = nn.Sequential(
        OrderedDict(
            features=nn.Conv2d(3, 4, 3),
            pool=GlobalPool("avg"),
            proj=nn.Linear(4, 8),
            act=nn.ReLU(),
            out=nn.Linear(8, 5),
        )
    ).eval()
    with pytest.raises(ValueError, match="not linear \\(layer 'act'\\)"):
        export_model(
            mlp,
            method="fam",
            path=tmp_path / "x.onnx",
            target_layer="features",
            input_size=8,
            nonlinear_head="error",
        )
    runner = OnnxExplainer(
        export_model(
            mlp, method="fam", path=tmp_path / "m.onnx", target_layer="features", input_size=8
        )
    )
    images, references = torch.rand(3, 3, 8, 8), torch.randn(2, 5)
    expected = FAM(mlp, "features")(images, target=references)
    actual = runner(images, references=references)
    assert expected.extras["head"] == "jacobian" and runner.metadata["head"] == "jacobian"
    close(actual.weights, expected.weights, "weights")
    close(actual.maps, expected.maps, "heatmap")
    gem = build_backbone("conv4", width=0.25, pooling="gem").eval()
    runner = OnnxExplainer(
        export_model(gem, method="gradfam", path=tmp_path / "g.onnx", input_size=SIZE)
    )
    images, references = torch.rand(2, 3, SIZE, SIZE), torch.randn(3, 16)
    expected = GradFAM(gem, "block4")(images, target=references)
    actual = runner(images, references=references)
    scale = expected.weights.abs().amax(dim=1, keepdim=True)
    close(actual.weights / scale, expected.weights / scale, "weights (relative)")
    close(actual.maps, expected.maps, "heatmap")


def test_wrong_methods_and_modes_are_named(tmp_path) -> None:
    gem = build_backbone("conv4", width=0.25, pooling="gem").eval()
    classifier = make_model("conv4", num_classes=3)
    with pytest.raises(ValueError, match="use 'cam' or 'gradcam'"):
        export_model(classifier, method="fam", path=tmp_path / "x.onnx", input_size=SIZE)
    with pytest.raises(ValueError, match="use 'fam' or 'gradfam'"):
        export_model(gem, method="cam", path=tmp_path / "x.onnx", input_size=SIZE)
    with pytest.raises(ValueError, match="unknown method 'lime'"):
        export_model(gem, method="lime", path=tmp_path / "x.onnx", input_size=SIZE)
    for method in ("relevancecam", "liftcam"):  # registered, refused by name
        with pytest.raises(ValueError, match=f"cannot export method '{method}' to ONNX"):
            export_model(classifier, method=method, path=tmp_path / "x.onnx", input_size=SIZE)
    with pytest.raises(ValueError, match="eval mode"):
        export_model(gem.train(), method="fam", path=tmp_path / "x.onnx", input_size=SIZE)


def write_model_folder(folder: Path) -> Path:
    model = make_model("conv4")
    folder.mkdir()
    torch.save(model.state_dict(), folder / "weights.pt")
    torch.save(torch.randn(5, 16), folder / "prototypes.pt")
    config = conv4_config(
        "tiny",
        "embedding",
        backbone_kwargs={"width": 0.25},
        prototypes="prototypes.pt",
        class_names=tuple("vwxyz"),
    )
    config.to_file(folder / "config.yaml")
    return folder / "config.yaml"


def test_cli_export(tmp_path, monkeypatch, capsys) -> None:
    import fam_core.cli

    monkeypatch.setattr(fam_core.cli, "COMMAND_MODULES", ("fam_core.commands.export",))
    config = write_model_folder(tmp_path / "tiny")
    out = tmp_path / "tiny.onnx"
    code = main(["export", str(config), "--method", "fam", "--out", str(out), "--bake-prototypes"])
    assert code == 0, capsys.readouterr().err
    runner = OnnxExplainer(out)
    assert runner.metadata[fmt.KEY_REFERENCES] == "baked" and runner.class_names == list("vwxyz")
    assert runner(torch.rand(1, 3, SIZE, SIZE)).extras["pair_scores"].shape == (1, 5)
    capsys.readouterr()
    code = main(["export", str(config), "--method", "gradcam", "--out", str(tmp_path / "g.onnx")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "use 'fam' or 'gradfam'" in error
