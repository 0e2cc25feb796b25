"""The scene settings of ``fam eval`` (fam_core.evaluation.scenes) on a tiny random model."""

from __future__ import annotations

import pytest
import torch
from model_helpers import conv4_config

from fam_core.data.flowers import SPLITS, make_flowers
from fam_core.evaluation import settings
from fam_core.evaluation.runner import build_explainer, explain
from fam_core.evaluation.scenes import _matching_task, scene_metrics, scene_settings
from fam_core.models.backbones import build_backbone
from fam_core.models.store import LoadedModel

SEED = 2


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    torch.manual_seed(0)
    model = build_backbone("conv4", width=0.25).eval()
    config = conv4_config(
        "emb", "embedding", backbone_kwargs={"width": 0.25}, weights="w.pt", input_size=48
    )
    return LoadedModel(model, config)


@pytest.fixture(scope="module")
def scene_pair(loaded: LoadedModel) -> list[settings.Setting]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(settings, "NOVEL_PER_CLASS", 4)
        patch.setattr(settings, "BANK_PER_CLASS", 3)
        return scene_settings(loaded, images=3, seed=SEED, model_name="emb")


def _pool(loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    pool = make_flowers(
        list(SPLITS["novel"]), 4, image_size=48, seed=SEED + settings.DATA_SEED_OFFSET
    )
    return pool.labels, settings._embed(loaded.model, loaded, pool.images)


def test_one_pair_per_flower_with_its_own_part(scene_pair) -> None:
    for setting in scene_pair:
        groups = setting.scene
        assert groups is not None
        assert len(setting.labels) == int(groups.scenes.counts.sum())
        assert torch.equal(
            setting.labels, groups.scenes.labels[groups.pair_scene, groups.pair_flower]
        )
        assert torch.equal(
            setting.masks, groups.scenes.masks[groups.pair_scene, groups.pair_flower]
        )
        assert torch.equal(setting.images, groups.scenes.images[groups.pair_scene])
        assert setting.images.shape[-1] == 96  # a 2x2 grid of 48-pixel cells
        assert setting.target.shape == (len(setting.labels), 1, 16)


def test_each_reference_is_an_image_of_the_matched_flower_class(loaded, scene_pair) -> None:
    labels, embeddings = _pool(loaded)
    for setting in scene_pair:
        distance = torch.cdist(setting.target[:, 0], embeddings)
        nearest = distance.argmin(dim=1)
        assert torch.allclose(distance.min(dim=1).values, torch.zeros(len(nearest)), atol=1e-2)
        assert torch.equal(labels[nearest], setting.labels)
    retrieval = scene_pair[1]
    distance = torch.cdist(retrieval.target[:, 0], embeddings)
    assert (distance.argmin(dim=1) % 4 < 3).all()  # retrieval references come from the gallery


def test_task_numbers_are_rates(scene_pair) -> None:
    scene, retrieval = scene_pair
    assert scene.task["scenes"] == 3 and scene.task["pairs"] == len(scene.labels)
    for task in (scene.task, retrieval.task):
        for key in ("cell_match", "recall@1", "top1_present", "present_above_absent"):
            if key in task:
                assert 0.0 <= task[key] <= 1.0


def test_perfect_maps_score_one_and_a_target_blind_method_zero(scene_pair) -> None:
    setting = scene_pair[0]
    perfect = setting.masks.float()  # all the energy on the matched flower's part
    means, per_image = scene_metrics(setting, perfect)
    assert means["proportion_matched"] == pytest.approx(1.0)
    assert means["proportion_others"] == pytest.approx(0.0)
    assert means["pointing_matched"] == pytest.approx(1.0)
    assert means["sensitivity_gap"] == pytest.approx(1.0)
    assert len(per_image["proportion_matched"]) == len(setting.labels)
    assert len(per_image["sensitivity_gap"]) == 3  # one value per scene
    # the upsampled activation map ignores the target: the same map for every reference
    activation = build_explainer("activation", setting)
    maps = explain(activation, setting, setting.target, setting.images).maps
    means, _ = scene_metrics(setting, maps)
    assert means["sensitivity_gap"] == pytest.approx(0.0, abs=1e-5)
    assert means["sensitivity_rank"] == pytest.approx(1.0, abs=1e-5)
    assert means["proportion_matched"] != pytest.approx(1.0)


def test_scene_metrics_need_a_scene_setting(scene_pair) -> None:
    from dataclasses import replace

    with pytest.raises(ValueError, match="holds no scenes"):
        scene_metrics(replace(scene_pair[0], scene=None), scene_pair[0].masks.float())


def test_matching_task_by_hand() -> None:
    # two scenes over 3 candidate classes; both hold classes 0 and 2 (slots), class 1 absent
    sims = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.9, 0.5]])
    slot = torch.tensor([[0, 2], [2, 0]])
    present = torch.ones(2, 2, dtype=torch.bool)
    task = _matching_task(sims, slot, present)
    assert task["top1_present"] == pytest.approx(0.5)  # scene 2's best class (1) is absent
    assert task["present_above_absent"] == pytest.approx(0.5)  # scene 1: 2/2, scene 2: 0/2
    assert task["top_n_exact"] == pytest.approx(0.5)
    assert task["scenes"] == 2 and task["pairs"] == 4
