"""Summarise per-image metric values: means, 95 % bootstrap intervals, paired tests vs FAM.

The runner keeps every metric as a per-image tensor, ``per_image[method][metric] -> [N]``
(one value per explained image, ``nan`` where the metric has no value for an image). Any
setting that produces values in this form, whatever its metrics are called, is summarised
the same way by :func:`summarise`:

- each method's mean and percentile-bootstrap interval per metric
  (:func:`fam_core.metrics.statistics.bootstrap_interval`);
- the reference method (FAM) against every other method on the same images: the paired
  bootstrap of the mean difference, its p-value, and the p-value Holm-adjusted over the
  methods compared on that metric (:func:`fam_core.metrics.statistics.paired_bootstrap_test`,
  :func:`~fam_core.metrics.statistics.holm`).

Every metric of a setting is resampled with the same seed, so methods of equal image count
are resampled on the same images.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fam_core.metrics.statistics import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    bootstrap_interval,
    holm,
    paired_bootstrap_test,
)

REFERENCE_METHOD = "fam"
SIGNIFICANCE = 0.05  # a difference is significant when its Holm-adjusted p is below this

PerImage = dict[str, dict[str, torch.Tensor]]  # method -> metric -> [N]


def summarise(
    per_image: PerImage,
    *,
    reference: str = REFERENCE_METHOD,
    seed: int = 0,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, dict[str, Any]]]]:
    """``(intervals, comparisons)`` of one setting's per-image values.

    ``intervals[method][metric]`` holds ``mean``, ``low``, ``high`` and ``images`` (values that
    are not NaN); ``comparisons[method][metric]`` (every method but ``reference``, on the
    metrics both have for the same number of images) holds the mean ``difference`` method -
    reference, its ``low``/``high``, ``p_value``, ``p_holm`` and ``significant``
    (``p_holm < SIGNIFICANCE``).

    Example:
        >>> per_image = {"fam": {"hit": torch.tensor([1.0, 1.0, 0.0, 1.0])},
        ...              "other": {"hit": torch.tensor([1.0, 1.0, 0.0, 1.0])}}
        >>> intervals, comparisons = summarise(per_image)
        >>> intervals["fam"]["hit"]["mean"], comparisons["other"]["hit"]["p_value"]
        (0.75, 1.0)
    """
    if not isinstance(per_image, dict):
        raise TypeError(
            f"per_image must be a dict method -> metric -> tensor [N], got {per_image!r}"
        )
    intervals: dict[str, dict[str, dict[str, float]]] = {m: {} for m in per_image}
    comparisons: dict[str, dict[str, dict[str, Any]]] = {}
    metrics = list(dict.fromkeys(k for values in per_image.values() for k in values))
    for metric in metrics:
        methods = [m for m in per_image if metric in per_image[m]]
        by_length: dict[int, list[str]] = {}
        for method in methods:
            values = _vector(per_image[method][metric], f"{method}/{metric}")
            by_length.setdefault(len(values), []).append(method)
        for group in by_length.values():
            stacked = torch.stack([_vector(per_image[m][metric], m) for m in group]).double()
            mean, low, high = bootstrap_interval(
                stacked, level=level, resamples=resamples, seed=seed
            )
            counts = (~stacked.isnan()).sum(dim=-1)
            for i, method in enumerate(group):
                intervals[method][metric] = {
                    "mean": _number(mean[i]),
                    "low": _number(low[i]),
                    "high": _number(high[i]),
                    "images": int(counts[i]),
                }
            others = [m for m in group if m != reference]
            if reference not in group or not others:
                continue
            base = stacked[group.index(reference)]
            compared = torch.stack([stacked[group.index(m)] for m in others])
            test = paired_bootstrap_test(
                compared, base.expand_as(compared), level=level, resamples=resamples, seed=seed
            )
            adjusted = holm(test.p_value)
            for i, method in enumerate(others):
                p_holm = _number(adjusted[i])
                comparisons.setdefault(method, {})[metric] = {
                    "difference": _number(test.difference[i]),
                    "low": _number(test.low[i]),
                    "high": _number(test.high[i]),
                    "p_value": _number(test.p_value[i]),
                    "p_holm": p_holm,
                    "significant": p_holm < SIGNIFICANCE,
                }
    return intervals, comparisons


def _vector(values: object, name: str) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise TypeError(f"per-image values {name} must be a tensor [N], got {values!r}")
    return values.detach().float().cpu()


def _number(value: torch.Tensor) -> float:
    number = float(value)
    return number if math.isnan(number) else round(number, 6)
