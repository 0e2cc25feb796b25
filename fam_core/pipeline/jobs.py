"""What a backend is given and returns: :class:`Job` in, :class:`Computed` out.

Shared by the engine (:mod:`fam_core.pipeline.engine`) and every backend
(:mod:`fam_core.pipeline.backends`); it imports neither, so the modules form no cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from fam_core.explainers.registry import CostClass, cost_class
from fam_core.explanation import Explanation, Resolution


class Scoring(Protocol):
    """What :func:`predict` needs of a served model."""

    @property
    def task(self) -> str: ...

    @property
    def prototypes(self) -> torch.Tensor | None: ...


@dataclass(frozen=True)
class Job:
    """The model-facing part of one request.

    Attributes:
        inputs: ``[b, 3, H, W]`` normalised model inputs.
        method: the explainer's name.
        heatmap: ``False`` predicts only.
        target_class: classifiers: the class to explain (``None``: the predicted one).
        references: embedding models: ``[K, D]`` reference embeddings (``None``: prototypes).
        resolution: the heatmap's, ``"input"`` or ``"feature"``: an ONNX graph runs
            without its input-size branch for ``"feature"``.
    """

    inputs: torch.Tensor
    method: str
    heatmap: bool = True
    target_class: int | None = None
    references: torch.Tensor | None = None
    resolution: Resolution = "input"

    def batch_key(self) -> tuple[str, bool, int, str]:
        """Jobs with equal keys can run in one pass."""
        references = -1 if self.references is None else int(self.references.shape[0])
        resolution = self.resolution if self.heatmap else ""
        return (self.method if self.heatmap else "", self.heatmap, references, resolution)

    def cost_class(self) -> CostClass:
        """``"cheap"`` or ``"expensive"``: the method's declared cost class (predicting only
        is cheap); the scheduler's lane for this job."""
        return cost_class(self.method) if self.heatmap else "cheap"

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


@dataclass(frozen=True)
class SearchJob:
    """The model-facing part of a search: queries for the served model's gallery index.

    Attributes:
        inputs: ``[b, 3, H, W]`` normalised model inputs.
        method: the explainer of the maps.
        explain: ``"none"``, ``"query"`` or ``"both"``.
        top_k: neighbours per query.
        filter: a boolean expression over the index's fields, or ``None``.
        search_params: the index's search parameters asked for (sorted ``(name, value)``
            pairs: ``(("ef", 128),)``); empty: the model config's.

    Example:
        >>> job = SearchJob(torch.zeros(2, 3, 8, 8), "fam", "both", 10, None, (("ef", 128),))
        >>> len(job), job.cost_class(), job.batch_key()[0], job.batch_key()[-1]
        (2, 'expensive', 'search', 'ef=128')
    """

    inputs: torch.Tensor
    method: str
    explain: str
    top_k: int
    filter: str | None = None
    search_params: tuple[tuple[str, int], ...] = ()

    def batch_key(self) -> tuple[str, ...]:
        """Searches with equal keys run as one batch of queries."""
        params = ",".join(f"{name}={value}" for name, value in self.search_params)
        return ("search", self.method, self.explain, str(self.top_k), self.filter or "", params)

    def cost_class(self) -> CostClass:
        """Cheap without maps; ``"both"`` (a forward pass per neighbour) is expensive; the
        query's maps cost what the method costs."""
        if self.explain == "none":
            return "cheap"
        return "expensive" if self.explain == "both" else cost_class(self.method)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


@dataclass(frozen=True)
class Computed:
    """Model outputs and explanation of one job (tensors on the model's device).

    ``scores``: ``[b, C]`` softmax probabilities (classifiers) or ``[b, K]`` cosine similarity
    to the prototypes or references (embedding models; ``[b, 0]`` when there are none);
    ``predicted``: ``[b]`` argmax of ``scores`` (``-1`` with no scores); ``raw``: ``[b, h, w]``
    map at the target layer; ``maps``: ``[b, H, W]`` when the method made them itself;
    ``feature_maps``: ``[b, h, w]`` ``raw`` min-max normalised, when the method made its maps
    at the feature resolution only (an ONNX graph run without its input-size branch; then
    ``maps`` is ``None``); ``flat``: ``[b]`` maps with no spatial information (all zeros),
    ``flat_reason`` why (:func:`fam_core.explanation.flat_reason`). Every tensor is
    batch-first.
    """

    outputs: torch.Tensor
    scores: torch.Tensor
    predicted: torch.Tensor
    explained: torch.Tensor | None = None
    raw: torch.Tensor | None = None
    maps: torch.Tensor | None = None
    feature_maps: torch.Tensor | None = None
    method: str = ""
    target_layer: str = ""
    flat: torch.Tensor | None = None
    flat_reason: str = ""

    @classmethod
    def explained_by(
        cls,
        outputs: torch.Tensor,
        scores: torch.Tensor,
        predicted: torch.Tensor,
        explanation: Explanation,
    ) -> Computed:
        """A prediction with the explanation of the same images (its maps as
        ``feature_maps`` when it made them at the feature resolution only)."""
        feature = explanation.extras.get("resolution") == "feature"
        return cls(
            outputs=outputs,
            scores=scores,
            predicted=predicted,
            explained=explanation.scores,
            raw=explanation.raw,
            maps=None if feature else explanation.maps,
            feature_maps=explanation.maps if feature else None,
            method=explanation.method,
            target_layer=explanation.target_layer,
            flat=_tensor_or_none(explanation.extras.get("flat")),
            flat_reason=str(explanation.extras.get("flat_reason", "")),
        )


def _tensor_or_none(value: object) -> torch.Tensor | None:
    return value if isinstance(value, torch.Tensor) else None


def predict(
    served: Scoring, outputs: torch.Tensor, references: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, predicted)`` of :class:`Computed` from the model's ``outputs``."""
    outputs = outputs.detach()
    if served.task == "classifier":
        scores = F.softmax(outputs, dim=1)
    elif references is not None:  # cosine to each reference, [B, K]
        scores = torch.einsum(
            "bd,bkd->bk", F.normalize(outputs, dim=1), F.normalize(references, dim=2)
        )
    elif served.prototypes is not None:
        scores = F.normalize(outputs, dim=1) @ F.normalize(served.prototypes, dim=1).T
    else:
        scores = outputs.new_zeros(outputs.shape[0], 0)
    if scores.shape[1] == 0:
        return scores, torch.full((outputs.shape[0],), -1, dtype=torch.long)
    return scores, scores.argmax(dim=1)
