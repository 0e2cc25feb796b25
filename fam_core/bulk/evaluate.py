"""Per-image faithfulness metrics in a bulk job (``fam bulk --eval``): ``fam eval``'s metrics
on any image set, one value per image, aggregated by :mod:`fam_core.bulk.summary`.

Each image gets Average Drop and Increase in Confidence (FAM, Liao et al., eq. 21-22, on the
masked model input :func:`~fam_core.metrics.masked_model_input`) and the deletion / insertion
AUC, from the functions ``fam eval`` uses (:mod:`fam_core.metrics.faithfulness`), on the score
the heatmap explains: the probability of the explained class (classifiers), the similarity to
the references or, without references, to the predicted prototype (embedding models). The
mean of the per-image Average Drop over the images with a positive score is eq. 21 on the set.

Example:
    >>> from fam_core.bulk.rows import METRIC_COLUMNS
    >>> METRIC_COLUMNS[:2]
    ('average_drop', 'increase_confidence')
"""

from __future__ import annotations

import torch

from fam_core.metrics import faithfulness as faith
from fam_core.metrics.scoring import class_probability_scorer, similarity_scorer
from fam_core.pipeline import ServedModel

DEFAULT_STEPS = 10
"""Deletion / insertion points, as ``fam eval``'s default."""


def check_evaluable(served: ServedModel, references: torch.Tensor | None) -> None:
    """``ValueError`` unless the metrics can be computed for ``served``."""
    if served.model is None:
        raise ValueError(f"--eval needs a torch model; {served.name!r} is an ONNX graph")
    if served.task == "embedding" and references is None and served.prototypes is None:
        raise ValueError(
            f"--eval on embedding model {served.name!r} needs --references or prototypes"
        )


@torch.no_grad()
def image_metrics(
    served: ServedModel,
    pixels: torch.Tensor,
    maps: torch.Tensor,
    explained: torch.Tensor,
    references: torch.Tensor | None = None,
    steps: int = DEFAULT_STEPS,
) -> list[dict[str, float]]:
    """The metrics of each image, one dict per row of ``pixels``.

    Args:
        served: the model (torch).
        pixels: ``[B, 3, H, W]`` images in ``[0, 1]`` at the model's input size.
        maps: ``[B, H, W]`` heatmaps at input resolution.
        explained: ``[B]`` the explained class (classifiers) or predicted prototype index.
        references: ``[K, D]`` reference embeddings (embedding models), else the prototypes.
        steps: deletion / insertion points.
    """
    check_evaluable(served, references)
    model, config = served.model, served.config
    device = next(model.parameters()).device  # type: ignore[union-attr]
    pixels, maps = pixels.to(device), maps.to(device=device, dtype=torch.float32)
    if served.task == "classifier":
        score = class_probability_scorer(model, config.normalize, explained.to(device))  # type: ignore[arg-type]
    else:
        targets = (
            references.unsqueeze(0).expand(len(pixels), -1, -1)
            if references is not None
            else served.prototypes[explained].unsqueeze(1)  # type: ignore[index]
        )
        score = similarity_scorer(model, config.normalize, targets.to(device), config.similarity)  # type: ignore[arg-type]
    scores = score(pixels)
    masked = score(faith.masked_model_input(pixels, maps, config.mean))
    deletion = faith.curve_auc(faith.deletion_curve(score, pixels, maps, steps=steps))
    insertion = faith.curve_auc(faith.insertion_curve(score, pixels, maps, steps=steps))
    return [
        {
            "average_drop": faith.average_drop(scores[i : i + 1], masked[i : i + 1]),
            "increase_confidence": faith.increase_in_confidence(
                scores[i : i + 1], masked[i : i + 1]
            ),
            "deletion_auc": float(deletion[i]),
            "insertion_auc": float(insertion[i]),
        }
        for i in range(len(pixels))
    ]
