"""The evaluation settings of ``fam eval``: which images are explained against which target.

A :class:`Setting` is a batch of benchmark images (with ground-truth masks and boxes) that a
model got right in one task, the target each explainer receives for them, and the score the
faithfulness metrics read. The embedding model is evaluated on the NOVEL classes in three
tasks (few-shot, kNN, retrieval); the classifier on held-out images of all classes.

The rendered sets grow with the number of images asked for (:func:`images_per_class`): every
setting gets ``CANDIDATES_PER_IMAGE`` times as many candidate images as asked for, so that the
count asked for is reached although the model gets some of them wrong; below that, the sets
keep their minimum sizes (the protocol's 16 images per novel class, 4 test images per class).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fam_core.data.flowers import NUM_CLASSES, SPLITS, FlowerBatch, make_flowers
from fam_core.data.scenes import SceneBatch
from fam_core.metrics.scoring import class_probability_scorer, similarity_scorer
from fam_core.models.store import LoadedModel
from fam_core.tasks.fewshot import classify_episode, few_shot_accuracy, sample_episodes
from fam_core.tasks.knn import knn_predict, neighbour_targets
from fam_core.tasks.retrieval import retrieval_metrics, top1_gallery_targets

NOVEL_PER_CLASS = 16  # at least 1 support + 15 queries per class (FAM's 5-way 1-shot protocol)
BANK_PER_CLASS = 12  # kNN bank / retrieval gallery per novel class; the rest are queries
CLASSIFIER_PER_CLASS = 4  # at least: held-out test images per class (accuracy, feature ablation)
CANDIDATES_PER_IMAGE = 1.5  # rendered candidates per image asked for (headroom for misses)
FIT_PER_CLASS = 6  # labelled images per class that RelevantFeatures is fitted on
KNN_TARGET_NEIGHBOURS = 5
DATA_SEED_OFFSET = 500  # evaluation images never coincide with the default training images


@dataclass(frozen=True)
class SceneGroups:
    """How a scene setting's explained pairs group into scenes (:mod:`.scenes`).

    ``scenes`` holds every flower's part; pair ``i`` explains scene ``pair_scene[i]`` against
    the reference of its flower ``pair_flower[i]``.
    """

    scenes: SceneBatch
    pair_scene: torch.Tensor  # [P]
    pair_flower: torch.Tensor  # [P]

    @property
    def present(self) -> torch.Tensor:
        """``[P, 4]`` bool: which flower slots of each pair's scene hold a flower."""
        return self.scenes.labels[self.pair_scene] >= 0


@dataclass
class Setting:
    """Images one task got right and what explainers explain them against.

    ``target`` is what :class:`~fam_core.explainers.base.Explainer` receives (references
    ``[B, K, D]`` or class indices); ``references`` rebuilds it from any model (the
    randomisation test recomputes embeddings with the randomised model);
    ``score`` is the faithfulness score of images in ``[0, 1]``.
    """

    name: str
    model_name: str
    loaded: LoadedModel
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]
    masks: torch.Tensor  # [B, H, W] bool
    boxes: torch.Tensor  # [B, 4]
    labels: torch.Tensor  # [B]
    target: torch.Tensor | list[int]
    retarget: Callable[[nn.Module], torch.Tensor | list[int]]
    score: Callable[[torch.Tensor], torch.Tensor]
    gallery: tuple[torch.Tensor, torch.Tensor] | None = None  # embeddings, labels (retrieval)
    task: dict[str, float] = field(default_factory=dict)
    # labelled images that methods needing training (RelevantFeatures) are fitted on; never
    # the evaluated images (classifier setting only)
    fit_images: torch.Tensor | None = None  # [M, 3, H, W] in [0, 1]
    fit_labels: torch.Tensor | None = None  # [M]
    # the whole held-out test split, right and wrong (classifier setting only): the
    # feature-relevance metrics measure accuracy on it, every class equally represented
    test_images: torch.Tensor | None = None  # [T, 3, H, W] in [0, 1]
    test_labels: torch.Tensor | None = None  # [T]
    # multi-flower scenes (scene settings only): each row is a (scene, flower) pair
    scene: SceneGroups | None = None

    @property
    def classifier(self) -> bool:
        return self.loaded.config.task == "classifier"


def _empty(name: str, model_name: str, loaded: LoadedModel, task: dict) -> Setting:
    """A setting in which the model got no image right: nothing to explain."""
    size = loaded.config.input_size
    return Setting(
        name,
        model_name,
        loaded,
        images=torch.zeros(0, 3, size, size),
        masks=torch.zeros(0, size, size, dtype=torch.bool),
        boxes=torch.zeros(0, 4, dtype=torch.long),
        labels=torch.zeros(0, dtype=torch.long),
        target=[],
        retarget=lambda _model: [],
        score=lambda images: torch.zeros(len(images)),
        task=task,
    )


def _embed(model: nn.Module, loaded: LoadedModel, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(loaded.config.normalize(c)) for c in images.split(64)])


def spread_over_classes(labels: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of ``count`` candidates taken round-robin over their classes.

    Every class gives its first candidate (in the given order) before any class gives its
    second, so the explained images cover as many classes as possible instead of the first
    class's images only.

    Example:
        >>> spread_over_classes(torch.tensor([3, 3, 3, 5, 5, 7]), 4)
        tensor([0, 3, 5, 1])
    """
    labels = torch.as_tensor(labels).flatten()
    rank = torch.zeros(len(labels), dtype=torch.long)
    seen: dict[int, int] = {}
    for i, label in enumerate(labels.tolist()):
        rank[i] = seen.get(label, 0)
        seen[label] = rank[i].item() + 1
    order = torch.sort(rank, stable=True).indices
    return order[: max(count, 0)]


def images_per_class(images: int, classes: int, minimum: int) -> int:
    """Images to render per class so that ``classes`` classes hold at least
    ``CANDIDATES_PER_IMAGE * images`` candidates, and never fewer than ``minimum`` per class.

    Example (200 images over 18 novel classes: 300 candidates, 17 per class):
        >>> images_per_class(200, 18, minimum=4), images_per_class(16, 18, minimum=4)
        (17, 4)
    """
    if images < 0 or classes < 1 or minimum < 0:
        raise ValueError(
            f"need images >= 0, classes >= 1 and minimum >= 0, got {images}, {classes}, {minimum}"
        )
    return max(minimum, math.ceil(CANDIDATES_PER_IMAGE * images / classes))


def _pick(batch: FlowerBatch, index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "images": batch.images[index],
        "masks": batch.masks[index],
        "boxes": batch.boxes[index],
        "labels": batch.labels[index],
    }


def _similarity_setting(
    name: str,
    model_name: str,
    loaded: LoadedModel,
    pool: FlowerBatch,
    index: torch.Tensor,
    target: torch.Tensor,
    retarget: Callable[[nn.Module], torch.Tensor],
    kind: str,
    task: dict,
    gallery: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Setting:
    """The images ``pool[index]`` of an embedding setting, scored by their similarity to
    ``target``."""
    return Setting(
        name,
        model_name,
        loaded,
        **_pick(pool, index),
        target=target,
        retarget=retarget,
        score=similarity_scorer(loaded.model, loaded.config.normalize, target, kind),
        gallery=gallery,
        task=task,
    )


def embedding_settings(
    loaded: LoadedModel, *, images: int, episodes: int, seed: int, model_name: str
) -> list[Setting]:
    """Few-shot, kNN and retrieval settings of an embedding model on the novel classes."""
    novel = list(SPLITS["novel"])
    # the kNN / retrieval queries (all but the bank) and the few-shot pool grow with `images`
    queries = images_per_class(images, len(novel), minimum=NOVEL_PER_CLASS - BANK_PER_CLASS)
    per_class = BANK_PER_CLASS + queries
    pool = make_flowers(
        novel, per_class, image_size=loaded.config.input_size, seed=seed + DATA_SEED_OFFSET
    )
    embeddings = _embed(loaded.model, loaded, pool.images)
    kind = loaded.config.similarity
    return [
        _few_shot(loaded, pool, embeddings, images, episodes, seed, kind, model_name),
        *_bank_settings(loaded, pool, embeddings, images, kind, model_name, per_class),
    ]


def _few_shot(
    loaded: LoadedModel,
    pool: FlowerBatch,
    embeddings: torch.Tensor,
    images: int,
    episodes: int,
    seed: int,
    kind: str,
    model_name: str,
) -> Setting:
    plan = sample_episodes(
        pool.labels, n_way=5, k_shot=1, n_query=NOVEL_PER_CLASS - 1, episodes=episodes, seed=seed
    )
    result = few_shot_accuracy(embeddings, plan, kind)
    candidates: dict[int, torch.Tensor] = {}  # query -> support, first correct episode
    for episode in plan:
        predictions = classify_episode(embeddings, episode, kind)
        correct = (predictions.predicted == predictions.truth).nonzero().flatten()
        for q in correct.tolist():
            query = int(predictions.query[q])
            if query not in candidates:
                candidates[query] = episode.support[int(predictions.predicted[q])]
    queries = list(candidates)
    picked = spread_over_classes(pool.labels[queries], images).tolist() if queries else []
    chosen = [queries[i] for i in picked]
    supports = [candidates[q] for q in chosen]
    task = {"accuracy": result.accuracy, "interval95": result.interval, "episodes": result.episodes}
    if not chosen:
        return _empty("few-shot", model_name, loaded, task)
    index, support_index = torch.tensor(chosen), torch.stack(supports)  # [B], [B, 1]

    def retarget(model: nn.Module) -> torch.Tensor:
        support = _embed(model, loaded, pool.images[support_index.flatten()])
        return support.view(len(chosen), support_index.shape[1], -1).mean(dim=1, keepdim=True)

    target = retarget(loaded.model)
    return _similarity_setting(
        "few-shot", model_name, loaded, pool, index, target, retarget, kind, task
    )


def _bank_settings(
    loaded: LoadedModel,
    pool: FlowerBatch,
    embeddings: torch.Tensor,
    images: int,
    kind: str,
    model_name: str,
    per_class: int,
) -> list[Setting]:
    position = torch.arange(len(pool.labels)) % per_class  # make_flowers renders class by class
    bank_index = (position < BANK_PER_CLASS).nonzero().flatten()
    query_index = (position >= BANK_PER_CLASS).nonzero().flatten()
    bank, bank_labels = embeddings[bank_index], pool.labels[bank_index]
    queries, query_labels = embeddings[query_index], pool.labels[query_index]

    knn = knn_predict(queries, bank, bank_labels, num_classes=NUM_CLASSES)
    knn_correct = (knn.labels == query_labels).nonzero().flatten()
    knn_correct = knn_correct[spread_over_classes(query_labels[knn_correct], images)]
    knn_task = {
        "accuracy": (knn.labels == query_labels).float().mean().item(),
        "k": 200,
        "temperature": 0.07,
        "bank": len(bank_index),
        "queries": len(query_index),
    }
    knn_queries = query_index[knn_correct]
    classes = query_labels[knn_correct]
    neighbour_images = pool.images[bank_index]

    def knn_retarget(model: nn.Module) -> torch.Tensor:
        model_bank = _embed(model, loaded, neighbour_images)
        return neighbour_targets(
            _embed(model, loaded, pool.images[knn_queries]),
            model_bank,
            bank_labels,
            classes,
            count=min(KNN_TARGET_NEIGHBOURS, BANK_PER_CLASS),
        )

    knn_setting = _empty("kNN", model_name, loaded, knn_task)
    if len(knn_correct):
        knn_target = neighbour_targets(
            queries[knn_correct],
            bank,
            bank_labels,
            classes,
            count=min(KNN_TARGET_NEIGHBOURS, BANK_PER_CLASS),
        )
        knn_setting = _similarity_setting(
            "kNN", model_name, loaded, pool, knn_queries, knn_target, knn_retarget, kind, knn_task
        )

    result = retrieval_metrics(queries, query_labels, bank, bank_labels, ks=(1, 5), similarity=kind)
    top_refs, top_index = top1_gallery_targets(queries, bank, kind)
    hit = (bank_labels[top_index] == query_labels).nonzero().flatten()
    hit = hit[spread_over_classes(query_labels[hit], images)]
    retrieval_queries = query_index[hit]
    top_images = pool.images[bank_index[top_index[hit]]]

    def retrieval_retarget(model: nn.Module) -> torch.Tensor:
        return _embed(model, loaded, top_images).unsqueeze(1)

    retrieval_task = {
        "recall@1": result.recall[1],
        "recall@5": result.recall[5],
        "mAP": result.mean_average_precision,
        "gallery": len(bank_index),
        "queries": len(query_index),
    }
    if not len(hit):
        return [knn_setting, _empty("retrieval", model_name, loaded, retrieval_task)]
    retrieval_target = top_refs[hit]
    retrieval_setting = _similarity_setting(
        "retrieval",
        model_name,
        loaded,
        pool,
        retrieval_queries,
        retrieval_target,
        retrieval_retarget,
        kind,
        retrieval_task,
        gallery=(bank, bank_labels),
    )
    return [knn_setting, retrieval_setting]


def classifier_setting(loaded: LoadedModel, *, images: int, seed: int, model_name: str) -> Setting:
    """Held-out images of every class that the classifier gets right, target = their class."""
    test = make_flowers(
        list(range(NUM_CLASSES)),
        images_per_class(images, NUM_CLASSES, minimum=CLASSIFIER_PER_CLASS),
        image_size=loaded.config.input_size,
        seed=seed + DATA_SEED_OFFSET + 1,
    )
    fit = make_flowers(
        list(range(NUM_CLASSES)),
        FIT_PER_CLASS,
        image_size=loaded.config.input_size,
        seed=seed + DATA_SEED_OFFSET + 2,
    )
    order = torch.randperm(len(test.labels), generator=torch.Generator().manual_seed(seed))
    predicted = _embed(loaded.model, loaded, test.images).argmax(dim=1)
    accuracy = (predicted == test.labels).float().mean().item()
    correct = order[(predicted[order] == test.labels[order])]
    correct = correct[spread_over_classes(test.labels[correct], images)]
    classes = test.labels[correct]
    task = {"accuracy": accuracy, "images": len(test.labels)}
    if not len(correct):
        return _empty("classifier", model_name, loaded, task)
    return Setting(
        "classifier",
        model_name,
        loaded,
        **_pick(test, correct),
        target=classes.tolist(),
        retarget=lambda _model: classes.tolist(),
        score=class_probability_scorer(loaded.model, loaded.config.normalize, classes),
        task=task,
        fit_images=fit.images,
        fit_labels=fit.labels,
        test_images=test.images,
        test_labels=test.labels,
    )
