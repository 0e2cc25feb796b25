"""Gradients written as plain operators, so Grad-FAM and Grad-CAM fit in an ONNX graph.

For a head ``z' = W p(A) + b`` with global pooling ``p`` and a linear map ``W`` ``[J, N]``,
the chain rule gives ``dS/dA[n, i, j] = dp_n/dA[n, i, j] * sum_j' W[j', n] dS/dz'_j'``.
Grad-CAM and Grad-FAM weight channel ``n`` by the spatial mean of that gradient. For average
pooling ``dp_n/dA[n, i, j] = 1 / (hw)``; for max pooling it is ``1`` at the maximum and ``0``
elsewhere. Either way its spatial sum is ``1``, so

    weight_n = (1 / hw) * (W^T dS/dz')_n                                   (analytic Grad-CAM)

``dS/dz'`` for ``S = mean_k s(z', r_k)`` (FAM eq. 11) is :func:`similarity_gradient`.
"""

from __future__ import annotations

from torch import nn

from fam_core.anatomy.pooling import global_pooling_kind
from fam_core.maths.similarity import similarity_gradient

__all__ = ["ANALYTIC_POOLING", "pooling_kind", "similarity_gradient"]

ANALYTIC_POOLING = ("avg", "max")


def pooling_kind(pooling: nn.Module, layer_name: str) -> str:
    """The kind of a global pooling layer whose gradient has spatial sum 1 (avg or max).

    Raises ``ValueError`` naming the layer for any other pooling (GeM, log-sum-exp, windows).
    """
    kind = global_pooling_kind(pooling)
    if kind not in ANALYTIC_POOLING:
        raise ValueError(
            f"the pooling after {layer_name!r} ({pooling!r}) has no analytic gradient here: "
            f"Grad-FAM / Grad-CAM export needs global {' or '.join(ANALYTIC_POOLING)} pooling"
        )
    return kind
