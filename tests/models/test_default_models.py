"""The committed default models reach their stated accuracy on fixed, small evaluation sets."""

from __future__ import annotations

import pytest
import torch

import fam_core
from fam_core.commands.demo import run_demo
from fam_core.data.flowers import NUM_CLASSES, SPLITS
from fam_core.models.training import evaluate_classifier, evaluate_embedding


def test_embedding_model_on_novel_classes_5way_1shot() -> None:
    model, config = fam_core.load_model("default-embedding")
    result = evaluate_embedding(model, per_class=20, episodes=200, seed=123)
    assert result.accuracy >= 0.80, str(result)
    assert config.metrics["novel_5way_1shot_accuracy"] >= 0.80
    assert config.metrics["episodes"] == 600


def test_classifier_test_accuracy() -> None:
    model, config = fam_core.load_model("default-classifier")
    assert evaluate_classifier(model, per_class=6, seed=321) >= 0.95
    assert config.metrics["test_accuracy"] >= 0.95
    assert model.output_dim == NUM_CLASSES


def test_embedding_model_was_trained_without_novel_classes() -> None:
    recipe = fam_core.load_model("default-embedding").config.metrics["recipe"]
    assert recipe["n_way"] <= len(SPLITS["base"])


@pytest.mark.parametrize("count", [3])
def test_demo_writes_overlays_and_a_summary(tmp_path, count, capsys) -> None:
    result = run_demo(tmp_path, count=count)
    assert len(result.overlays) == 2 * count and all(p.stat().st_size > 0 for p in result.overlays)
    assert result.summary.exists()
    assert str(tmp_path) in capsys.readouterr().out


def test_fam_on_the_default_models_points_at_the_discriminative_part() -> None:
    """Most FAM energy lies on the part that decides the class, far above its area share."""
    from fam_core.data.flowers import make_flowers

    model, config = fam_core.load_model("default-classifier")
    batch = make_flowers(list(range(0, NUM_CLASSES, 3)), 2, seed=77)
    explanation = fam_core.FAM(model, config.target_layer)(config.normalize(batch.images))
    energy = (explanation.maps * batch.masks).flatten(1).sum(1) / explanation.maps.flatten(1).sum(1)
    area = batch.masks.flatten(1).float().mean(1)
    assert (energy / area).median() > 2.0, energy / area
    assert torch.isfinite(energy).all()
