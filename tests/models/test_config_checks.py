"""Config values checked against the model at load, the same at every front door.

Small ``transformers`` models with random weights (``hf_factories.py`` next to each config):
a config value the model contradicts (class names, an output name, the input size or
channels, prototypes) fails ``fam explain`` and ``fam inspect`` with exit code 2 and one line
naming the config key, leaves the model not ready in the servers' registry with that reason
(requests answer UNAVAILABLE), and makes the TorchServe handler answer 503 with it. The
messages use the config's key names (``input_size:``), never the Python API's
(``input_size=``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from serving_helpers import HandlerContext, load_handler, png_bytes

from fam_core.cli import main
from fam_core.pipeline import EncodedImage, ExplainRequest, ModelRegistry, Pipeline
from fam_core.pipeline.errors import Unavailable

transformers = pytest.importorskip("transformers")

TESTS = Path(__file__).resolve().parents[1]
SIZE = 64  # hf_factories' models are built for 64x64 inputs
GREYSCALE = """
import transformers as t


def build():
    config = t.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16],
                            depths=[1, 1], num_labels=4)
    return t.ResNetForImageClassification(config).eval()
"""

CASES = {
    "class names of another count": (
        {"task": "classifier", "factory": "hf_factories:resnet_classifier",
         "class_names": ["a", "b", "c"]},
        "class_names: 3 names for a classifier with 5 outputs: expected 5 names (or none)",
    ),
    "an output name with a typo": (
        {"task": "embedding", "factory": "hf_factories:resnet", "output": "pooler_outptu"},
        "output: the model has no output 'pooler_outptu'; its outputs are "
        "['last_hidden_state', 'pooler_output']",
    ),
    "an output index out of range": (
        {"task": "embedding", "factory": "hf_factories:resnet", "output": 2},
        "output: index 2 is out of range for the model's 2 outputs "
        "['last_hidden_state', 'pooler_output']",
    ),
    "an output that is not [B, D]": (
        {"task": "embedding", "factory": "hf_factories:vit", "output": "last_hidden_state"},
        "output: expected [B, D] embeddings or logits (or [B, C, h, w] maps, pooled), got "
        "shape [1, 17, 32]",
    ),
    "no input_size for a ViT built for 64": (
        {"task": "embedding", "factory": "hf_factories:vit", "input_size": None},
        "input_size: a [1, 3, 84, 84] input failed: ValueError: Input image size (84*84) "
        "doesn't match model (64*64); input_size is 84x84 (the default when the config sets "
        "none): its config.image_size is 64: set input_size: 64",
    ),
    "an RGB config for a greyscale model": (
        {"task": "classifier", "factory": "greyscale:build"},
        "channels: a [1, 3, 64, 64] input failed",
    ),
    "two mean values for an RGB model": (
        {"task": "embedding", "factory": "hf_factories:resnet", "mean": [0.5, 0.5]},
        "mean: got 2 values for a 3-channel model: expected 1 or 3",
    ),
    "labels of another count than the prototypes": (
        {"task": "embedding", "factory": "hf_factories:resnet", "prototypes": "gallery.pt",
         "class_names": ["a", "b", "c"]},
        "class_names: 3 labels for 4 prototypes: expected 4 (one per prototype, or none)",
    ),
    "prototypes of another width": (
        {"task": "embedding", "factory": "hf_factories:resnet", "prototypes": "narrow.pt"},
        "prototypes: have shape (4, 10), expected [K, 64]",
    ),
}  # fmt: skip


def write_model(root: Path, name: str, keys: dict) -> Path:
    folder = root / name
    folder.mkdir()
    shutil.copy(TESTS / "helpers" / "hf_factories.py", folder)
    (folder / "greyscale.py").write_text(GREYSCALE)
    torch.save(torch.randn(4, 64), folder / "gallery.pt")  # the ResNet's embedding is 64 wide
    torch.save(torch.randn(4, 10), folder / "narrow.pt")
    config = {"name": name, "input_size": SIZE, **keys}
    config = {key: value for key, value in config.items() if value is not None}
    (folder / "config.yaml").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("config-checks")
    return {
        case: write_model(root, f"model-{index}", keys)
        for index, (case, (keys, _)) in enumerate(sorted(CASES.items()))
    }


def assert_one_line_naming_the_key(text: str, message: str) -> None:
    assert message in text
    assert "\n" not in text.strip()
    assert "input_size=" not in text and "target_layer=" not in text  # the Python spelling


@pytest.mark.parametrize("case", sorted(CASES))
def test_fam_explain_and_inspect_exit_2_with_one_line(folders, case, tmp_path, capsys) -> None:
    image = tmp_path / "image.png"
    image.write_bytes(png_bytes(0))
    _, message = CASES[case]
    for argv in (
        ["explain", "--model", str(folders[case]), str(image), "--out", str(tmp_path / "out")],
        ["inspect", str(folders[case])],
    ):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith("fam: error: ")
        assert_one_line_naming_the_key(captured.err, message)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_servers_registry_keeps_the_model_not_ready_with_the_reason(folders, case) -> None:
    _, message = CASES[case]
    registry = ModelRegistry.load([folders[case]], keep_going=True)
    assert registry.names() == []
    (failed,) = registry.failed()
    assert_one_line_naming_the_key(failed.reason, message)
    pipeline = Pipeline(registry, batching=None)
    try:
        request = ExplainRequest(failed.name, (EncodedImage(png_bytes(0)),))
        with pytest.raises(Unavailable, match="failed to load") as error:
            pipeline.explain(request)
        assert message in str(error.value)
    finally:
        pipeline.close()


@pytest.mark.parametrize("case", ["class names of another count", "an output name with a typo"])
def test_the_torchserve_handler_answers_503_with_the_reason(folders, case) -> None:
    pytest.importorskip("ts", reason="TorchServe is not installed")
    handler = load_handler("fam_handler_config_checks").FamHandler()
    context = HandlerContext(folders[case])
    handler.initialize(context)
    (row,) = handler.handle([{"body": png_bytes(0)}], context)
    assert context.statuses[0][0] == 503
    assert CASES[case][1] in json.loads(row)["message"]


def test_the_values_the_model_agrees_with_load(tmp_path) -> None:
    """The same models load when the config fits them: the checks refuse nothing else."""
    from hf_factories import resnet

    torch.manual_seed(0)
    cases = {
        "classifier": {"task": "classifier", "factory": "hf_factories:resnet_classifier",
                       "class_names": list("abcde")},
        "embedding": {"task": "embedding", "factory": "hf_factories:resnet",
                      "output": "pooler_output", "prototypes": "gallery.pt",
                      "class_names": list("wxyz")},
        "vit": {"task": "embedding", "factory": "hf_factories:vit", "output": 1},
        "greyscale": {"task": "classifier", "factory": "greyscale:build", "channels": 1,
                      "mean": [0.5], "std": [0.25]},
    }  # fmt: skip
    sources = [write_model(tmp_path, name, keys) for name, keys in cases.items()]
    registry = ModelRegistry.load(sources, keep_going=True)
    assert registry.failed() == [] and registry.names() == sorted(cases)
    embedding = registry.get("embedding")
    assert (
        embedding.output_dim == 64 == resnet()(torch.zeros(1, 3, SIZE, SIZE)).pooler_output.shape[1]
    )
    assert embedding.labels == tuple("wxyz") and registry.get("classifier").output_dim == 5
