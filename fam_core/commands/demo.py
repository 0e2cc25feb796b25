"""``fam demo``: the default models explain benchmark images; overlays and a summary page."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fam_core.data.flowers import CLASS_NAMES, SPLITS, make_flowers
from fam_core.explainers import FAM
from fam_core.models.store import load_model
from fam_core.render import grid, overlay_figure, save_png

DEMO_SEED_OFFSET = 500  # demo images differ from training and evaluation images


@dataclass(frozen=True)
class DemoResult:
    overlays: list[Path]
    summary: Path


def _energy_in(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each map's energy inside its mask (FAM eq. 19 with the part mask)."""
    return (maps * masks).flatten(1).sum(1) / maps.flatten(1).sum(1).clamp_min(1e-12)


@torch.no_grad()
def run_demo(out: Path, *, count: int = 5, seed: int = 0) -> DemoResult:
    """Explain ``count`` novel-class images with both default models and write PNGs to ``out``.

    The embedding model sees a 1-shot episode: one support image per class is the reference,
    each query is explained against the support image it is most similar to (eq. 11, K = 1).
    The classifier explains its predicted class.
    """
    if not 1 <= count <= 16:
        raise ValueError(f"count must be between 1 and 16, got {count}")
    out.mkdir(parents=True, exist_ok=True)
    classes = list(SPLITS["novel"][:count])
    demo_seed = seed + DEMO_SEED_OFFSET
    support = make_flowers(classes, 1, seed=demo_seed)
    queries = make_flowers(classes, 1, seed=demo_seed, start_index=1)

    embedding_model, embedding_config = load_model("default-embedding")
    fam = FAM(embedding_model, embedding_config.target_layer)
    support_embeddings = fam.embed(embedding_config.normalize(support.images))
    query_inputs = embedding_config.normalize(queries.images)
    similarities = (
        torch.nn.functional.normalize(fam.embed(query_inputs), dim=1)
        @ torch.nn.functional.normalize(support_embeddings, dim=1).T
    )
    nearest = similarities.argmax(dim=1)
    embedding_explanation = fam(query_inputs, target=support_embeddings[nearest].unsqueeze(1))

    classifier, classifier_config = load_model("default-classifier")
    cam = FAM(classifier, classifier_config.target_layer)
    class_inputs = classifier_config.normalize(queries.images)
    classifier_explanation = cam(class_inputs)
    predicted = cam.embed(class_inputs).argmax(dim=1)

    overlays = []
    embedding_energy = _energy_in(embedding_explanation.maps, queries.masks)
    classifier_energy = _energy_in(classifier_explanation.maps, queries.masks)
    print(
        f"{'image':<8}{'true class':<28}{'1-shot match':<28}{'classifier':<28}part energy (emb / clf)"
    )
    for i, label in enumerate(queries.labels.tolist()):
        match = CLASS_NAMES[classes[int(nearest[i])]]
        guess = CLASS_NAMES[int(predicted[i])]
        for kind, explanation, title in (
            (
                "embedding",
                embedding_explanation,
                f"1-shot: {match} (cos {similarities[i, nearest[i]]:.2f})",
            ),
            ("classifier", classifier_explanation, f"classifier: {guess}"),
        ):
            figure = overlay_figure(queries.images[i], explanation.maps[i], title=title)
            overlays.append(save_png(figure, out / f"{kind}_{i}.png"))
        print(
            f"{i:<8}{CLASS_NAMES[label]:<28}{match:<28}{guess:<28}"
            f"{100 * embedding_energy[i]:.0f} % / {100 * classifier_energy[i]:.0f} %"
        )
    page = grid(
        queries.images,
        {
            "FAM: embedding vs 1-shot support": embedding_explanation.maps,
            "FAM: classifier": classifier_explanation.maps,
            "discriminative part (truth)": queries.masks.float(),
        },
        row_labels=[CLASS_NAMES[c] for c in queries.labels.tolist()],
        title="fam demo: explanations on novel classes",
    )
    summary = save_png(page, out / "summary.png")
    print(f"wrote {len(overlays)} overlays to {out}/ and the summary page {summary}")
    return DemoResult(overlays, summary)
