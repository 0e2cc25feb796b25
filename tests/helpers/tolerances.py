"""Comparisons across backends that hold on any CPU (float results differ in the last bits)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def assert_top_classes(
    chosen: torch.Tensor | Sequence[int], logits: torch.Tensor, tolerance: float = 1e-4
) -> None:
    """Each chosen class is a top class of its row of ``logits``, up to ``tolerance``.

    Another backend may break a near-tie the other way, so an exact argmax comparison is not
    portable; a chosen class whose logit is clearly below the maximum still fails.
    """
    chosen = torch.as_tensor(chosen, dtype=torch.long, device=logits.device).view(-1, 1)
    logits = logits.detach().float()
    gap = logits.amax(dim=1) - logits.gather(1, chosen).squeeze(1)
    scale = logits.abs().amax(dim=1).clamp_min(1.0)
    assert bool((gap <= tolerance * scale).all()), f"chosen {chosen.view(-1).tolist()}, gap {gap}"
