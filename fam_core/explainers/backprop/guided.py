"""Guided backpropagation (Springenberg et al., 2015) through temporary ReLU hooks.

At every ``ReLU`` / ``LeakyReLU`` the backward signal is rectified before it passes the
unit's own derivative: ``R_in = f'(x) * max(R_out, 0)``. Only positive evidence flows back
to the input. The hooks exist only inside :func:`guided_relus` and are removed in ``finally``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

GUIDED_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU)


class _RectifyGradient(torch.autograd.Function):
    """Identity forward; backward keeps only the positive part of the incoming gradient."""

    @staticmethod
    def forward(ctx: object, values: torch.Tensor) -> torch.Tensor:
        return values.view_as(values)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp_min(0)


def _rectify_output(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
    return _RectifyGradient.apply(output)


@contextmanager
def guided_relus(model: nn.Module) -> Iterator[int]:
    """Inside the block, backward passes through ``model``'s ReLUs are guided.

    Yields the number of hooked units (0 means the model has no ReLU / LeakyReLU module,
    e.g. it calls ``torch.relu`` functionally, and guided backprop would equal plain
    gradients).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> with guided_relus(net) as hooked:
        ...     hooked
        1
    """
    handles = [
        module.register_forward_hook(_rectify_output)
        for module in model.modules()
        if isinstance(module, GUIDED_MODULES)
    ]
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


def guided_backprop(
    model: nn.Module, images: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Guided-backprop gradient ``[B, C, H, W]`` of ``score(model(images))`` (``[B]``).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> guided_backprop(net, torch.rand(2, 1, 2, 2), lambda out: out[:, 0]).shape
        torch.Size([2, 1, 2, 2])
    """
    inputs = images.detach().requires_grad_(True)
    with guided_relus(model), torch.enable_grad():
        scores = score(model(inputs))
        (grads,) = torch.autograd.grad(scores.sum(), inputs)
    return grads
