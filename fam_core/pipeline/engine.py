"""Run and explain: one forward pass yields the prediction and the explanation.

For a :class:`~fam_core.explainers.base.ChannelExplainer` the template's steps
(:meth:`~fam_core.explainers.base.Explainer.forward`, then
:meth:`~fam_core.explainers.base.ChannelExplainer.explain_forward`) run here with the target
chosen from the same forward pass (the predicted class, the nearest prototype), so a heatmap
costs one forward pass plus the method's own work. Other explainers (and channel explainers
that override ``__call__``) run as a whole after a separate prediction pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard

import torch
import torch.nn.functional as F

from fam_core.explainers.base import ChannelExplainer, Explainer
from fam_core.explanation import Explanation
from fam_core.pipeline.errors import InvalidArgument
from fam_core.pipeline.models import ServedModel


@dataclass(frozen=True)
class Job:
    """The model-facing part of one request.

    Attributes:
        inputs: ``[b, 3, S, S]`` normalised model inputs.
        method: the explainer's name.
        heatmap: ``False`` predicts only.
        target_class: classifiers: the class to explain (``None``: the predicted one).
        references: embedding models: ``[K, D]`` reference embeddings (``None``: prototypes).
    """

    inputs: torch.Tensor
    method: str
    heatmap: bool = True
    target_class: int | None = None
    references: torch.Tensor | None = None

    def batch_key(self) -> tuple[str, bool, int]:
        """Jobs with equal keys can run in one pass."""
        references = -1 if self.references is None else int(self.references.shape[0])
        return (self.method if self.heatmap else "", self.heatmap, references)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


@dataclass(frozen=True)
class Computed:
    """Model outputs and explanation of one job (tensors on the model's device).

    ``scores``: ``[b, C]`` softmax probabilities (classifiers) or ``[b, K]`` cosine similarity
    to the prototypes or references (embedding models; ``[b, 0]`` when there are none);
    ``predicted``: ``[b]`` argmax of ``scores`` (``-1`` with no scores); ``raw``: ``[b, h, w]``
    map at the target layer; ``maps``: ``[b, S, S]`` when the method made them itself.
    """

    outputs: torch.Tensor
    scores: torch.Tensor
    predicted: torch.Tensor
    explained: torch.Tensor | None = None
    raw: torch.Tensor | None = None
    maps: torch.Tensor | None = None
    method: str = ""
    target_layer: str = ""

    @classmethod
    def explained_by(
        cls,
        outputs: torch.Tensor,
        scores: torch.Tensor,
        predicted: torch.Tensor,
        explanation: Explanation,
    ) -> Computed:
        """A prediction with the explanation of the same images."""
        return cls(
            outputs=outputs,
            scores=scores,
            predicted=predicted,
            explained=explanation.scores,
            raw=explanation.raw,
            maps=explanation.maps,
            method=explanation.method,
            target_layer=explanation.target_layer,
        )


def run_jobs(served: ServedModel, jobs: list[Job]) -> list[Computed]:
    """Run jobs sharing one :meth:`Job.batch_key` as one batch; one :class:`Computed` each."""
    if not jobs:
        return []
    keys = {job.batch_key() for job in jobs}
    if len(keys) != 1:
        raise ValueError(f"run_jobs needs jobs with one batch key, got {sorted(keys)}")
    inputs = torch.cat([job.inputs for job in jobs])
    references = None
    if jobs[0].references is not None:
        references = torch.cat(
            [job.references.unsqueeze(0).expand(len(job), -1, -1) for job in jobs]  # type: ignore[union-attr]
        )
    classes = [c for job in jobs for c in [job.target_class] * len(job)]
    computed = _run(served, inputs, jobs[0], classes, references)
    return _split(computed, [len(job) for job in jobs])


def predict(
    served: ServedModel, outputs: torch.Tensor, references: torch.Tensor | None
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


def _target(
    served: ServedModel,
    predicted: torch.Tensor,
    classes: list[int | None],
    references: torch.Tensor | None,
) -> torch.Tensor | list[int] | None:
    if served.task == "classifier":
        return [
            int(p) if c is None else c for c, p in zip(classes, predicted.tolist(), strict=True)
        ]
    if references is not None:
        return references
    if served.prototypes is not None:
        return served.prototypes[predicted].unsqueeze(1)  # the nearest prototype, [B, 1, D]
    return None  # explains the embedding itself


def _run(
    served: ServedModel,
    inputs: torch.Tensor,
    job: Job,
    classes: list[int | None],
    references: torch.Tensor | None,
) -> Computed:
    if served.onnx is not None:  # an exported graph predicts and explains in one run
        return served.onnx.run(served, inputs, job, classes, references)
    assert served.model is not None
    if not job.heatmap:
        with torch.no_grad():
            outputs = served.model(inputs)
        scores, predicted = predict(served, outputs, references)
        return Computed(outputs=outputs, scores=scores, predicted=predicted)
    explainer = served.explainer(job.method)
    try:
        if _explains_in_one_pass(explainer):
            return _explain_in_one_pass(served, explainer, inputs, classes, references)
        with torch.no_grad():
            outputs = explainer.embed(inputs)
        scores, predicted = predict(served, outputs, references)
        explanation = explainer(inputs, _target(served, predicted, classes, references))
    except (ValueError, TypeError) as error:
        raise InvalidArgument(f"method {job.method!r} on model {served.name!r}: {error}") from None
    return Computed.explained_by(outputs, scores, predicted, explanation)


def _explains_in_one_pass(explainer: Explainer) -> TypeGuard[ChannelExplainer]:
    """Whether ``explainer(images, target)`` is ``explain_forward`` after its own forward."""
    return (
        isinstance(explainer, ChannelExplainer)
        and type(explainer).__call__ is ChannelExplainer.__call__
    )


def _explain_in_one_pass(
    served: ServedModel,
    explainer: ChannelExplainer,
    inputs: torch.Tensor,
    classes: list[int | None],
    references: torch.Tensor | None,
) -> Computed:
    """``ChannelExplainer.__call__`` with the target taken from the same forward pass."""
    forward = explainer.forward(inputs)
    scores, predicted = predict(served, forward.outputs, references)
    target = _target(served, predicted, classes, references)
    explanation = explainer.explain_forward(forward, target, inputs)
    return Computed.explained_by(forward.outputs.detach(), scores, predicted, explanation)


def _split(computed: Computed, sizes: list[int]) -> list[Computed]:
    parts: list[Computed] = []
    start = 0
    for size in sizes:
        window = slice(start, start + size)
        parts.append(
            Computed(
                outputs=computed.outputs[window],
                scores=computed.scores[window],
                predicted=computed.predicted[window],
                explained=None if computed.explained is None else computed.explained[window],
                raw=None if computed.raw is None else computed.raw[window],
                maps=None if computed.maps is None else computed.maps[window],
                method=computed.method,
                target_layer=computed.target_layer,
            )
        )
        start += size
    return parts
