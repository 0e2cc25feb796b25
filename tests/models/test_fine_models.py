"""The fine default models (Conv4-s8, 10x10 target layer) and the recipes that train them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fam_core
import fam_core.cli
from fam_core.anatomy.discovery import find_layers
from fam_core.data.flowers import NUM_CLASSES, SPLITS, make_flowers
from fam_core.models import training
from fam_core.models.store import ModelConfig, available_models, find_config
from fam_core.package_data import DEFAULT_MODEL_NAMES

FINE = ("default-embedding-fine", "default-classifier-fine")
MAX_WEIGHTS_BYTES = 5 * 1024 * 1024


def target_grid(model: torch.nn.Module, config: ModelConfig) -> tuple[int, int]:
    size = config.input_size
    search = find_layers(model, (size, size))
    return next(c.layout.grid for c in search.candidates if c.name == config.target_layer)


def test_every_default_model_has_a_recipe_and_is_in_the_store() -> None:
    assert list(training.DEFAULT_MODELS) == list(DEFAULT_MODEL_NAMES)
    assert set(DEFAULT_MODEL_NAMES) <= set(available_models())
    for name in FINE:
        _, recipe = training.DEFAULT_MODELS[name]
        assert recipe.backbone == "conv4s8"
    assert training.DEFAULT_MODELS["default-classifier-fine"][1].init_from == FINE[0]


@pytest.mark.parametrize("name", FINE)
def test_fine_models_load_with_a_10x10_target_layer_and_small_weights(name: str) -> None:
    model, config = fam_core.load_model(name)
    assert not model.training and config.backbone == "conv4s8"
    assert config.input_size == 84 and config.target_layer == model.default_target_layer
    assert target_grid(model, config) == (10, 10)
    weights = config.directory / config.weights
    assert weights.stat().st_size <= MAX_WEIGHTS_BYTES
    state = torch.load(weights, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert config.metrics["recipe"]["backbone"] == "conv4s8"
    assert config.metrics["train_seconds"] > 0


def test_coarse_default_models_stay_5x5() -> None:
    for name in ("default-embedding", "default-classifier"):
        model, config = fam_core.load_model(name)
        assert target_grid(model, config) == (5, 5)


def test_fine_embedding_reaches_its_recorded_novel_class_accuracy() -> None:
    model, config = fam_core.load_model("default-embedding-fine")
    recorded = config.metrics["novel_5way_1shot_accuracy"]
    assert recorded >= 0.90 and config.metrics["episodes"] == 600
    result = training.evaluate_embedding(model, per_class=20, episodes=200, seed=123)
    assert result.accuracy >= 0.85, str(result)  # another draw of novel-class episodes
    assert config.metrics["recipe"]["n_way"] <= len(SPLITS["base"])
    prototypes = config.load_prototypes()
    assert prototypes.shape == (len(SPLITS["novel"]), model.output_dim)


def test_fine_classifier_reaches_its_recorded_test_accuracy() -> None:
    model, config = fam_core.load_model("default-classifier-fine")
    assert config.metrics["test_accuracy"] >= 0.95
    assert training.evaluate_classifier(model, per_class=6, seed=321) >= 0.93
    assert model.output_dim == NUM_CLASSES == len(config.class_names)


def test_fine_classifier_fam_points_at_the_discriminative_part() -> None:
    """As for the coarse classifier: FAM energy on the deciding part, far above its area."""
    model, config = fam_core.load_model("default-classifier-fine")
    batch = make_flowers(list(range(0, NUM_CLASSES, 3)), 2, seed=77)
    explanation = fam_core.FAM(model, config.target_layer)(config.normalize(batch.images))
    assert explanation.raw.shape[-2:] == (10, 10)
    energy = (explanation.maps * batch.masks).flatten(1).sum(1) / explanation.maps.flatten(1).sum(1)
    area = batch.masks.flatten(1).float().mean(1)
    assert (energy / area).median() > 2.0, energy / area


@pytest.fixture
def small_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training's own evaluation and linear probe on few images: the two-step test checks the
    files, the recipe and determinism; the store's accuracies are checked above."""
    evaluate_embedding, evaluate_classifier = (
        training.evaluate_embedding,
        training.evaluate_classifier,
    )
    monkeypatch.setattr(
        training,
        "evaluate_embedding",
        lambda model, **options: evaluate_embedding(model, **options, per_class=16, episodes=20),
    )
    monkeypatch.setattr(
        training,
        "evaluate_classifier",
        lambda model, **options: evaluate_classifier(model, **options, per_class=2),
    )
    builder, recipe = training.DEFAULT_MODELS["default-classifier-fine"]
    small = dataclasses.replace(recipe, probe_images_per_class=4)
    monkeypatch.setitem(training.DEFAULT_MODELS, "default-classifier-fine", (builder, small))


@pytest.mark.parametrize("name", FINE)
def test_two_step_training_writes_a_loadable_deterministic_model(
    name, tmp_path, capsys, small_evaluation
) -> None:
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        argv = ["train", name, "--steps", "2", "--out", str(out)]
        assert fam_core.cli.main(argv) == 0
    assert f"wrote {outs[1]}" in capsys.readouterr().out
    (model, config), (again, _) = (fam_core.load_model(out) for out in outs)
    assert config.name == name and config.metrics["recipe"]["steps"] == 2
    assert config.metrics["recipe"]["backbone"] == "conv4s8"
    assert target_grid(model, config) == (10, 10)
    assert (outs[0] / config.weights).stat().st_size <= MAX_WEIGHTS_BYTES
    accuracy = "novel_5way_1shot_accuracy" if config.task == "embedding" else "test_accuracy"
    assert 0.0 <= config.metrics[accuracy] <= 1.0
    for key, value in model.state_dict().items():  # the same seed gives the same weights
        torch.testing.assert_close(value, again.state_dict()[key], rtol=1e-5, atol=1e-6)


def test_train_rejects_an_unknown_model(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fam_core.cli.main(["train", "default-embedding-huge"])
    assert exit_info.value.code == 2
    assert "default-classifier-fine" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown default model 'vgg'"):
        training.build_default_model("vgg", "out")


def test_configs_name_their_folders() -> None:
    for name in FINE:
        assert ModelConfig.from_file(find_config(name)).name == name


@pytest.mark.parametrize("name", FINE)
def test_fine_models_are_served_and_inspected_like_the_defaults(name, capsys) -> None:
    from fam_core.pipeline import DEFAULT_MODELS, ServedModel

    assert name in DEFAULT_MODELS  # `fam serve` with no model, `fam archive` with no name
    assert ServedModel.load(name).feature_shape == (10, 10)
    assert fam_core.cli.main(["inspect", name]) == 0
    out = capsys.readouterr().out
    assert " * block4 " in out and "[1, 64, 10, 10]" in out and "target layer: block4" in out


def test_explain_with_the_fine_classifier_names_the_flowers_class(tmp_path, capsys) -> None:
    from fam_core.data.flowers import CLASS_NAMES
    from fam_core.render import save_png

    batch = make_flowers([5, 30], 1, seed=11)
    pixels = (batch.images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)  # [B, H, W, 3]
    paths = [save_png(pixels[i], tmp_path / f"flower{i}.png") for i in range(2)]
    argv = ["explain", *map(str, paths), "--model", "default-classifier-fine"]
    assert fam_core.cli.main([*argv, "--out", str(tmp_path / "out")]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[1] for row in rows] == [CLASS_NAMES[5], CLASS_NAMES[30]]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "flower0_cam.png",
        "flower1_cam.png",
    ]
