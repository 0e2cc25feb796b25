"""Token rows of the head that never reach the output, left uncomputed.

A vision transformer whose embedding is its class token reads the last block's output at
one token only. Every token still feeds the block's attention keys and values, but the
query, the attention output projection and the MLP matter for the class token's row
alone. Run as written, the head computes them for all ``T`` tokens, and a backward pass
through it multiplies ``T - 1`` rows of zeros: FAM's exact vector-Jacobian product
through the last block (``nonlinear_head="jacobian"``) then costs about a tenth of the
whole forward pass.

:func:`find_row_plan` reads which rows of each ``nn.Linear`` output after the target
layer reach the model's output: the rows of ``d (v . Z') / d Y`` that are not zero for a
random ``v``, found with one backward pass through the head. :func:`pruned_rows` then
runs those layers on their needed rows only, with zeros elsewhere. The output is the same
(checked once, when the plan is made) and so are the gradients with respect to the
target layer: the rows left out have no path to the output. Nothing else in the model
changes, and the layers' own ``forward`` is restored on leaving, even on error.

Example:
    >>> from torch import nn
    >>> class ClassToken(nn.Module):  # embedding: token 0 of a per-token MLP
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.mix, self.mlp = nn.Linear(4, 4), nn.Linear(4, 3)
    ...     def forward(self, tokens):
    ...         return self.mlp(self.mix(tokens))[:, 0]
    >>> model = ClassToken().eval()
    >>> tokens = torch.rand(2, 5, 4)
    >>> plan = find_row_plan(model, lambda: model(tokens.requires_grad_(True)), model(tokens))
    >>> plan
    {'mix': (0,), 'mlp': (0,)}
    >>> with pruned_rows(model, plan):
    ...     torch.allclose(model(tokens), model.mlp(model.mix(tokens))[:, 0])
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

RowPlan = dict[str, tuple[int, ...]]
"""Qualified ``nn.Linear`` names and the token rows (``dim 1``) of their output to compute."""

_MIN_SAVING = 2  # prune a layer only when it computes at most half of its rows


def find_row_plan(
    model: nn.Module, run_graph: Callable[[], torch.Tensor], outputs: torch.Tensor
) -> RowPlan:
    """The rows each ``nn.Linear`` after the target layer must compute.

    ``run_graph()`` runs the model with autograd recording from the target layer on
    (the layers before it without) and returns its outputs ``[B, D]``; ``outputs`` are the
    same outputs from a plain pass. A layer is listed when it runs once, its output is
    ``[B, T, F]`` and at most half of its ``T`` rows reach the outputs. The plan is kept only if the model
    gives the same outputs with it (relative ``1e-4``); otherwise it is empty.
    """
    captured: dict[str, torch.Tensor] = {}
    called: dict[str, int] = {}

    def recorder(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            called[name] = called.get(name, 0) + 1
            if isinstance(output, torch.Tensor) and output.requires_grad and output.dim() == 3:
                captured[name] = output

        return hook

    handles = [
        module.register_forward_hook(recorder(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        with torch.enable_grad():
            recorded = run_graph()
    finally:
        for handle in handles:
            handle.remove()
    captured = {name: out for name, out in captured.items() if called[name] == 1}  # not shared
    if not captured or not recorded.requires_grad:
        return {}
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(recorded.shape, generator=generator).to(recorded)
    names = list(captured)
    grads = torch.autograd.grad(
        recorded, [captured[name] for name in names], direction, allow_unused=True
    )
    plan: RowPlan = {}
    for name, grad in zip(names, grads, strict=True):
        if grad is None:
            continue
        needed = grad.detach().abs().amax(dim=(0, 2)) > 0
        if 0 < int(needed.sum()) * _MIN_SAVING <= needed.numel():
            plan[name] = tuple(needed.nonzero().flatten().tolist())
    if plan:
        with torch.no_grad(), pruned_rows(model, plan):
            again = run_graph().detach()
        scale = outputs.detach().abs().amax().clamp_min(1e-6)
        if again.shape != outputs.shape or (again - outputs).abs().amax() > 1e-4 * scale:
            return {}
    return plan


@contextmanager
def pruned_rows(model: nn.Module, plan: RowPlan) -> Iterator[None]:
    """Run the planned ``nn.Linear`` layers of ``model`` on their needed rows only."""
    patched: list[nn.Module] = []
    try:
        for name, rows in plan.items():
            module = model.get_submodule(name)
            module.forward = _row_forward(module, rows)  # type: ignore[method-assign]
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


def _row_forward(
    linear: nn.Linear, rows: tuple[int, ...]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``linear`` on rows ``rows`` of ``[B, T, C]`` inputs, zeros in the other rows."""
    first, last = rows[0], rows[-1] + 1
    contiguous = last - first == len(rows)

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        if contiguous:  # a slice and a pad: cheap, and plain ONNX ops when exported
            computed = F.linear(inputs[:, first:last], linear.weight, linear.bias)
            return F.pad(computed, (0, 0, first, inputs.shape[1] - last))
        index = torch.tensor(rows, device=inputs.device)
        computed = F.linear(inputs.index_select(1, index), linear.weight, linear.bias)
        shape = (inputs.shape[0], inputs.shape[1], computed.shape[2])
        return computed.new_zeros(shape).index_copy(1, index, computed)

    return forward
