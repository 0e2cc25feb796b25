"""The feature ablation check of Oramas et al. (sec. 4.1).

Relevant features are removed by setting their filter's response to zero (a temporary
forward hook per call) where removing the filter takes effect: after the normalisation and
activation that follow the layer (:mod:`~fam_core.explainers.relevant.removal`; the paper's
VGG has none, and zeroing a convolution channel before BatchNorm leaves BN's shift in
place). The accuracy drop is reported next to the drop caused by removing as many features
chosen at random among all candidate features (mean over ``repeats`` draws).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fam_core.explainers.hooks import layer_responses
from fam_core.explainers.relevant.relevant import RelevantFeatures
from fam_core.explainers.relevant.removal import removal_points


@dataclass(frozen=True)
class AblationReport:
    """Accuracies (fractions) with and without the ablated features."""

    num_features: int
    baseline_accuracy: float
    selected_accuracy: float
    random_accuracy: float  # mean over the random draws

    @property
    def selected_drop(self) -> float:
        return self.baseline_accuracy - self.selected_accuracy

    @property
    def random_drop(self) -> float:
        return self.baseline_accuracy - self.random_accuracy


def ablated_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    ablate: dict[nn.Module, list[int]],
    batch_size: int = 64,
    fill: dict[nn.Module, torch.Tensor] | None = None,
) -> float:
    """Top-1 accuracy of ``model`` with the given output channels of each module replaced.

    A channel is set to zero, or to ``fill[module][channel]`` when ``fill`` is given.
    """
    handles = []
    fill = fill or {}

    def make_hook(module: nn.Module, channels: list[int]):  # noqa: ANN202
        def hook(_m: nn.Module, _i: object, output: torch.Tensor) -> torch.Tensor:
            keep = torch.ones(output.shape[1], dtype=output.dtype, device=output.device)
            keep[channels] = 0
            shape = (1, -1, *([1] * (output.dim() - 2)))
            replaced = output * keep.view(shape)
            if module in fill:
                replaced = replaced + ((1 - keep) * fill[module].to(output)).view(shape)
            return replaced

        return hook

    correct = 0
    try:
        for module, channels in ablate.items():
            if channels:
                handles.append(module.register_forward_hook(make_hook(module, channels)))
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                logits = model(images[start : start + batch_size])
                hits = logits.argmax(dim=1).cpu() == labels[start : start + batch_size].cpu()
                correct += int(hits.sum())
    finally:
        for handle in handles:
            handle.remove()
    return correct / images.shape[0]


def channel_means(
    explainer: RelevantFeatures,
    images: torch.Tensor,
    batch_size: int = 64,
    points: list[str] | None = None,
) -> dict[nn.Module, torch.Tensor]:
    """Mean of every feature channel over ``images`` (and positions), per feature layer, at
    the modules named by ``points`` (default the feature layers), keyed by those modules."""
    points = points or explainer.layer_names
    sums: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            responses, _ = layer_responses(
                explainer.model, images[start : start + batch_size], points
            )
            means = [r.reshape(r.shape[0], r.shape[1], -1).mean(2).sum(0) for r in responses]
            sums = means if not sums else [a + b for a, b in zip(sums, means, strict=True)]
    modules = dict(explainer.model.named_modules())
    return {
        modules[name]: total / images.shape[0] for name, total in zip(points, sums, strict=True)
    }


def ablation_check(
    explainer: RelevantFeatures,
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    *,
    features: Sequence[tuple[str, int]] | None = None,
    repeats: int = 5,
    seed: int = 0,
    batch_size: int = 64,
    mode: str = "zero",
    per_class: bool = False,
) -> AblationReport:
    """Sec. 4.1: accuracy drop from removing ``features`` vs as many random features.

    A feature is removed after the normalisation and activation that follow its layer
    (:func:`~fam_core.explainers.relevant.removal.removal_points`).

    Args:
        explainer: a fitted :class:`RelevantFeatures` on a classifier.
        images: ``[N, 3, H, W]`` model inputs; ``labels``: ``[N]`` class indices.
        features: ``(layer, channel)`` pairs; default every relevant feature of any class.
        repeats: random draws averaged for the random baseline.
        per_class: ablate, for the images of each class ``j``, only the relevant features of
            ``j`` (non-zero ``w_j``; ``features`` must then be None); the random baseline
            draws as many features per class. Sharper on small networks, where the union
            over all classes is a large share of every channel.
        mode: ``"zero"`` sets a removed channel to zero (sec. 4.1); ``"mean"`` sets it to its
            mean over ``images`` (a channel that is never silent keeps its average).

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> net = conv4(width=0.25, num_classes=2).eval()
        >>> rf = RelevantFeatures(net).fit(torch.rand(4, 3, 32, 32), [0, 1, 0, 1], mu=1)
        >>> ablation_check(rf, torch.rand(4, 3, 32, 32), [0, 1, 0, 1]).num_features > 0
        True
    """
    if not explainer.classifier:
        raise ValueError("the ablation check measures accuracy: it needs a classifier model")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    images = explainer._check_images(images)
    labels = torch.as_tensor(labels)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be [N] = [{images.shape[0]}], got {tuple(labels.shape)}")
    if per_class:
        if features is not None:
            raise ValueError("per_class=True takes each class's own features: pass features=None")
        return _per_class_check(explainer, images, labels, repeats, seed, batch_size, mode)
    if features is None:
        features = [(layer, channel) for layer, channel, _ in explainer.relevant_features()]
    pool = explainer.feature_index
    unknown = [feature for feature in features if tuple(feature) not in set(pool)]
    if unknown:
        raise ValueError(f"features {unknown[:3]} are not (layer, channel) pairs of the explainer")
    if not features:
        raise ValueError("no features to ablate: the relevance matrix has no non-zero entry")
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
    points = removal_points(explainer.model, explainer.layer_names, images[:1])
    named = dict(explainer.model.named_modules())
    modules = {
        layer: named[point] for layer, point in zip(explainer.layer_names, points, strict=True)
    }
    fill = channel_means(explainer, images, batch_size, points) if mode == "mean" else None

    def accuracy(chosen: Sequence[tuple[str, int]]) -> float:
        ablate: dict[nn.Module, list[int]] = {}
        for layer, channel in chosen:
            ablate.setdefault(modules[layer], []).append(channel)
        return ablated_accuracy(explainer.model, images, labels, ablate, batch_size, fill)

    generator = torch.Generator().manual_seed(seed)
    random_accuracies = [
        accuracy([pool[i] for i in torch.randperm(len(pool), generator=generator)[: len(features)]])
        for _ in range(repeats)
    ]
    return AblationReport(
        num_features=len(features),
        baseline_accuracy=accuracy([]),
        selected_accuracy=accuracy(features),
        random_accuracy=sum(random_accuracies) / repeats,
    )


def _per_class_check(
    explainer: RelevantFeatures,
    images: torch.Tensor,
    labels: torch.Tensor,
    repeats: int,
    seed: int,
    batch_size: int,
    mode: str,
) -> AblationReport:
    counts = {"baseline": 0.0, "selected": 0.0, "random": 0.0}
    total_features = 0
    for j in labels.unique().tolist():
        rows = labels == j
        chosen = [(layer, ch) for layer, ch, _ in explainer.relevant_features(int(j))]
        if not chosen:
            raise ValueError(f"class {j} has no relevant feature: raise mu or refit")
        report = ablation_check(
            explainer, images[rows.to(images.device)], labels[rows], features=chosen,
            repeats=repeats, seed=seed + int(j), batch_size=batch_size, mode=mode,
        )  # fmt: skip
        weight = int(rows.sum())
        counts["baseline"] += report.baseline_accuracy * weight
        counts["selected"] += report.selected_accuracy * weight
        counts["random"] += report.random_accuracy * weight
        total_features += len(chosen)
    n = labels.shape[0]
    return AblationReport(
        num_features=total_features,
        baseline_accuracy=counts["baseline"] / n,
        selected_accuracy=counts["selected"] / n,
        random_accuracy=counts["random"] / n,
    )
