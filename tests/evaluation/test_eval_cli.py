"""``fam eval`` end to end on tiny random-init models: the report's files and their content."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fam_core.cli
from fam_core.data.flowers import CLASS_NAMES, NUM_CLASSES, make_flowers
from fam_core.evaluation import settings
from fam_core.models.backbones import build_backbone
from fam_core.models.store import ModelConfig
from fam_core.models.training import normalize, save_model


@pytest.fixture
def small_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "NOVEL_PER_CLASS", 4)  # 1-shot, 3 queries
    monkeypatch.setattr(settings, "BANK_PER_CLASS", 3)
    monkeypatch.setattr(settings, "CLASSIFIER_PER_CLASS", 1)
    monkeypatch.setattr(fam_core.cli, "COMMAND_MODULES", ("fam_core.commands.eval",))


def write_models(tmp_path, seed: int, backbone: str = "conv4") -> tuple[str, str]:
    torch.manual_seed(0)
    embedding = build_backbone(backbone, width=0.25).eval()
    config = ModelConfig(
        name="emb",
        task="embedding",
        backbone=backbone,
        backbone_kwargs={"width": 0.25},
        weights="w.pt",
        target_layer="block4",
    )
    save_model(embedding, config, tmp_path / f"emb-{backbone}")
    classifier = build_backbone(backbone, width=0.25, num_classes=NUM_CLASSES).eval()
    # fit the last layer so that the classifier gets the evaluation images right
    test = make_flowers(list(range(NUM_CLASSES)), 1, seed=seed + settings.DATA_SEED_OFFSET + 1)
    with torch.no_grad():
        features = classifier.embedding(normalize(test.images))
        design = torch.cat([features, torch.ones(len(features), 1)], dim=1)
        solution = torch.linalg.lstsq(design, torch.eye(NUM_CLASSES)[test.labels]).solution
        classifier.fc.weight.copy_(solution[:-1].T)
        classifier.fc.bias.copy_(solution[-1])
    config = ModelConfig(
        name="cls",
        task="classifier",
        backbone=backbone,
        backbone_kwargs={"width": 0.25, "num_classes": NUM_CLASSES},
        weights="w.pt",
        target_layer="block4",
        class_names=tuple(CLASS_NAMES),
    )
    save_model(classifier, config, tmp_path / f"cls-{backbone}")
    return str(tmp_path / f"emb-{backbone}"), str(tmp_path / f"cls-{backbone}")


def test_eval_writes_the_report(tmp_path, capsys, small_benchmark) -> None:
    embedding, classifier = write_models(tmp_path, seed=3)
    out = tmp_path / "report"
    argv = [
        "eval",
        "--images",
        "3",
        "--scenes",
        "3",
        "--episodes",
        "20",
        "--steps",
        "4",
        "--sanity-images",
        "2",
        "--seed",
        "3",
        "--methods",
        "fam",
        "--resolutions",
        "coarse",
        "--embedding-model",
        embedding,
        "--classifier-model",
        classifier,
        "--out",
        str(out),
    ]
    assert fam_core.cli.main(argv) == 0
    stdout = capsys.readouterr().out
    assert "runtime" in stdout and "| fam |" in stdout
    data = json.loads((out / "results.json").read_text())
    assert data["methods"] == ["fam"]
    # written out, not fam_core.evaluation.SETTING_NAMES: a setting dropped there fails here
    assert set(data["tasks"]) == {
        "few-shot",
        "kNN",
        "retrieval",
        "scene",
        "scene-retrieval",
        "classifier",
    }
    per_image = torch.load(out / "per_image.pt", weights_only=True)
    for name in ("scene", "scene-retrieval"):  # every method's per-pair and per-scene values
        values = per_image[name]["fam"]
        assert len(values["proportion_matched"]) == data["settings"][name]["images"]
        assert len(values["sensitivity_gap"]) == data["tasks"]["scene"]["scenes"] == 3
        assert data["metrics"][name]["fam"]["sensitivity_rank"] <= 1.0 + 1e-6
    assert data["tasks"]["classifier"]["accuracy"] == 1.0  # the fitted last layer
    for name in ("few-shot", "classifier"):
        values = data["metrics"][name]["fam"]
        assert 0.0 <= values["proportion"] <= 1.0 and 0.0 <= values["iou_auc"] <= 1.0
        assert len(data["curves"][name]["fam"]["deletion"]) == 5
        assert data["sanity"]["fam"][name]["layers"][-1] == "block1"
    assert data["sanity"]["fam"]["classifier"]["layers"][0] == "fc"
    if "retrieval" in data["metrics"]:
        assert "explanation_map_ap" in data["metrics"]["retrieval"]["fam"]
    # every metric keeps its interval around the mean, and the per-image values behind it
    for name, per_method in data["metrics"].items():
        assert data["settings"][name]["asked"] == 3
        for metric, mean in per_method["fam"].items():
            interval = data["intervals"][name]["fam"][metric]
            assert interval["mean"] == mean
            if not math.isnan(mean):
                assert interval["low"] <= mean + 1e-9 and mean - 1e-9 <= interval["high"]
                assert per_image[name]["fam"][metric].nanmean().item() == pytest.approx(
                    mean, abs=1e-6
                )
        count = data["settings"][name]["images"]
        explained = (
            f"{count} (scene, reference) pairs from 3 scenes"
            if name.startswith("scene")
            else f"{count} correctly handled images explained of 3"
        )
        assert f"**{name}** (" in stdout and explained in stdout
    for name in (
        "results.md",
        "deletion_insertion.png",
        "metric_box_iou.png",
        "overlays_classifier.png",
    ):
        assert (out / name).stat().st_size > 0
    # the headline table: one column per setting's headline metric, FAM's cells its intervals;
    # printed again from results.json alone (how the README's table is regenerated)
    from fam_core.evaluation import report

    headline = (out / "results.md").read_text().split("**Headline**")[1].split("\n\n")[1]
    header, _, fam_row = headline.splitlines()[:3]
    assert header.count("|") - 2 == len(report.HEADLINE) == len(fam_row.split("|")) - 3
    interval = data["intervals"]["scene"]["fam"]["sensitivity_gap"]
    assert f"{interval['mean']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]" in fam_row
    assert report.main([str(out / "results.json")]) == 0
    assert headline in capsys.readouterr().out
    # deterministic for a seed: a second run gives the same numbers
    second = tmp_path / "again"
    assert fam_core.cli.main([*argv[:-1], str(second)]) == 0
    again = json.loads((second / "results.json").read_text())
    assert again["metrics"] == data["metrics"] and again["tasks"] == data["tasks"]


def test_eval_rejects_bad_options(tmp_path, capsys, small_benchmark) -> None:
    assert fam_core.cli.main(["eval", "--images", "0", "--out", str(tmp_path)]) == 2
    assert "--images must be >= 1" in capsys.readouterr().err
    assert fam_core.cli.main(["eval", "--scenes", "0", "--out", str(tmp_path)]) == 2
    assert "--scenes must be >= 1" in capsys.readouterr().err
    code = fam_core.cli.main(
        ["eval", "--methods", "nope", "--embedding-model", str(tmp_path), "--out", str(tmp_path)]
    )
    assert code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_spread_over_classes_by_hand() -> None:
    picked = settings.spread_over_classes(torch.tensor([3, 3, 3, 5, 5, 7]), 4)
    assert picked.tolist() == [0, 3, 5, 1]  # first of each class, then the second of class 3
    assert settings.spread_over_classes(torch.tensor([2, 2]), 5).tolist() == [0, 1]


def test_runner_masks_the_normalised_input_for_eq_21() -> None:
    from types import SimpleNamespace

    from fam_core.evaluation.runner import eq21_masked_images

    config = SimpleNamespace(mean=(0.5, 0.5, 0.5))
    setting = SimpleNamespace(
        images=torch.full((1, 3, 2, 2), 0.8), loaded=SimpleNamespace(config=config)
    )
    masked = eq21_masked_images(setting, torch.full((1, 2, 2), 0.25))
    # model input (x - 0.5) / std scales by L: 0.5 + 0.25 * 0.3 = 0.575 in pixel space
    assert torch.allclose(masked, torch.full((1, 3, 2, 2), 0.575))


def test_eval_fits_relevant_features_on_the_classifier_only(
    tmp_path, small_benchmark, monkeypatch
) -> None:
    from fam_core.evaluation import runner

    monkeypatch.setattr(settings, "FIT_PER_CLASS", 2)
    monkeypatch.setattr(runner, "RELEVANCE_ITERATIONS", 100)  # keeps the test fast
    embedding, classifier = write_models(tmp_path, seed=3)
    out = tmp_path / "report"
    argv = ["eval", "--images", "3", "--episodes", "10", "--steps", "2", "--sanity-images", "0"]
    argv += ["--seed", "3", "--methods", "relevant-features", "--embedding-model", embedding]
    argv += ["--classifier-model", classifier, "--resolutions", "coarse", "--out", str(out)]
    assert fam_core.cli.main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    for name in ("few-shot", "kNN", "retrieval"):
        reason = data["skipped"]["relevant-features"][name]
        assert reason.startswith("not applicable:") and "classifier setting only" in reason
    assert "relevant-features" in data["metrics"]["classifier"]
    relevance = data["relevance"]["classifier"]
    task = data["tasks"]["classifier"]  # measured on the whole test split, as the task
    assert relevance["images"] == task["images"] and relevance["features"] > 0
    assert relevance["accuracy"] == pytest.approx(task["accuracy"])
    assert relevance["relevant_drop"] == pytest.approx(
        relevance["accuracy"] - relevance["relevant_accuracy"]
    )
    assert set(relevance["reconstruction_auc"]) == {"0.5", "2.0", "10.0"}
    assert all(0.0 <= auc <= 1.0 for auc in relevance["reconstruction_auc"].values())
    assert "Feature relevance" in (out / "results.md").read_text()


def test_unknown_settings_are_refused_before_any_work() -> None:
    from fam_core.evaluation.runner import EvalOptions, run_evaluation

    with pytest.raises(ValueError, match="unknown settings \\['nope'\\]"):
        run_evaluation(EvalOptions(settings=("scene", "nope"), embedding_model="/nonexistent"))


def test_query_sets_grow_with_the_images_asked_for(tmp_path) -> None:
    from fam_core.models.store import load_model

    embedding, classifier = write_models(tmp_path, seed=3)
    novel = len(settings.SPLITS["novel"])
    for images in (16, 100):
        found = settings.embedding_settings(
            load_model(embedding), images=images, episodes=5, seed=3, model_name="emb"
        )
        knn, retrieval = found[1].task, found[2].task
        assert knn["bank"] == retrieval["gallery"] == settings.BANK_PER_CLASS * novel
        # 72 queries as before for the default 16 images; 1.5 candidates per image for 100
        expected = novel * max(4, math.ceil(settings.CANDIDATES_PER_IMAGE * images / novel))
        assert knn["queries"] == retrieval["queries"] == expected
        assert expected >= settings.CANDIDATES_PER_IMAGE * images
    test = settings.classifier_setting(load_model(classifier), images=200, seed=3, model_name="c")
    assert test.task["images"] >= settings.CANDIDATES_PER_IMAGE * 200
    assert len(test.labels) <= 200


def test_report_marks_significant_differences_from_fam() -> None:
    from fam_core.evaluation.report import markdown
    from fam_core.evaluation.runner import EvalResult, summarise_result

    fam = torch.linspace(0.3, 0.7, 30)
    result = EvalResult(options={}, methods=["fam", "close", "far"])
    result.settings["few-shot"] = {"model": "m", "images": 30, "asked": 40}
    result.per_image["few-shot"] = {
        "fam": {"proportion": fam},
        "close": {"proportion": fam.flip(0)},  # same mean, other images: no difference
        "far": {"proportion": fam - 0.2},
    }
    summarise_result(result, seed=0)
    table = markdown(result, "fam eval")
    assert "30 correctly handled images explained of 40 asked" in table
    far = result.intervals["few-shot"]["far"]["proportion"]
    assert f"| far | 0.300 [{far['low']:.3f}, {far['high']:.3f}] † |" in table
    close_row = next(line for line in table.splitlines() if line.startswith("| close |"))
    assert close_row.startswith("| close | 0.500 [") and "†" not in close_row
    assert not result.comparisons["few-shot"]["close"]["proportion"]["significant"]
    assert "† marks a mean that differs from `fam`" in table
    assert result.metrics["few-shot"]["fam"]["proportion"] == pytest.approx(0.5)


def test_eval_runs_every_setting_at_both_resolutions(tmp_path, capsys, small_benchmark) -> None:
    coarse = write_models(tmp_path, seed=3, backbone="conv4")
    fine = write_models(tmp_path, seed=3, backbone="conv4s8")
    out = tmp_path / "report"
    argv = ["eval", "--images", "2", "--episodes", "10", "--steps", "2", "--sanity-images", "1"]
    argv += [
        "--scenes",
        "2",
        "--seed",
        "3",
        "--methods",
        "fam",
        "--out",
        str(out),
        "--resolutions",
        "coarse",
        "fine",
    ]
    argv += ["--embedding-model", coarse[0], "--classifier-model", coarse[1]]
    argv += ["--fine-embedding-model", fine[0], "--fine-classifier-model", fine[1]]
    assert fam_core.cli.main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    tasks = ("few-shot", "kNN", "retrieval", "scene", "scene-retrieval", "classifier")
    assert list(data["tasks"]) == [*tasks, *(f"{t} 10x10" for t in tasks)]
    for task in tasks:
        assert data["settings"][task]["resolution"] == "5x5"
        assert data["settings"][f"{task} 10x10"]["resolution"] == "10x10"
        assert data["settings"][f"{task} 10x10"]["model"] in fine
    assert data["options"]["resolutions"] == ["coarse", "fine"]
    # each resolution's settings run on its own models: the fine maps are 10x10 before upsampling
    assert data["tasks"]["classifier 10x10"]["accuracy"] == 1.0  # its own fitted last layer
    assert set(data["sanity"]["fam"]) == {"few-shot", "classifier"}  # the first resolution only
    report = (out / "results.md").read_text()
    assert "**classifier 10x10** (" in report and ", 10x10, " in report
    assert "| few-shot | " in report and ", 5x5 |" in report

    assert fam_core.cli.main([*argv, "--resolutions", "fine"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert list(data["tasks"]) == list(tasks)  # the first resolution keeps the plain names
    assert data["settings"]["few-shot"]["resolution"] == "10x10"
    assert "--resolutions fine" in data["command"]


def test_eval_rejects_an_unknown_resolution(tmp_path, capsys, small_benchmark) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fam_core.cli.main(["eval", "--resolutions", "medium", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "invalid choice: 'medium'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("resolutions", "message"),
    [((), "distinct"), (("fine", "fine"), "distinct"), (("coarse", "medium"), "'medium'")],
)
def test_run_evaluation_rejects_bad_resolutions(resolutions, message) -> None:
    from fam_core.evaluation.runner import EvalOptions, run_evaluation

    with pytest.raises(ValueError, match=message):
        run_evaluation(EvalOptions(resolutions=resolutions))


def test_eval_options_pick_each_resolutions_models() -> None:
    from fam_core.evaluation.runner import EvalOptions

    options = EvalOptions(embedding_model="e", classifier_model="c")
    assert options.resolutions == ("coarse",)  # the default run stays within its 10 minutes
    assert options.models("coarse") == ("e", "c")
    assert options.models("fine") == ("default-embedding-fine", "default-classifier-fine")
