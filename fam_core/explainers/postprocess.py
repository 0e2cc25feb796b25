"""Map post-processing: raw maps at the layer's resolution to the heatmaps an explanation holds.

:func:`upsample` takes raw maps ``[B, h, w]`` to the input's size (bilinear) and min-max
normalises each (:func:`min_max`, eq. 12); :func:`build_explanation` packs them, detached,
into an :class:`~fam_core.explanation.Explanation`.

Example:
    >>> upsample(torch.tensor([[[0.0, 1.0], [2.0, 3.0]]]), (4, 4)).aminmax()
    torch.return_types.aminmax(
    min=tensor(0.),
    max=tensor(1.))
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fam_core.explanation import Explanation


class _Named(Protocol):
    method: str
    target_layer: str | nn.Module | None


def min_max(values: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """Min-max normalise along ``dim`` (eq. 12); a constant slice becomes zeros.

    A slice whose span is within float rounding of its magnitude (``1e-5`` relative) is
    constant: stretching rounding noise to ``[0, 1]`` would draw a map that means nothing.

    Example:
        >>> min_max(torch.tensor([[2.0, 4.0], [1.0, 1.0 + 1e-7]]), dim=1)
        tensor([[0., 1.],
                [0., 0.]])
    """
    low = values.amin(dim=dim, keepdim=True)
    high = values.amax(dim=dim, keepdim=True)
    span = high - low
    magnitude = torch.maximum(low.abs(), high.abs())
    # the scale is computed on the small reduced tensor: one subtraction and one
    # multiplication over the full maps (this runs on every explanation, and in every
    # exported graph: one comparison, no zeros tensor, keeps the ONNX head small). A zero
    # span fails the comparison too (then the magnitude is zero or the span is below it).
    scale = torch.where(span > 1e-5 * magnitude, span.clamp_min(1e-12).reciprocal(), 0.0)
    return (values - low).mul_(scale)


def upsample(raw: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling to the input size, then min-max normalisation per map."""
    raw = raw.detach()
    if raw.shape[-2:] == (1, 1):  # no spatial information: a constant map, not rounding noise
        return raw.new_zeros(raw.shape[0], *tuple(size), dtype=torch.float32)
    maps = F.interpolate(
        raw.float().unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False
    )
    return min_max(maps[:, 0], dim=(1, 2))  # [:, 0], not squeeze(1): no If in exported graphs


def build_explanation(
    explainer: _Named,
    images: torch.Tensor,
    raw: torch.Tensor,
    weights: torch.Tensor,
    scores: torch.Tensor,
    extras: dict[str, torch.Tensor | str],
) -> Explanation:
    """The :class:`Explanation` of ``raw`` ``[B, h, w]`` maps: upsampled to the input's size
    and min-max normalised (:func:`upsample`), every tensor detached; ``explainer`` gives
    the method's name and target layer."""
    extras = {
        name: value.detach() if isinstance(value, torch.Tensor) else value
        for name, value in extras.items()
    }
    return Explanation(
        maps=upsample(raw, images.shape[-2:]),
        raw=raw.detach(),
        weights=weights.detach(),
        scores=scores.detach(),
        method=explainer.method,
        target_layer=explainer.target_layer,
        extras=extras,
    )
