"""Confidence intervals and paired tests over per-image metric values (percentile bootstrap).

Every evaluation metric is a mean over explained images. :func:`bootstrap_interval` gives its
95 % percentile-bootstrap interval: draw ``resamples`` sets of ``N`` images with replacement,
take each set's mean, and read the 2.5 % and 97.5 % quantiles of those means (Efron &
Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13).

:func:`paired_bootstrap_test` compares two methods on the SAME images: it bootstraps the mean
of the per-image differences ``d_i = a_i - b_i`` (one resample draws whole pairs), reports the
interval of the mean difference, and the two-sided p-value

    p = min(1, 2 * (min(#{d* <= 0}, #{d* >= 0}) + 1) / (R + 1))

read off the same resampled means (Davison & Hinkley 1997, sec. 4.4; the ``+1`` keeps a
Monte Carlo p-value valid, so the smallest reportable p is ``2 / (R + 1)``). The p-value and
the interval agree: ``p < 1 - level`` exactly when the interval leaves 0 out (up to the
``+1``). We test the mean difference rather than the median (Wilcoxon signed-rank) because
the table reports means, and pointing-game hits are 0/1 values whose many ties and zero
differences the signed-rank test handles poorly.

:func:`holm` adjusts the p-values of several comparisons (FAM against each other method) for
multiplicity (Holm 1979). NaN values (e.g. Average Drop of an image whose score is <= 0) are
left out; pairs with either value NaN are left out of the paired test.

All functions are vectorised over leading dimensions (``[..., N]``, e.g. ``[metrics, N]``)
and seeded: the same seed draws the same resamples, so two calls on data of the same
length resample the same images.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


class Interval(NamedTuple):
    """The mean of the values and its bootstrap interval ``[low, high]`` (shape ``[...]``)."""

    mean: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor


class PairedTest(NamedTuple):
    """Mean difference ``a - b``, its bootstrap interval, and the two-sided p-value."""

    difference: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    p_value: torch.Tensor


def bootstrap_interval(
    values: torch.Tensor,
    *,
    level: float = DEFAULT_LEVEL,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Percentile-bootstrap interval of the mean of ``values`` ``[..., N]`` over its last dim.

    Example (two values: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so
    the 2.5 % and 97.5 % quantiles are the two values themselves):
        >>> interval = bootstrap_interval(torch.tensor([0.0, 1.0]))
        >>> [round(float(x), 3) for x in interval]
        [0.5, 0.0, 1.0]
    """
    values = _check_values(values, "values")
    level, resamples = _check_options(level, resamples)
    means = _resampled_means(values, resamples, seed)  # [..., R]
    low, high = _quantiles(means, level)
    return Interval(values.nanmean(dim=-1), low, high)


def paired_bootstrap_test(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    level: float = DEFAULT_LEVEL,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> PairedTest:
    """Paired bootstrap of the mean difference ``a - b`` over images (last dim) and its
    two-sided p-value (see the module docstring). Swapping ``a`` and ``b`` negates the
    difference and keeps the p-value.

    Example (every image is better under ``a`` by 0.1: every resample agrees, so the
    interval has zero width and p is the smallest reportable, 2 / (R + 1)):
        >>> test = paired_bootstrap_test(torch.tensor([0.5, 0.7, 0.9]),
        ...                              torch.tensor([0.4, 0.6, 0.8]), resamples=999)
        >>> [round(float(x), 3) for x in test]
        [0.1, 0.1, 0.1, 0.002]
    """
    a = _check_values(a, "a")
    b = _check_values(b, "b")
    if a.shape != b.shape:
        raise ValueError(
            f"a and b must hold the same images (same shape), got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    level, resamples = _check_options(level, resamples)
    differences = (a - b.to(a)).double()
    means = _resampled_means(differences, resamples, seed)  # [..., R]
    low, high = _quantiles(means, level)
    valid = ~means.isnan()
    below = ((means <= 0) & valid).sum(dim=-1)
    above = ((means >= 0) & valid).sum(dim=-1)
    drawn = valid.sum(dim=-1)
    p = (2 * (torch.minimum(below, above) + 1) / (drawn + 1)).clamp(max=1.0)
    p = torch.where(drawn > 0, p, torch.full_like(p, float("nan")))
    dtype = a.dtype
    return PairedTest(
        differences.nanmean(dim=-1).to(dtype), low.to(dtype), high.to(dtype), p.to(dtype)
    )


def holm(p_values: torch.Tensor) -> torch.Tensor:
    """Holm's step-down adjustment of the p-values ``[..., K]`` of ``K`` comparisons.

    The ``i``-th smallest p (from 0) becomes ``max_{j <= i} min(1, (K - j) p_(j))``; a
    comparison is significant at ``alpha`` when its adjusted p is below ``alpha``. NaN
    p-values are not counted among the comparisons and stay NaN.

    Example:
        >>> holm(torch.tensor([0.01, 0.04, 0.03]))
        tensor([0.0300, 0.0600, 0.0600])
    """
    p_values = _check_values(p_values, "p_values")
    valid = ~p_values.isnan()
    count = valid.sum(dim=-1, keepdim=True)
    order = torch.where(valid, p_values, torch.full_like(p_values, float("inf"))).argsort(dim=-1)
    ordered = p_values.gather(-1, order)
    rank = torch.arange(p_values.shape[-1], device=p_values.device)
    scaled = ((count - rank) * ordered).clamp(max=1.0)
    scaled = torch.where(ordered.isnan(), torch.zeros_like(scaled), scaled)
    adjusted = scaled.cummax(dim=-1).values
    adjusted = torch.where(ordered.isnan(), ordered, adjusted)
    return torch.empty_like(adjusted).scatter_(-1, order, adjusted)


def _resampled_means(values: torch.Tensor, resamples: int, seed: int) -> torch.Tensor:
    """``[..., R]`` means of ``R`` resamples (with replacement) of the last dim; NaN left out."""
    count = values.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(count, (resamples, count), generator=generator).to(values.device)
    drawn = values[..., index]  # [..., R, N]
    return drawn.nanmean(dim=-1)


def _quantiles(means: torch.Tensor, level: float) -> tuple[torch.Tensor, torch.Tensor]:
    alpha = (1 - level) / 2
    q = torch.tensor([alpha, 1 - alpha], dtype=means.dtype, device=means.device)
    bounds = means.nanquantile(q, dim=-1)  # [2, ...]
    return bounds[0], bounds[1]


def _check_values(values: object, name: str) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [..., N], got {type(values).__name__}")
    if not values.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {values.dtype}")
    if values.dim() == 0 or values.shape[-1] == 0:
        raise ValueError(
            f"{name} must hold at least one value along its last dim [..., N], got shape "
            f"{tuple(values.shape)}"
        )
    return values


def _check_options(level: object, resamples: object) -> tuple[float, int]:
    if isinstance(level, bool) or not isinstance(level, (int, float)):
        raise TypeError(f"level must be a float in (0, 1), got {type(level).__name__}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if isinstance(resamples, bool) or not isinstance(resamples, int):
        raise TypeError(f"resamples must be an int >= 1, got {type(resamples).__name__}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    return float(level), resamples
