"""Timing helpers: interleaved repeats, medians, ratios against a baseline in one process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def time_once(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def ratio(
    candidate: Callable[[], object],
    baseline: Callable[[], object],
    *,
    repeats: int = 15,
    warmup: int = 3,
    rounds: list[float] | None = None,
) -> tuple[float, float, float]:
    """Median of per-round ``candidate / baseline`` time ratios, with both medians in seconds.

    Rounds alternate the two functions so that machine noise hits both alike; ``rounds``,
    where given, receives every round's ratio (for the spread).
    """
    for _ in range(warmup):
        candidate()
        baseline()
    ratios, candidate_times, baseline_times = [], [], []
    for i in range(repeats):
        if i % 2:
            c, b = time_once(candidate), time_once(baseline)
        else:
            b, c = time_once(baseline), time_once(candidate)
        ratios.append(c / b)
        candidate_times.append(c)
        baseline_times.append(b)
    if rounds is not None:
        rounds.extend(ratios)
    return (
        statistics.median(ratios),
        statistics.median(candidate_times),
        statistics.median(baseline_times),
    )


def explain_over_forward(
    model: nn.Module, explainer: Callable[..., object], batch: int, repeats: int
) -> tuple[float, float, float]:
    """:func:`ratio` of explaining ``batch`` random 224x224 images against five references
    over the plain forward pass (fewer repeats from batch 8)."""
    images = torch.rand(batch, 3, 224, 224)
    references = explainer.embed(torch.rand(5, 3, 224, 224))  # type: ignore[attr-defined]

    def forward() -> None:
        with torch.no_grad():
            model(images)

    def explain() -> None:
        explainer(images, target=references)

    return ratio(explain, forward, repeats=repeats if batch < 8 else max(5, repeats // 3))
