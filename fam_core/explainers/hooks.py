"""Temporary forward hooks on a layer: read or replace its output for one run of the model.

A layer's output is its feature tensor, or a tuple or list whose first item is
(:func:`unwrap`); :func:`layer_hook` hands that tensor to a callback and puts the callback's
replacement back in its place. The hook lives only inside the ``with`` block and is removed
in ``finally``, whatever the model raises.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    >>> seen = []
    >>> with layer_hook(model[0], lambda tensor: seen.append(tensor.shape)):
    ...     _ = model(torch.rand(2, 3, 5, 5))
    >>> seen, bool(model[0]._forward_hooks)
    ([torch.Size([2, 4, 5, 5])], False)
    >>> with layer_hook(model[0], torch.zeros_like):  # the layer's output replaced
    ...     model(torch.rand(1, 3, 2, 2)).abs().sum().item()
    0.0
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

OnOutput = Callable[[torch.Tensor], torch.Tensor | None]
"""Sees a layer's feature tensor; returns its replacement, or ``None`` to keep it."""


def unwrap(output: object) -> tuple[object, Callable[[torch.Tensor], object]]:
    """``(tensor, rewrap)``: a layer output's feature tensor (a tensor, or the first item of a
    tuple or list) and a function putting a replacement back in its place (a list stays a
    list; any tuple, named ones included, becomes a plain tuple).

    Example:
        >>> tensor, rewrap = unwrap((torch.ones(1), "state"))
        >>> tensor, rewrap(torch.zeros(1))
        (tensor([1.]), (tensor([0.]), 'state'))
    """
    if not (isinstance(output, list | tuple) and output and isinstance(output[0], torch.Tensor)):
        return output, lambda new: new
    rest = tuple(output[1:])

    def rewrap(new: torch.Tensor) -> object:
        return [new, *rest] if isinstance(output, list) else (new, *rest)

    return output[0], rewrap


@contextmanager
def layer_hook(layer: nn.Module, on_output: OnOutput) -> Iterator[None]:
    """While open, every output of ``layer`` goes through ``on_output`` (see :data:`OnOutput`);
    the hook is removed on leaving, also when the model raises."""

    def hook(_module: nn.Module, _inputs: object, output: object) -> object:
        tensor, rewrap = unwrap(output)
        replacement = on_output(tensor)  # type: ignore[arg-type]
        return None if replacement is None else rewrap(replacement)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def captured_outputs(layer: nn.Module, run: Callable[[], object]) -> tuple[object, list[object]]:
    """``(what run() returns, every output of layer in that run, unwrapped)``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
        >>> outputs, captured = captured_outputs(model[0], lambda: model(torch.rand(1, 3, 2, 2)))
        >>> outputs.shape, len(captured), captured[0].shape
        (torch.Size([1, 4, 2, 2]), 1, torch.Size([1, 4, 2, 2]))
    """
    captured: list[object] = []

    def keep(tensor: torch.Tensor) -> None:
        captured.append(tensor)

    with layer_hook(layer, keep):
        result = run()
    return result, captured


def layer_responses(
    model: nn.Module, images: torch.Tensor, layers: Sequence[str]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run ``model`` once with temporary hooks: ``(responses per layer, outputs)``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
        >>> responses, outputs = layer_responses(model, torch.rand(1, 3, 2, 2), ["0", "1"])
        >>> [tuple(r.shape) for r in responses], tuple(outputs.shape)
        ([(1, 4, 2, 2), (1, 4, 2, 2)], (1, 4, 2, 2))
    """
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in layers:

            def hook(_m: nn.Module, _i: object, output: torch.Tensor, name: str = name) -> None:
                captured[name] = output

            handles.append(modules[name].register_forward_hook(hook))
        outputs = model(images)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in captured]
    if missing:
        raise ValueError(f"feature layers {missing} did not run in the forward pass")
    return [captured[name] for name in layers], outputs
