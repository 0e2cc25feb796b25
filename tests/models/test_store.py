"""Model configs, the model store and image reading."""

from __future__ import annotations

import pytest
import torch

import fam_core
from fam_core.images.read import decode_image, resize
from fam_core.models.store import ModelConfig, find_config
from fam_core.render import to_png_bytes


def test_default_models_load_in_eval_mode_with_their_config() -> None:
    model, config = fam_core.load_model("default-embedding")
    assert not model.training and config.task == "embedding"
    assert config.target_layer == model.default_target_layer
    prototypes = config.load_prototypes()
    assert prototypes.shape == (len(config.class_names), model.output_dim)
    classifier, classifier_config = fam_core.load_model("default-classifier")
    assert classifier.is_classifier and classifier.output_dim == len(classifier_config.class_names)


def test_weights_are_small_and_load_with_weights_only() -> None:
    for name in ("default-embedding", "default-classifier"):
        config = ModelConfig.from_file(find_config(name))
        weights = config.directory / config.weights
        assert weights.stat().st_size <= 5 * 1024 * 1024
        state = torch.load(weights, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_config_round_trip_and_load_by_path(tmp_path) -> None:
    _, config = fam_core.load_model("default-embedding")
    config.to_file(tmp_path / "config.yaml")
    (tmp_path / config.weights).write_bytes((config.directory / config.weights).read_bytes())
    (tmp_path / config.prototypes).write_bytes((config.directory / config.prototypes).read_bytes())
    again = ModelConfig.from_file(tmp_path / "config.yaml")
    assert again == ModelConfig(**{**config.__dict__, "directory": tmp_path})
    model, _ = fam_core.load_model(tmp_path)
    assert model.default_target_layer == config.target_layer


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\n", "lacks the key 'task'"),
        ("[1, 2]\n", "must be a mapping"),
        (
            "name: x\ntask: embedding\nbackbone: conv4\nweights: w.pt\ntarget_layer: b\ncolour: 1\n",
            "unknown keys",
        ),
        (
            "name: x\ntask: detector\nbackbone: conv4\nweights: w.pt\ntarget_layer: b\n",
            "task must be",
        ),
    ],
)
def test_bad_configs(tmp_path, text, message) -> None:
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_file(tmp_path / "config.yaml")


def test_missing_weights_and_unknown_model(tmp_path) -> None:
    _, config = fam_core.load_model("default-classifier")
    config.to_file(tmp_path / "config.yaml")
    with pytest.raises(ValueError, match="weights: file .* is missing"):
        fam_core.load_model(tmp_path / "config.yaml")
    with pytest.raises(ValueError, match="unknown model 'nope'.*default-embedding"):
        fam_core.load_model("nope")


def test_decode_and_resize() -> None:
    pixels = torch.arange(2 * 4 * 3, dtype=torch.uint8).view(2, 4, 3)
    decoded = decode_image(to_png_bytes(pixels))
    torch.testing.assert_close(decoded, pixels.permute(2, 0, 1).float() / 255)
    assert resize(torch.rand(3, 60, 90), 30).shape == (3, 30, 30)
    with pytest.raises(ValueError, match="cannot identify image file"):
        decode_image(b"\x89PNG broken")
    with pytest.raises(ValueError, match="more than the limit"):
        decode_image(to_png_bytes(torch.zeros(20, 20, 3, dtype=torch.uint8)), max_pixels=100)
