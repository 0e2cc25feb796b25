"""kNN classification over a gallery index (NPID's vote, the FAM paper's kNN setting): equal to
``knn_predict`` and ``neighbour_targets`` on the same bank, in the library and through a
``task: knn`` model config served by the request pipeline and ``fam explain``."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from fam_core.cli import main  # noqa: E402
from fam_core.data.flowers import make_flowers  # noqa: E402
from fam_core.models.store import ModelConfig, find_config  # noqa: E402
from fam_core.pipeline import (  # noqa: E402
    EncodedImage,
    ExplainRequest,
    ModelRegistry,
    Pipeline,
    ServedModel,
    heatmap_from_bytes,
)
from fam_core.pipeline.explained_search import embed  # noqa: E402
from fam_core.render import save_png, to_png_bytes  # noqa: E402
from fam_core.search import IndexRow, model_card, open_index  # noqa: E402
from fam_core.search.knn import knn_classify, knn_targets  # noqa: E402
from fam_core.tasks.knn import knn_predict, neighbour_targets  # noqa: E402

MODEL = "default-embedding"
CLASSES = {"a-yellow": 9, "b-red": 12, "c-stem": 6, "d-leaves": 10}
PER_CLASS = 4
HEATMAP_TOLERANCE = 2e-3  # float16 heatmaps


@pytest.fixture(scope="module")
def model() -> ServedModel:
    return ServedModel.load(MODEL)


@pytest.fixture(scope="module")
def bank(model, tmp_path_factory):
    """A labelled gallery index in a model folder of its own, with its bank as tensors."""
    folder = tmp_path_factory.mktemp("knn-model")
    flowers = make_flowers(list(CLASSES.values()), per_class=PER_CLASS)
    embeddings = embed(model, model.config.normalize(flowers.images))
    names = sorted(CLASSES)
    by_id = {class_id: names.index(name) for name, class_id in CLASSES.items()}
    labels = torch.tensor([by_id[int(c)] for c in flowers.labels])
    index = open_index(str(folder / "gallery.db"))
    index.create(model_card(model))
    index.upsert(
        [
            IndexRow(f"{n}.png", "", names[int(label)], e)
            for n, (label, e) in enumerate(zip(labels, embeddings, strict=True))
        ]
    )
    index.close()
    queries = make_flowers(list(CLASSES.values()), per_class=2, start_index=PER_CLASS)
    return {
        "folder": folder,
        "uri": str(folder / "gallery.db"),
        "embeddings": embeddings,
        "labels": labels,
        "names": tuple(names),
        "queries": queries.images,
    }


@pytest.mark.parametrize(("k", "temperature"), [(5, 0.07), (200, 0.07), (3, 0.5)])
def test_the_vote_is_knn_predict_on_the_same_bank(model, bank, k, temperature):
    queries = embed(model, model.config.normalize(bank["queries"]))
    with open_index(bank["uri"]) as index:
        result = knn_classify(index, queries, k=k, temperature=temperature)
    expected = knn_predict(
        queries, bank["embeddings"], bank["labels"], k=k, temperature=temperature
    )
    assert result.classes == bank["names"]
    assert result.predicted.tolist() == expected.labels.tolist()
    torch.testing.assert_close(result.votes, expected.votes, rtol=1e-4, atol=1e-4)
    assert [len(n) for n in result.neighbours] == [min(k, len(bank["labels"]))] * len(queries)


def test_the_target_is_the_papers_knn_target(model, bank):
    queries = embed(model, model.config.normalize(bank["queries"]))
    predicted = knn_predict(queries, bank["embeddings"], bank["labels"], k=5).labels
    with open_index(bank["uri"]) as index:
        targets = knn_targets(index, queries, [bank["names"][p] for p in predicted], count=3)
    expected = neighbour_targets(queries, bank["embeddings"], bank["labels"], predicted, count=3)
    torch.testing.assert_close(targets, expected, atol=1e-6, rtol=0)


def _knn_config(bank, **changes) -> Path:
    folder = bank["folder"]
    config = ModelConfig.from_file(find_config(MODEL))
    shutil.copy(config.directory / str(config.weights), folder / "weights.pt")
    settings = {
        "name": "knn-flowers",
        "task": "knn",
        "index": "gallery.db",
        "k": 5,
        "prototypes": None,
        "class_names": (),
        "directory": folder,
        **changes,
    }
    knn = dataclasses.replace(config, **settings)
    path = folder / f"config-{len(changes)}.yaml"
    knn.to_file(path)
    return path


def test_a_knn_model_predicts_and_explains_in_the_pipeline(model, bank):
    served = ServedModel.load(_knn_config(bank))
    assert served.task == "knn" and served.labels == bank["names"]
    pipeline = Pipeline(ModelRegistry([served]), batching=None)
    pixels = bank["queries"][:3]
    images = tuple(
        EncodedImage(to_png_bytes((p * 255).round().byte().permute(1, 2, 0))) for p in pixels
    )
    inputs = model.config.normalize(pipeline.pixels(served.name, images))
    queries = embed(model, inputs)
    expected = knn_predict(queries, bank["embeddings"], bank["labels"], k=5)
    explainer = model.explainer("fam")
    for target_class in (None, 1):
        request = ExplainRequest(model=served.name, images=images, target_class=target_class)
        results = pipeline.explain(request).results
        assert [r.prediction.label for r in results] == [bank["names"][p] for p in expected.labels]
        explained = expected.labels if target_class is None else torch.full((3,), target_class)
        targets = neighbour_targets(
            queries, bank["embeddings"], bank["labels"], explained, count=PER_CLASS
        )
        for number, result in enumerate(results):
            votes = expected.votes[number]
            assert result.prediction.score == pytest.approx(
                float(votes.max() / votes.sum()), abs=1e-4
            )
            heatmap = heatmap_from_bytes(result.heatmap.data, result.heatmap.shape).float()
            alone = explainer(inputs[number : number + 1], target=targets[number][None]).maps[0]
            torch.testing.assert_close(heatmap, alone, atol=HEATMAP_TOLERANCE, rtol=0)


def test_fam_explain_runs_a_knn_model(bank, tmp_path, capsys):
    config = _knn_config(bank)
    image = tmp_path / "query.png"
    save_png((bank["queries"][0] * 255).round().byte().permute(1, 2, 0), image)
    assert main(["explain", "--model", str(config), str(image), "--out", str(tmp_path / "o")]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.split("\t")[1] in bank["names"]
    # fam search finds the config's index and takes its top_k
    assert main(["search", "--model", str(_knn_config(bank, top_k=3)), str(image)]) == 0
    (record,) = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert len(record["results"]) == 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"index": None}, "index: task knn needs an index"),
        ({"k": 0}, "k: expected an int >= 1, got 0"),
        ({"temperature": -1.0}, "temperature: expected a number > 0"),
        ({"explain": "all"}, "explain: expected one of ['none', 'query', 'both']"),
        ({"top_k": True}, "top_k: expected an int, got True"),
    ],
)
def test_search_keys_are_checked(changes, message):
    config = ModelConfig.from_file(find_config(MODEL))
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        dataclasses.replace(config, **{"task": "knn", "index": "g.db", **changes})


def test_a_knn_model_whose_index_is_missing_or_anothers_does_not_load(bank, tmp_path):
    with pytest.raises(
        ValueError, match=r"^model 'knn-flowers': index: index .*missing\.db holds no gallery"
    ):
        ServedModel.load(_knn_config(bank, index="missing.db"))
    other = ModelConfig.from_file(find_config("default-embedding-fine"))
    path = tmp_path / "other.yaml"
    shutil.copy(other.directory / str(other.weights), tmp_path / "weights.pt")
    dataclasses.replace(
        other, task="knn", index=bank["uri"], prototypes=None, class_names=(), directory=tmp_path
    ).to_file(path)
    with pytest.raises(
        ValueError,
        match="built by model default-embedding .* searched with model default-embedding-fine",
    ):
        ServedModel.load(path)
