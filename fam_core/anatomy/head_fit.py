"""The head after the target layer, found from the model's dataflow (FAM eq. 16-18).

FAM maps contributions on the embedding back to the target layer's channels through the
head ``Z' = g(p(A))`` (Liao et al., section IV-D). :func:`fit_head` finds that head by
running the model with the target layer's maps replaced (``run``), not by reading the
order in which modules were registered:

1. *identity*: the embedding is the pooled layer itself (``p(A) == Z'``);
2. *a module head*, proposed by :func:`fam_core.anatomy.adapters.find_head` (global pooling and
   affine layers registered after the layer), kept only if it reproduces the real output;
3. otherwise probes with substituted maps: the head is *linear* (global average pooling
   then an affine map ``W``, eq. 16-18 exactly) when it is invariant to a spatial
   permutation of the maps and affine (``g(A + B) - g(B) == g(A) - g(0)`` and
   ``g(-A) - g(0) == g(0) - g(A)``). An affine map that ignores positions can only read the
   spatial sums, so it is ``W mean(A) + b``; ``W`` is the Jacobian, read off with one
   batched backward pass (``run_graph``). This recognises a functional ``mean``,
   ``AvgPool2d(kernel=h)``, ``flatten(2).mean(-1)`` and a token mean alike.
4. Anything else is a *jacobian* head: explainers use ``sum_ij dZ'/dA[:, :, i, j]``, the
   exact per-sample linearisation (equal to ``W`` for a linear head after average pooling).

The probes do not trust the real maps alone: maps that are all zeros, or so small that an
activation after the layer (a SiLU, a GELU) works in its nearly linear range, would let a
non-linear head pass. Each test runs on the real maps and on random maps at their scale and
at unit scale (:func:`probe_groups`); a residual counts against the head when it exceeds
``1e-4`` of how far those probes move the output (plus float32 rounding of the output
itself). Identity and module heads must also reproduce the output on a random map.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from fam_core.anatomy.adapters import Head
from fam_core.anatomy.pooling import GlobalPool, PoolingKind, global_pool

_RTOL = 1e-4  # of the output's change under the probes
_ROUNDING = 1e-6  # of the output's magnitude: float32 rounding in a deep head
_BATCH_ROWS = 256
_GROUP = 5  # probes per group: A, A permuted, B, A + B, -A


def probe_groups(first: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``[0, (A, perm(A), B, A + B, -A) * 3]``: ``A`` the real maps ``[1, N, h, w]``, then
    random maps at the real maps' scale and at unit scale; ``B`` noise at ``A``'s scale.

    Example:
        >>> probes = probe_groups(torch.zeros(1, 2, 3, 3), torch.Generator().manual_seed(0))
        >>> probes.shape, bool(probes[1].eq(0).all()), bool(probes[11].std() > 0.5)
        (torch.Size([16, 2, 3, 3]), True, True)
    """
    spread = float(first.float().std()) if first.numel() > 1 else 0.0
    bases = [first]
    for scale in (spread, 1.0):
        random = torch.randn(first.shape, generator=generator).to(first)
        bases.append(random * max(scale, 1e-3))
    order = torch.randperm(first.shape[2] * first.shape[3], generator=generator)
    probes = [torch.zeros_like(first)]
    for base in bases:
        scale = max(float(base.float().std()) if base.numel() > 1 else 0.0, 1e-3)
        noise = torch.randn(first.shape, generator=generator).to(first) * scale
        permuted = base.flatten(2)[:, :, order].reshape(first.shape)
        probes += [base, permuted, noise, base + noise, -base]
    return torch.cat(probes)


def head_violations(at: torch.Tensor) -> tuple[bool, bool]:
    """``(invariant, affine)`` of the outputs ``[1 + 5 k, J]`` of :func:`probe_groups`:
    each residual within ``1e-4`` of the group's output change (and float32 rounding).

    Example:
        >>> probes = probe_groups(torch.rand(1, 2, 3, 3), torch.Generator().manual_seed(0))
        >>> head_violations(probes.mean(dim=(2, 3)) @ torch.ones(2, 4) + 1)
        (True, True)
        >>> head_violations(torch.nn.functional.silu(probes.mean(dim=(2, 3))))
        (True, False)
    """
    at = at.float()
    zero, groups = at[0], at[1:].reshape(-1, _GROUP, *at.shape[1:])
    rounding = _ROUNDING * float(at.abs().amax())
    invariant = affine = True
    for a, permuted, b, ab, minus_a in groups:
        change = max(float((value - zero).abs().amax()) for value in (a, b, ab, minus_a))
        tolerance = _RTOL * change + rounding + 1e-12
        invariant &= float((permuted - a).abs().amax()) <= tolerance
        additive = float(((ab - b) - (a - zero)).abs().amax())
        odd = float(((minus_a - zero) + (a - zero)).abs().amax())
        affine &= max(additive, odd) <= tolerance
    return invariant, affine


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
    first = maps[:1]
    generator = torch.Generator().manual_seed(0)
    check = _random_check(first, generator, run)
    pooled = global_pool(maps.float(), pooling).to(outputs.dtype)
    if reproduces(pooled, outputs) and check(lambda probe: global_pool(probe.float(), pooling)):
        return Head(GlobalPool(pooling), nn.Sequential(), None, None, "identity")
    if module_head is not None and module_head.kind in ("identity", "linear"):

        def transform(probe: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module_head.transform(module_head.pool(probe))

        if reproduces(transform(maps), outputs) and check(transform):
            return module_head
    probes = probe_groups(first, generator)
    with torch.no_grad():
        at = run(probes).float()
    invariant, affine = head_violations(at)
    description = module_head.nonlinear_layer if module_head is not None else None
    if not (invariant and affine):
        reason = description or (
            "a position-dependent map" if not invariant else "a non-affine map"
        )
        return Head(GlobalPool("avg"), nn.Sequential(), None, reason, "jacobian")
    matrix = _jacobian_rows(run_graph, first)  # [J, N]
    bias = at[0]
    linear = nn.Linear(matrix.shape[1], matrix.shape[0]).to(device=matrix.device)
    with torch.no_grad():
        linear.weight.copy_(matrix)
        linear.bias.copy_(bias.to(matrix))
    return Head(GlobalPool("avg"), nn.Sequential(linear), matrix, None, "linear")


def _random_check(
    first: torch.Tensor, generator: torch.Generator, run: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[Callable[[torch.Tensor], torch.Tensor]], bool]:
    """A test that a proposed head also reproduces the model on random maps at unit scale
    (real maps may be all zeros); passes without running while traced for export."""
    probe = torch.randn(first.shape, generator=generator).to(first)
    computed: list[torch.Tensor] = []

    def check(head: Callable[[torch.Tensor], torch.Tensor]) -> bool:
        if get_proxy_mode() is not None:
            return True
        if not computed:
            with torch.no_grad():
                computed.append(run(probe).detach())
        return reproduces(head(probe).to(computed[0].dtype), computed[0])

    return check


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
