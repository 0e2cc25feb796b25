"""Feature-relevance metrics of Oramas et al. (2019): are the selected features relevant?

- :func:`ablation_accuracy_drop` -- sec. 4.1: the accuracy drop when the relevant features
  are removed (their layer/filter output set to zero), next to the drop when as many features
  chosen at random are removed. Relevant features should cause the larger drop.
- :func:`class_reconstruction_auc` / :func:`reconstruction_auc_over_mu` -- supplementary
  sec. 8 (Fig. 9): how well the relevant features "reconstruct" each class. The class score
  of image ``i`` for class ``j`` is ``x_i w_j`` (descriptor times the sparse relevance vector
  of eq. 1); the metric is the one-vs-rest area under the ROC curve of these scores, averaged
  over the classes (mean-AUC), for each sparsity budget ``mu``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fam_core.explainers.relevant.mu_lasso import solve_mu_lasso
from fam_core.explainers.relevant.relevant import RelevantFeatures
from fam_core.explainers.relevant.relevant_ablation import ablation_check

RECONSTRUCTION_MUS = (0.5, 2.0, 10.0)
"""Default ``mu`` values of the reconstruction curve (the paper's Fig. 9 sweeps ``mu``)."""


def roc_auc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a positive outscores a negative,
    ties counting one half (Mann-Whitney U / (P N)).

    Example:
        >>> roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.75
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError("scores must be a tensor [N]")
    positives = torch.as_tensor(positives, device=scores.device).bool()
    if positives.shape != scores.shape:
        raise ValueError(
            f"positives must be [N] = [{scores.numel()}], got {tuple(positives.shape)}"
        )
    pos, neg = scores[positives], scores[~positives]
    if not len(pos) or not len(neg):
        raise ValueError("the ROC AUC needs at least one positive and one negative")
    diff = pos.unsqueeze(1) - neg.unsqueeze(0)  # [P, N]
    wins = (diff > 0).float() + 0.5 * (diff == 0).float()
    return float(wins.mean())


def class_reconstruction_auc(
    descriptors: torch.Tensor, labels: torch.Tensor, relevance: torch.Tensor
) -> float:
    """Mean over classes of the ROC AUC of ``x_i w_j`` for "image ``i`` is of class ``j``".

    ``descriptors`` ``[N, m]``, ``labels`` ``[N]`` class indices, ``relevance`` ``W``
    ``[m, C]``. Classes without a positive or a negative among ``labels`` are left out.

    Example:
        >>> x = torch.eye(3); labels = torch.tensor([0, 1, 2])
        >>> class_reconstruction_auc(x, labels, torch.eye(3))
        1.0
    """
    if descriptors.dim() != 2 or relevance.dim() != 2 or descriptors.shape[1] != relevance.shape[0]:
        raise ValueError(
            f"expected descriptors [N, m] and relevance [m, C], got "
            f"{tuple(descriptors.shape)} and {tuple(relevance.shape)}"
        )
    labels = torch.as_tensor(labels, device=descriptors.device)
    if labels.shape != (descriptors.shape[0],):
        raise ValueError(f"labels must be [N] = [{descriptors.shape[0]}]")
    scores = descriptors @ relevance.to(descriptors)  # [N, C]
    aucs = [
        roc_auc(scores[:, j], labels == j)
        for j in range(relevance.shape[1])
        if 0 < int((labels == j).sum()) < len(labels)
    ]
    if not aucs:
        raise ValueError("no class has both positives and negatives among labels")
    return sum(aucs) / len(aucs)


@torch.no_grad()
def reconstruction_auc_over_mu(
    explainer: RelevantFeatures,
    fit_images: torch.Tensor,
    fit_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    mus: Sequence[float] = RECONSTRUCTION_MUS,
    *,
    num_classes: int | None = None,
    iterations: int = 2000,
) -> dict[float, float]:
    """``{mu: mean-AUC}``: eq. 1 solved on ``fit_images`` for each ``mu``, scored on
    ``test_images`` (supplementary sec. 8, Fig. 9). Images are model inputs.

    The explainer only provides the descriptors; its own fitted relevance is not changed.
    """
    fit_labels = torch.as_tensor(fit_labels)
    classes = int(num_classes or int(fit_labels.max()) + 1)
    x_fit = explainer.descriptors(fit_images)
    x_test = explainer.descriptors(test_images)
    targets = F.one_hot(fit_labels.to(x_fit.device).long(), classes).to(x_fit)  # l_i of eq. 1
    curve = {}
    for mu in mus:
        if not mu > 0:
            raise ValueError(f"every mu must be positive, got {mu!r}")
        relevance = solve_mu_lasso(x_fit, targets, float(mu), iterations=iterations)
        curve[float(mu)] = class_reconstruction_auc(x_test, torch.as_tensor(test_labels), relevance)
    return curve


def ablation_accuracy_drop(
    explainer: RelevantFeatures,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    repeats: int = 5,
    seed: int = 0,
    per_class: bool = False,
) -> dict[str, float]:
    """Sec. 4.1 on a fitted classifier explainer: accuracy (fractions) of the model, with
    the relevant features zeroed, and with as many random features zeroed (mean of
    ``repeats`` draws); ``relevant_drop`` / ``random_drop`` are the differences.

    ``per_class=False`` zeroes every feature relevant to any class, as the paper;
    ``per_class=True`` zeroes, for the images of class ``j``, only the features of ``w_j``
    (on a small network with many classes the union covers most channels, and then any
    random choice of as many channels destroys the accuracy as well).

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> net = conv4(width=0.25, num_classes=2).eval()
        >>> rf = RelevantFeatures(net).fit(torch.rand(4, 3, 32, 32), [0, 1, 0, 1], mu=1)
        >>> sorted(ablation_accuracy_drop(rf, torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])))
        ['accuracy', 'features', 'random_accuracy', 'random_drop', 'relevant_accuracy', 'relevant_drop']
    """
    report = ablation_check(
        explainer, images, labels, repeats=repeats, seed=seed, per_class=per_class
    )
    return {
        "features": float(report.num_features),
        "accuracy": report.baseline_accuracy,
        "relevant_accuracy": report.selected_accuracy,
        "random_accuracy": report.random_accuracy,
        "relevant_drop": report.selected_drop,
        "random_drop": report.random_drop,
    }
