"""The head: the layers between an explainer's target layer and the model's outputs.

An explainer's ``head`` option (:data:`HeadSpec`) is ``"auto"`` (found from the dataflow,
:mod:`fam_core.anatomy.head_fit`), a module or a ``[J, N]`` matrix that gives it, or ``None`` (the
output is the pooled layer). :func:`fit_layer_head` finds an ``"auto"`` head from one
forward pass; :func:`jacobian_product` maps output weights through a head that is not
linear (FAM eq. 18 with the local Jacobian).

Example:
    >>> from torch import nn
    >>> head = head_from_spec(nn.Linear(4, 2, bias=False), nn.Identity(), "layer", "avg")
    >>> head.matrix.shape, is_auto("auto"), is_auto(None)
    (torch.Size([2, 4]), True, False)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from fam_core.anatomy.adapters import Head, find_head, head_from_module
from fam_core.anatomy.head_fit import fit_head
from fam_core.anatomy.pooling import PoolingKind

HeadSpec = nn.Module | torch.Tensor | Literal["auto"] | None
"""An explainer's ``head`` option (see the module docstring)."""


def is_auto(spec: object) -> bool:
    """Whether ``spec`` asks for the head found from the model's dataflow."""
    return isinstance(spec, str) and spec == "auto"


def head_from_spec(
    spec: HeadSpec, model: nn.Module, target_layer: str, pooling: PoolingKind
) -> Head:
    """The head ``spec`` gives (``"auto"``: the modules registered after ``target_layer``)."""
    if isinstance(spec, str):
        if spec != "auto":
            raise ValueError(f"head must be 'auto', None, a module or a matrix, got {spec!r}")
        return find_head(model, target_layer, pooling)
    if spec is None:
        return head_from_module(nn.Identity(), pooling)
    return head_from_module(spec, pooling)


def fit_layer_head(
    model: nn.Module,
    target_layer: str,
    pooling: PoolingKind,
    activations: torch.Tensor,
    outputs: torch.Tensor,
    run_with: Callable[[torch.Tensor], torch.Tensor],
) -> Head:
    """The head after ``target_layer`` for maps like ``activations`` ``[B, N, h, w]`` with
    ``outputs`` ``[B, D]`` (:func:`fam_core.anatomy.head_fit.fit_head`); ``run_with(maps)`` gives the
    outputs with the layer's maps replaced."""
    try:  # a head registered after the layer: kept only if it reproduces the output
        module_head = find_head(model, target_layer, pooling)
    except (ValueError, TypeError, RuntimeError):
        module_head = None

    def run_graph(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = maps.detach().requires_grad_(True)
        with torch.enable_grad():
            return leaf, run_with(leaf)

    return fit_head(
        activations,
        outputs,
        module_head=module_head,
        pooling=pooling,
        run=run_with,
        run_graph=run_graph,
    )


def jacobian_product(
    outputs: torch.Tensor, activations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``sum_ij d(weights . outputs)/d activations[:, n, i, j]`` ``[B, N]``: ``weights``
    ``[B, J]`` mapped through the head's Jacobian at each sample (``activations`` must be
    the leaf of a graph that reaches ``outputs``; the graph is kept)."""
    with torch.enable_grad():
        (grads,) = torch.autograd.grad(
            outputs, activations, weights.detach().to(outputs), retain_graph=True
        )
    return grads.sum(dim=(2, 3)).to(weights.dtype)
