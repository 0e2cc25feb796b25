"""The scene settings of ``fam eval``: which flower of a multi-flower scene made the match?

A query is a scene of 2 to 4 novel-class flowers (:mod:`fam_core.data.scenes`); it is
explained against the reference of ONE of its flowers, once per flower, so every scene gives
one explained (scene, reference) pair per flower. The matched flower's discriminative part is
the pair's ground truth (``Setting.masks`` / ``boxes``); the other flowers' parts are in
``Setting.scene``, and :mod:`fam_core.metrics.target` reads both.

- ``scene``: the reference of flower ``j`` is a support image of its class (one single-flower
  image of the novel pool, as in a 1-shot episode);
- ``scene-retrieval``: the scene is a query against the single-flower gallery of the
  retrieval setting; the reference of flower ``j`` is the gallery item of its class that
  matches the scene best (for the flower of the top-1 item: the top-1 item itself).

The task numbers say whether the embedding model itself matches scenes correctly.
"""

from __future__ import annotations

import torch
from torch import nn

from fam_core.data.flowers import NUM_CLASSES, SPLITS, FlowerBatch, make_flowers
from fam_core.data.scenes import GRID, SceneBatch, make_scenes
from fam_core.evaluation import settings as _settings
from fam_core.evaluation.settings import SceneGroups, Setting, _embed
from fam_core.maths.similarity import similarity
from fam_core.metrics import target
from fam_core.metrics.scoring import similarity_scorer
from fam_core.models.store import LoadedModel

SCENE_SEED_OFFSET = 3  # scenes never share a seed with the single-flower pools


def scene_settings(
    loaded: LoadedModel, *, images: int, seed: int, model_name: str
) -> list[Setting]:
    """The ``scene`` and ``scene-retrieval`` settings of an embedding model on ``images``
    scenes. References come from the novel-class pool of
    :func:`~fam_core.evaluation.settings.embedding_settings` (the same images: same seed),
    the gallery is its retrieval gallery."""
    per_class = _settings.NOVEL_PER_CLASS
    pool = make_flowers(
        list(SPLITS["novel"]),
        per_class,
        image_size=loaded.config.input_size,
        seed=seed + _settings.DATA_SEED_OFFSET,
    )
    pool_embeddings = _embed(loaded.model, loaded, pool.images)
    gallery_index = (
        (torch.arange(len(pool)) % per_class < _settings.BANK_PER_CLASS).nonzero().flatten()
    )
    size = loaded.config.input_size
    scenes = make_scenes(
        SPLITS["novel"],
        images,
        cell_size=size,
        seed=seed + _settings.DATA_SEED_OFFSET + SCENE_SEED_OFFSET,
    )
    embeddings = _embed(loaded.model, loaded, scenes.images)
    kind = loaded.config.similarity
    novel = list(SPLITS["novel"])
    count = len(scenes)
    present = scenes.labels >= 0

    # scene: flower j's reference is a support image of its class (pool position s mod per_class)
    support = torch.tensor(
        [[novel.index(c) * per_class + s % per_class for c in novel] for s in range(count)]
    )  # [S, 18] pool positions, one support per novel class
    class_sims = similarity(embeddings, pool_embeddings[support], kind)  # [S, 18]
    slot = _class_slots(scenes, novel)  # [S, 4] column of each flower's class, -1 padding
    fewshot_refs = support.gather(1, slot.clamp_min(0))  # [S, 4] pool positions
    cells = _cell_embeddings(loaded, scenes)  # [S, 4 cells, D]
    fewshot_task = _matching_task(class_sims, slot, present)
    fewshot_task["cell_match"] = _cell_match(cells, scenes, pool_embeddings[fewshot_refs], kind)

    # scene-retrieval: the gallery item of each flower's class that matches the scene best
    gallery = pool_embeddings[gallery_index]
    gallery_labels = pool.labels[gallery_index]
    gallery_sims = similarity(embeddings, gallery.unsqueeze(0).expand(count, -1, -1), kind)
    best = torch.full((count, scenes.labels.shape[1]), -1, dtype=torch.long)
    for s in range(count):
        for j in range(int(scenes.counts[s])):
            of_class = (gallery_labels == scenes.labels[s, j]).nonzero().flatten()
            best[s, j] = gallery_index[of_class[gallery_sims[s, of_class].argmax()]]
    top1 = gallery_labels[gallery_sims.argmax(dim=1)]
    retrieval_task = {
        "recall@1": (top1.unsqueeze(1) == scenes.labels).any(dim=1).float().mean().item(),
        "cell_match": _cell_match(cells, scenes, pool_embeddings[best.clamp_min(0)], kind),
        "gallery": len(gallery_index),
    }
    return [
        _setting("scene", loaded, model_name, pool, scenes, fewshot_refs, fewshot_task),
        _setting("scene-retrieval", loaded, model_name, pool, scenes, best, retrieval_task),
    ]


def _class_slots(scenes: SceneBatch, classes: list[int]) -> torch.Tensor:
    """``[S, 4]``: the column of each flower's class in ``classes``, -1 for padding."""
    lookup = torch.full((NUM_CLASSES,), -1, dtype=torch.long)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))
    return torch.where(scenes.labels >= 0, lookup[scenes.labels.clamp_min(0)], -1)


def _matching_task(
    class_sims: torch.Tensor, slot: torch.Tensor, present: torch.Tensor
) -> dict[str, float]:
    """Does the scene match its own flowers' classes best? (class_sims: scene vs one support
    per candidate class)"""
    is_present = torch.zeros_like(class_sims, dtype=torch.bool)
    rows = torch.arange(len(slot)).unsqueeze(1).expand_as(slot)
    is_present[rows[present], slot[present]] = True
    top1 = is_present.gather(1, class_sims.argmax(dim=1, keepdim=True)).float().mean()
    # each present class against each absent one: ranked above it?
    above = class_sims.unsqueeze(2) > class_sims.unsqueeze(1)  # [S, C, C]: c above c'
    wanted = is_present.unsqueeze(2) & ~is_present.unsqueeze(1)
    pairs_right = (above & wanted).flatten(1).sum(1) / wanted.flatten(1).sum(1)
    counts = present.sum(dim=1, keepdim=True)
    top_n = class_sims.argsort(dim=1, descending=True)
    exact = torch.stack([is_present[s, top_n[s, : int(counts[s])]].all() for s in range(len(slot))])
    return {
        "top1_present": top1.item(),
        "present_above_absent": pairs_right.mean().item(),
        "top_n_exact": exact.float().mean().item(),
        "scenes": len(slot),
        "pairs": int(present.sum()),
    }


def _cell_embeddings(loaded: LoadedModel, scenes: SceneBatch) -> torch.Tensor:
    """Embeddings ``[S, 4, D]`` of each grid cell cut out of the scene on its own."""
    size = scenes.images.shape[-1] // GRID
    crops = scenes.images.unfold(2, size, size).unfold(3, size, size)  # [S, 3, 2, 2, c, c]
    crops = crops.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, size, size)  # cell = row * 2 + col
    return _embed(loaded.model, loaded, crops).view(len(scenes), GRID * GRID, -1)


def _cell_match(
    cells: torch.Tensor,
    scenes: SceneBatch,
    references: torch.Tensor,
    kind: str,
) -> float:
    """Share of (scene, flower) pairs whose reference is most similar to that flower's own
    cell among the scene's flowers' cells."""
    hits = []
    for s in range(len(scenes)):
        n = int(scenes.counts[s])
        own_cells = cells[s, scenes.cells[s, :n]]  # [n, D]
        refs = references[s, :n].unsqueeze(1).expand(-1, n, -1)  # [n (reference), n, D]
        sims = similarity(
            own_cells.unsqueeze(0).expand(n, -1, -1).reshape(-1, cells.shape[2]),
            refs.reshape(-1, 1, cells.shape[2]),
            kind,
        ).view(n, n)
        hits.append((sims.argmax(dim=1) == torch.arange(n)).float())
    return torch.cat(hits).mean().item()


def _setting(
    name: str,
    loaded: LoadedModel,
    model_name: str,
    pool: FlowerBatch,
    scenes: SceneBatch,
    references: torch.Tensor,
    task: dict[str, float],
) -> Setting:
    """One pair per (scene, flower): the scene explained against pool image
    ``references[s, j]``."""
    pair_scene, pair_flower = (scenes.labels >= 0).nonzero(as_tuple=True)
    reference_images = pool.images[references[pair_scene, pair_flower]]

    def retarget(model: nn.Module) -> torch.Tensor:
        return _embed(model, loaded, reference_images).unsqueeze(1)

    target = retarget(loaded.model)
    images = scenes.images[pair_scene]
    return Setting(
        name,
        model_name,
        loaded,
        images=images,
        masks=scenes.masks[pair_scene, pair_flower],
        boxes=scenes.boxes[pair_scene, pair_flower],
        labels=scenes.labels[pair_scene, pair_flower],
        target=target,
        retarget=retarget,
        score=similarity_scorer(
            loaded.model, loaded.config.normalize, target, loaded.config.similarity
        ),
        task=task,
        scene=SceneGroups(scenes, pair_scene, pair_flower),
    )


SCENE_METRICS: dict[str, str] = {
    "proportion_matched": "scenes: eq. 19 proportion in the matched flower's part box",
    "proportion_others": "scenes: the same in another flower's part box (mean over them)",
    "pointing_matched": "scenes: pointing game on the matched flower's part mask",
    "pointing_others": "scenes: pointing game on another flower's part (mean over them)",
    "sensitivity_gap": "scenes: energy on the referenced part minus mean energy on the others, "
    "each flower's reference in turn (higher is better; target-blind ~0)",
    "sensitivity_rank": "scenes: mean Spearman correlation between a scene's maps for "
    "different references (lower is more target-sensitive; target-blind 1)",
}


def scene_metrics(
    setting: Setting, maps: torch.Tensor
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The :data:`SCENE_METRICS` of one method's maps ``[P, H, W]`` on a scene setting: their
    means and their per-pair (``*_matched``, ``*_others``) or per-scene (``sensitivity_*``)
    values (float tensors on the CPU), for bootstrap intervals."""
    if setting.scene is None:
        raise ValueError(f"setting {setting.name!r} holds no scenes")
    groups = setting.scene
    scenes, present = groups.scenes, groups.present
    boxes, masks = scenes.boxes[groups.pair_scene], scenes.masks[groups.pair_scene]
    shares = target.part_shares(maps, boxes)
    hits = target.part_hits(maps, masks)
    values: dict[str, torch.Tensor] = {}
    for name, per_part in (("proportion", shares), ("pointing", hits)):
        matched, others = target.matched_and_others(per_part, groups.pair_flower, present)
        values[f"{name}_matched"], values[f"{name}_others"] = matched, others
    by_scene = maps.new_zeros(len(scenes), scenes.labels.shape[1], *maps.shape[1:])
    by_scene[groups.pair_scene, groups.pair_flower] = maps
    values["sensitivity_gap"], values["sensitivity_rank"] = target.target_sensitivity(
        by_scene, scenes.boxes, scenes.labels >= 0
    )
    per_item = {name: v.detach().float().cpu() for name, v in values.items()}
    return {name: v.mean().item() for name, v in per_item.items()}, per_item
