"""Where removing a filter takes effect: after the per-channel layers that follow it.

Oramas et al. (sec. 4.1) remove a feature by zeroing its filter's response. Their VGG has no
normalisation, so the convolution's output is the response. In a network with BatchNorm a
zeroed convolution channel still passes BN's shift ``beta - gamma mean / sigma`` and the
activation of that: the "removed" filter keeps a constant response. Removing the filter means
zeroing its response after the layers that act on each of its channels alone and that
directly consume its output: normalisation (BatchNorm, InstanceNorm) and element-wise
activations.

:func:`removal_points` finds them from the model's real dataflow: one forward pass with a
temporary hook on every module follows each feature layer's output tensor through the
modules that take that very tensor as input, as long as they are per-channel and run once
(a module called twice, like a ReLU shared by a block, would remove the channel at its
other uses too).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fam_core.explainers.relevant.receptive_field import ELEMENTWISE

PER_CHANNEL: tuple[type[nn.Module], ...] = (
    *ELEMENTWISE,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)
"""Modules that act on each channel alone: the element-wise ones (activations, dropout) and
the per-channel normalisations."""


def removal_points(model: nn.Module, layers: Sequence[str], images: torch.Tensor) -> list[str]:
    """For each feature layer in ``layers``, the name of the module whose output is that
    layer's response after the normalisation and activation that directly follow it (the
    layer itself when none does). One forward pass of ``images`` (one image is enough).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        ...                     nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1))
        >>> removal_points(net.eval(), ["0", "3"], torch.rand(1, 3, 8, 8))
        ['2', '3']
    """
    names = {module: name for name, module in model.named_modules()}
    calls: list[tuple[nn.Module, object, object]] = []  # (module, first input, output)
    handles = []

    def hook(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        calls.append((module, inputs[0] if inputs else None, output))

    try:
        for module in names:
            handles.append(module.register_forward_hook(hook))
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    runs: dict[nn.Module, int] = {}
    for module, _, _ in calls:
        runs[module] = runs.get(module, 0) + 1
    modules = dict(model.named_modules())
    return [_follow(modules[layer], calls, runs, names) for layer in layers]


def _follow(
    layer: nn.Module,
    calls: list[tuple[nn.Module, object, object]],
    runs: dict[nn.Module, int],
    names: dict[nn.Module, str],
) -> str:
    """The last per-channel module of the chain that consumes ``layer``'s output."""
    current = layer
    while runs.get(current, 0) == 1:
        index = next(i for i, call in enumerate(calls) if call[0] is current)
        output = calls[index][2]
        following = next(
            (
                module
                for module, consumed, _ in calls[index + 1 :]
                if consumed is output and module is not current
            ),
            None,
        )
        if following is None or not isinstance(following, PER_CHANNEL):
            break
        if runs[following] != 1:
            break
        current = following
    return names[current]
