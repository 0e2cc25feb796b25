"""Global pooling functions p of eq. 11 (FAM paper): average, max, log-sum-exp and GeM."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

PoolingKind = Literal["avg", "max", "lse", "gem"]
POOLING_KINDS: tuple[str, ...] = ("avg", "max", "lse", "gem")


def global_pool(
    features: torch.Tensor, kind: PoolingKind = "avg", *, r: float = 1.0, p: float = 3.0
) -> torch.Tensor:
    """Pool a feature map ``[B, C, h, w]`` into a vector ``[B, C]``.

    - ``avg``: ``z_n = mean(A^n)``
    - ``max``: ``z_n = max(A^n)``
    - ``lse``: ``z_n = (1/r) log(mean(exp(r A^n)))`` (log-sum-exp pooling, sharpness ``r``)
    - ``gem``: ``z_n = mean(max(A^n, eps)^p)^(1/p)`` (generalised mean, exponent ``p``)

    Example:
        >>> global_pool(torch.ones(1, 2, 3, 3), "gem").shape
        torch.Size([1, 2])
    """
    if features.dim() != 4:
        raise ValueError(
            f"global_pool expects a [B, C, h, w] feature map, got shape {tuple(features.shape)}"
        )
    flat = features.flatten(2)
    if kind == "avg":
        return flat.mean(dim=2)
    if kind == "max":
        return flat.amax(dim=2)
    if kind == "lse":
        return (torch.logsumexp(r * flat, dim=2) - math.log(flat.shape[2])) / r
    if kind == "gem":
        return flat.clamp_min(1e-6).pow(p).mean(dim=2).pow(1.0 / p)
    raise ValueError(f"unknown pooling {kind!r}; expected one of {POOLING_KINDS}")


class GlobalPool(nn.Module):
    """Module form of :func:`global_pool`; outputs ``[B, C]``.

    Example:
        >>> GlobalPool("max")(torch.arange(4.0).view(1, 1, 2, 2))
        tensor([[3.]])
    """

    def __init__(self, kind: PoolingKind = "avg", *, r: float = 1.0, p: float = 3.0) -> None:
        super().__init__()
        if kind not in POOLING_KINDS:
            raise ValueError(f"unknown pooling {kind!r}; expected one of {POOLING_KINDS}")
        self.kind = kind
        self.r = r
        self.p = p

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return global_pool(features, self.kind, r=self.r, p=self.p)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def global_pooling_kind(pooling: nn.Module) -> str | None:
    """The kind of ``pooling`` if it is a global pooling to ``[B, C]`` (or ``[B, C, 1, 1]``):
    ``"avg"``/``"max"`` for ``nn.AdaptiveAvgPool2d(1)``/``nn.AdaptiveMaxPool2d(1)``, the
    kind of a :class:`GlobalPool`; ``None`` for anything else (windows, other modules).

    Example:
        >>> global_pooling_kind(nn.AdaptiveAvgPool2d(1)), global_pooling_kind(GlobalPool("gem"))
        ('avg', 'gem')
        >>> global_pooling_kind(nn.AdaptiveMaxPool2d(2)) is None
        True
    """
    if isinstance(pooling, GlobalPool):
        return pooling.kind
    adaptive = isinstance(pooling, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d)
    if adaptive and pooling.output_size in (1, (1, 1)):
        return "avg" if isinstance(pooling, nn.AdaptiveAvgPool2d) else "max"
    return None
