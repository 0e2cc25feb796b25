"""Predict and explain with a loaded model: the one path the CLI and the demo share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fam_core.explainers import FAM
from fam_core.explanation import Explanation
from fam_core.models.store import LoadedModel


@dataclass(frozen=True)
class Prediction:
    """The decision that an explanation explains."""

    label: str
    index: int
    score: float


def predict_and_explain(
    loaded: LoadedModel,
    images: torch.Tensor,
    references: torch.Tensor | None = None,
    *,
    target_layer: str | None = None,
) -> tuple[Explanation, list[Prediction]]:
    """Explain ``images`` ``[B, 3, H, W]`` in ``[0, 1]`` (already at the model's input size).

    - classifier: the predicted class (score: its softmax probability);
    - embedding model with ``references`` (images in ``[0, 1]``): their mean similarity
      (eq. 11), label ``"references"``;
    - embedding model with prototypes: the most similar prototype (label: its class);
    - otherwise: the image's own embedding.
    """
    model, config = loaded
    explainer = FAM(
        model, target_layer=target_layer or config.target_layer, similarity=config.similarity
    )  # type: ignore[arg-type]
    inputs = config.normalize(images)
    if config.task == "classifier":
        explanation = explainer(inputs)
        probabilities = F.softmax(explainer.embed(inputs), dim=1)
        best = probabilities.argmax(dim=1)
        return explanation, [
            Prediction(_name(config.class_names, int(i)), int(i), float(probabilities[b, i]))
            for b, i in enumerate(best)
        ]
    if references is not None:
        explanation = explainer(inputs, target=explainer.embed(config.normalize(references)))
        return explanation, [Prediction("references", -1, float(s)) for s in explanation.scores]
    prototypes = config.load_prototypes()
    if prototypes is None:
        explanation = explainer(inputs)
        return explanation, [Prediction("self", -1, float(s)) for s in explanation.scores]
    prototypes = prototypes.to(inputs.device)
    scores = F.normalize(explainer.embed(inputs), dim=1) @ F.normalize(prototypes, dim=1).T
    best = scores.argmax(dim=1)
    explanation = explainer(inputs, target=prototypes[best].unsqueeze(1))
    return explanation, [
        Prediction(_name(config.class_names, int(i)), int(i), float(scores[b, i]))
        for b, i in enumerate(best)
    ]


def _name(names: tuple[str, ...], index: int) -> str:
    return names[index] if index < len(names) else str(index)
