"""The head after the target layer, found from the model's dataflow (FAM eq. 16-18).

FAM maps contributions on the embedding back to the target layer's channels through the
head ``Z' = g(p(A))`` (Liao et al., section IV-D). :func:`fit_head` finds that head by
running the model with the target layer's maps replaced (``run``), not by reading the
order in which modules were registered:

1. *identity*: the embedding is the pooled layer itself (``p(A) == Z'``);
2. *a module head*, proposed by :func:`fam_core.adapters.find_head` (global pooling and
   affine layers registered after the layer), kept only if it reproduces the real output;
3. otherwise a probe with four substituted maps: the head is *linear* (global average
   pooling then an affine map ``W``, eq. 16-18 exactly) when it is invariant to a spatial
   permutation of the maps and affine (``g(A + B) - g(B) == g(A) - g(0)``). An affine map
   that ignores positions can only read the spatial sums, so it is ``W mean(A) + b``;
   ``W`` is the Jacobian, read off with one batched backward pass (``run_graph``). This
   recognises a functional ``mean``, ``AvgPool2d(kernel=h)``, ``flatten(2).mean(-1)`` and a
   token mean alike.
4. Anything else is a *jacobian* head: explainers use ``sum_ij dZ'/dA[:, :, i, j]``, the
   exact per-sample linearisation (equal to ``W`` for a linear head after average pooling).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from fam_core.adapters import Head
from fam_core.pooling import GlobalPool, PoolingKind, global_pool

_RTOL = 1e-4
_BATCH_ROWS = 256


def _close(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> bool:
    return bool(((a - b).abs().amax() <= _RTOL * scale.clamp_min(1e-6)).item())


def reproduces(predicted: torch.Tensor, outputs: torch.Tensor) -> bool:
    """Whether a head's prediction matches the model's real output (relative tolerance).

    While the explainer is traced for export (``make_fx``) the values are symbolic: the
    check ran on real values before the trace, so it holds.
    """
    if predicted.shape != outputs.shape:
        return False
    if get_proxy_mode() is not None:
        return True
    scale = outputs.detach().abs().amax()
    return bool(((predicted - outputs).abs().amax() <= 1e-3 * scale.clamp_min(1e-3)).item())


def fit_head(
    maps: torch.Tensor,
    outputs: torch.Tensor,
    *,
    module_head: Head | None,
    pooling: PoolingKind,
    run: Callable[[torch.Tensor], torch.Tensor],
    run_graph: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> Head:
    """Find the head from maps ``[B, N, h, w]`` and outputs ``[B, J]`` of one real pass.

    ``run(maps)`` returns the outputs with the layer's maps replaced (any batch size);
    ``run_graph(maps)`` returns ``(leaf, outputs)`` with an autograd graph from the leaf.
    """
    maps, outputs = maps.detach(), outputs.detach()
    pooled = global_pool(maps.float(), pooling).to(outputs.dtype)
    if reproduces(pooled, outputs):
        return Head(GlobalPool(pooling), nn.Sequential(), None, None, "identity")
    if module_head is not None and module_head.kind in ("identity", "linear"):
        with torch.no_grad():
            predicted = module_head.transform(module_head.pool(maps))
        if reproduces(predicted, outputs):
            return module_head
    first = maps[:1]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(first.shape, generator=generator).to(first) * first.std().clamp_min(1e-3)
    order = torch.randperm(first.shape[2] * first.shape[3], generator=generator)
    permuted = first.flatten(2)[:, :, order].reshape(first.shape)
    probes = torch.cat([first, permuted, noise, first + noise, torch.zeros_like(first)])
    with torch.no_grad():
        at = run(probes).float()
    scale = at.abs().amax()
    invariant = _close(at[1], at[0], scale)
    affine = _close(at[3] - at[2], at[0] - at[4], scale)
    description = module_head.nonlinear_layer if module_head is not None else None
    if not (invariant and affine):
        reason = description or (
            "a position-dependent map" if not invariant else "a non-affine map"
        )
        return Head(GlobalPool("avg"), nn.Sequential(), None, reason, "jacobian")
    matrix = _jacobian_rows(run_graph, first)  # [J, N]
    bias = at[4]
    linear = nn.Linear(matrix.shape[1], matrix.shape[0]).to(device=matrix.device)
    with torch.no_grad():
        linear.weight.copy_(matrix)
        linear.bias.copy_(bias.to(matrix))
    return Head(GlobalPool("avg"), nn.Sequential(linear), matrix, None, "linear")


def _jacobian_rows(
    run_graph: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], maps: torch.Tensor
) -> torch.Tensor:
    """``W[j, n] = sum_ij dZ'_j / dA[n, i, j]`` at ``maps`` ``[1, N, h, w]``."""
    leaf, outputs = run_graph(maps)
    rows = []
    with torch.enable_grad():  # the caller may run under no_grad
        outputs = outputs.reshape(-1)
        for start in range(0, outputs.shape[0], _BATCH_ROWS):
            count = min(_BATCH_ROWS, outputs.shape[0] - start)
            basis = torch.zeros(count, outputs.shape[0], dtype=outputs.dtype, device=outputs.device)
            basis[torch.arange(count), torch.arange(start, start + count)] = 1
            try:
                (grads,) = torch.autograd.grad(
                    outputs, leaf, basis, retain_graph=True, is_grads_batched=True
                )
            except RuntimeError:  # an op without a batching rule: one row at a time
                grads = torch.stack(
                    [torch.autograd.grad(outputs, leaf, row, retain_graph=True)[0] for row in basis]
                )
            rows.append(grads.sum(dim=(-2, -1)).reshape(count, -1))
    return torch.cat(rows).float().detach()
