"""The project's own training of its default models, on the embedded benchmark data.

- ``default-embedding``: an FC-free Conv4 trained episodically as a prototypical network
  (Snell et al.) with a scaled cosine similarity, on the BASE classes only; evaluated on
  the NOVEL classes with 5-way 1-shot episodes.
- ``default-classifier``: Conv4 plus a linear layer over all classes, trained with cross
  entropy; evaluated on held-out images.
- ``default-embedding-fine`` and ``default-classifier-fine``: the same two recipes on Conv4-s8
  (8x downsampling), whose target layer is 10x10 at 84x84 instead of 5x5.

:data:`DEFAULT_MODELS` maps each name to its builder and recipe (what ``fam train NAME`` runs).

Training images are generated on the fly (every step sees new images), so the runs need no
data on disk. Everything is seeded: the same command gives the same weights on the same
machine and thread count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fam_core.data.flowers import CLASS_NAMES, NUM_CLASSES, SPLITS, make_flowers, make_flowers_for
from fam_core.models.backbones import EmbeddingNet, build_backbone
from fam_core.models.store import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelConfig,
    load_model,
    normalize_images,
)
from fam_core.tasks.fewshot import EpisodeResult, few_shot_accuracy, sample_episodes

TRAIN_SEED_OFFSET = 1_000  # training images use seeds disjoint from evaluation images
EVAL_SEED = 7
IMAGES_PER_CLASS_RANGE = 1_000_000
Progress = Callable[[str], None]


@dataclass(frozen=True)
class EmbeddingRecipe:
    """Settings of the prototypical training (defaults reach >= 80 % 5-way 1-shot)."""

    backbone: str = "conv4"
    width: float = 1.0
    image_size: int = 84
    steps: int = 150
    n_way: int = 10
    k_shot: int = 3
    n_query: int = 5
    lr: float = 2e-3
    seed: int = 0


@dataclass(frozen=True)
class ClassifierRecipe:
    """Settings of the classifier training (defaults reach >= 95 % test accuracy).

    The backbone starts from the default embedding model's weights (``init_from``; ``None``
    trains from scratch), the linear layer is first fitted on the frozen features
    (``probe_images_per_class``, ``probe_steps``), then everything is fine-tuned with cross
    entropy for ``steps`` batches of fresh images.
    """

    backbone: str = "conv4"
    width: float = 1.0
    image_size: int = 84
    init_from: str | None = "default-embedding"
    probe_images_per_class: int = 20
    probe_steps: int = 300
    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


def normalize(images: torch.Tensor) -> torch.Tensor:
    """The ImageNet normalisation every default model uses (as the FAM paper does)."""
    return normalize_images(images, IMAGENET_MEAN, IMAGENET_STD)


def _fresh_indices(count: int, generator: torch.Generator) -> list[int]:
    return torch.randint(0, IMAGES_PER_CLASS_RANGE, (count,), generator=generator).tolist()


def _episode_batch(recipe: EmbeddingRecipe, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    base = torch.tensor(SPLITS["base"])
    classes = base[torch.randperm(len(base), generator=generator)[: recipe.n_way]].tolist()
    per_class = recipe.k_shot + recipe.n_query
    labels = [c for c in classes for _ in range(per_class)]
    indices = _fresh_indices(len(labels), generator)
    batch = make_flowers_for_training(labels, indices, recipe.image_size, recipe.seed)
    return batch, per_class


def make_flowers_for_training(
    labels: list[int], indices: list[int], size: int, seed: int
) -> torch.Tensor:
    return make_flowers_for(labels, indices, image_size=size, seed=seed + TRAIN_SEED_OFFSET).images


def train_embedding(
    recipe: EmbeddingRecipe = EmbeddingRecipe(), progress: Progress | None = None
) -> EmbeddingNet:
    """Train the prototypical embedding network on base classes."""
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    model = build_backbone(recipe.backbone, width=recipe.width)
    scale = nn.Parameter(torch.tensor(10.0))
    optimizer = torch.optim.Adam([*model.parameters(), scale], lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.steps)
    truth = torch.arange(recipe.n_way).repeat_interleave(recipe.n_query)
    model.train()
    for step in range(recipe.steps):
        images, per_class = _episode_batch(recipe, generator)
        embeddings = model(normalize(images)).view(recipe.n_way, per_class, -1)
        prototypes = F.normalize(embeddings[:, : recipe.k_shot].mean(dim=1), dim=1)
        queries = F.normalize(
            embeddings[:, recipe.k_shot :].reshape(-1, embeddings.shape[-1]), dim=1
        )
        loss = F.cross_entropy(scale * queries @ prototypes.T, truth)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress and (step + 1) % 25 == 0:
            progress(f"step {step + 1}/{recipe.steps} loss {loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def evaluate_embedding(
    model: nn.Module,
    *,
    image_size: int = 84,
    per_class: int = 40,
    episodes: int = 600,
    seed: int = EVAL_SEED,
) -> EpisodeResult:
    """5-way 1-shot accuracy on the NOVEL classes, 15 queries per class, with its 95 % interval."""
    novel = list(SPLITS["novel"])
    pool = make_flowers(novel, per_class, image_size=image_size, seed=seed)
    embeddings = torch.cat([model(normalize(chunk)) for chunk in pool.images.split(128)])
    plan = sample_episodes(pool.labels, n_way=5, k_shot=1, n_query=15, episodes=episodes, seed=seed)
    return few_shot_accuracy(embeddings, plan, "cosine")


def train_classifier(
    recipe: ClassifierRecipe = ClassifierRecipe(), progress: Progress | None = None
) -> EmbeddingNet:
    """Train the backbone plus a linear classifier over all classes."""
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    model = build_backbone(recipe.backbone, width=recipe.width, num_classes=NUM_CLASSES)
    if recipe.init_from is not None:
        source, _ = load_model(recipe.init_from)
        model.load_state_dict(source.state_dict(), strict=False)  # everything but ``fc``
        _fit_linear_probe(model, recipe, progress)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, recipe.steps))
    model.train()
    for step in range(recipe.steps):
        labels = torch.randint(0, NUM_CLASSES, (recipe.batch_size,), generator=generator)
        images = make_flowers_for_training(
            labels.tolist(),
            _fresh_indices(len(labels), generator),
            recipe.image_size,
            recipe.seed,
        )
        loss = F.cross_entropy(model(normalize(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress and (step + 1) % 25 == 0:
            progress(f"step {step + 1}/{recipe.steps} loss {loss.item():.3f}")
    return model.eval()


def _fit_linear_probe(
    model: EmbeddingNet, recipe: ClassifierRecipe, progress: Progress | None
) -> None:
    """Fit ``model.fc`` by cross entropy on the frozen embeddings of fresh training images."""
    train = make_flowers(
        list(range(NUM_CLASSES)),
        recipe.probe_images_per_class,
        image_size=recipe.image_size,
        seed=recipe.seed + TRAIN_SEED_OFFSET,
    )
    model.eval()
    with torch.no_grad():
        features = torch.cat(
            [model.embedding(normalize(chunk)) for chunk in train.images.split(128)]
        )
    optimizer = torch.optim.Adam(model.fc.parameters(), lr=0.05)
    for _ in range(recipe.probe_steps):
        loss = F.cross_entropy(model.fc(features), train.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if progress:
        progress(f"linear probe on frozen features: loss {loss.item():.3f}")


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, *, image_size: int = 84, per_class: int = 20, seed: int = EVAL_SEED
) -> float:
    """Accuracy on held-out images of every class."""
    test = make_flowers(list(range(NUM_CLASSES)), per_class, image_size=image_size, seed=seed)
    predictions = torch.cat(
        [model(normalize(chunk)).argmax(dim=1) for chunk in test.images.split(128)]
    )
    return (predictions == test.labels).float().mean().item()


def save_model(model: nn.Module, config: ModelConfig, directory: str | Path) -> Path:
    """Write ``config.yaml`` and the weights into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / config.weights)
    config.to_file(directory / "config.yaml")
    return directory


def _default_config(
    model: EmbeddingNet,
    recipe: EmbeddingRecipe | ClassifierRecipe,
    train_seconds: float,
    metrics: dict[str, object],
    **fields: object,
) -> ModelConfig:
    """The config of a default model: what every default shares, plus ``fields``;
    ``metrics`` gets the training time and the recipe."""
    return ModelConfig(
        backbone=recipe.backbone,
        weights="weights.pt",
        target_layer=model.default_target_layer,
        input_size=recipe.image_size,
        metrics={**metrics, "train_seconds": round(train_seconds, 1), "recipe": recipe.__dict__},
        **fields,  # type: ignore[arg-type]
    )


def _timed(train: Callable[[], EmbeddingNet]) -> tuple[EmbeddingNet, float]:
    started = time.perf_counter()
    model = train()
    return model, time.perf_counter() - started


# build_default_embedding and build_default_classifier share their signature on purpose: both
# are DEFAULT_MODELS builders, called alike by ``fam train NAME``.
def build_default_embedding(
    directory: str | Path,
    recipe: EmbeddingRecipe = EmbeddingRecipe(),
    progress: Progress | None = None,
    name: str = "default-embedding",
) -> ModelConfig:
    """Train, evaluate and save the embedding model ``name`` with novel-class prototypes."""
    model, seconds = _timed(lambda: train_embedding(recipe, progress))
    result = evaluate_embedding(model, image_size=recipe.image_size)
    novel = list(SPLITS["novel"])
    with torch.no_grad():
        support = make_flowers(novel, 5, image_size=recipe.image_size, seed=EVAL_SEED + 1)
        prototypes = model(normalize(support.images)).view(len(novel), 5, -1).mean(dim=1)
    config = _default_config(
        model,
        recipe,
        seconds,
        {
            "novel_5way_1shot_accuracy": round(result.accuracy, 4),
            "novel_5way_1shot_interval95": round(result.interval, 4),
            "episodes": result.episodes,
        },
        name=name,
        task="embedding",
        backbone_kwargs={"width": recipe.width},
        class_names=tuple(CLASS_NAMES[c] for c in novel),
        prototypes="prototypes.pt",
        similarity="cosine",
    )
    save_model(model, config, directory)
    torch.save(prototypes.contiguous(), Path(directory) / "prototypes.pt")
    return config


def build_default_classifier(
    directory: str | Path,
    recipe: ClassifierRecipe = ClassifierRecipe(),
    progress: Progress | None = None,
    name: str = "default-classifier",
) -> ModelConfig:
    """Train, evaluate and save the classifier ``name``."""
    model, seconds = _timed(lambda: train_classifier(recipe, progress))
    config = _default_config(
        model,
        recipe,
        seconds,
        {"test_accuracy": round(evaluate_classifier(model, image_size=recipe.image_size), 4)},
        name=name,
        task="classifier",
        backbone_kwargs={"width": recipe.width, "num_classes": NUM_CLASSES},
        class_names=tuple(CLASS_NAMES),
    )
    save_model(model, config, directory)
    return config


Builder = Callable[..., ModelConfig]
DEFAULT_MODELS: dict[str, tuple[Builder, EmbeddingRecipe | ClassifierRecipe]] = {
    "default-embedding": (build_default_embedding, EmbeddingRecipe()),
    "default-classifier": (build_default_classifier, ClassifierRecipe()),
    "default-embedding-fine": (build_default_embedding, EmbeddingRecipe(backbone="conv4s8")),
    "default-classifier-fine": (
        build_default_classifier,
        ClassifierRecipe(backbone="conv4s8", init_from="default-embedding-fine"),
    ),
}
"""Every default model of the store: its builder and its recipe (``fam train NAME``)."""


def build_default_model(
    name: str,
    directory: str | Path,
    progress: Progress | None = None,
    **overrides: object,
) -> ModelConfig:
    """Train, evaluate and save the default model ``name``, its recipe updated by ``overrides``.

    Example:
        >>> sorted(DEFAULT_MODELS)[:2]
        ['default-classifier', 'default-classifier-fine']
        >>> build_default_model("vgg", "out")
        Traceback (most recent call last):
        ...
        ValueError: unknown default model 'vgg'; expected one of ['default-embedding', \
'default-classifier', 'default-embedding-fine', 'default-classifier-fine']
    """
    if name not in DEFAULT_MODELS:
        raise ValueError(f"unknown default model {name!r}; expected one of {list(DEFAULT_MODELS)}")
    build, recipe = DEFAULT_MODELS[name]
    return build(directory, replace(recipe, **overrides), progress, name)
