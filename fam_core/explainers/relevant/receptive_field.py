"""Receptive fields of convolutional layers, computed analytically, and cropping by them.

A unit at row ``i`` of a layer's response reads the input rows
``[start + i * stride, start + i * stride + size)`` (likewise for columns). Through one
``Conv2d`` / ``MaxPool2d`` / ``AvgPool2d`` with kernel ``k``, stride ``s``, padding ``p`` and
dilation ``d`` (per axis), a receptive field ``(size, stride, start)`` of the module's input
becomes::

    size'   = size + (k - 1) * d * stride
    stride' = stride * s
    start'  = start - p * stride

Element-wise modules (activations, batch norm, dropout, identity) keep it unchanged;
``nn.Sequential`` composes its children in order. Anything else (residual blocks, adaptive or
global pooling, custom modules) cannot be analysed and raises ``ValueError`` naming it.

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    >>> receptive_field(net, "2")
    ReceptiveField(size=(4, 4), stride=(2, 2), start=(-1, -1))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.BatchNorm2d,
    nn.Dropout,
    nn.Dropout2d,
)
"""Modules that act on every position alone: they leave the receptive field unchanged."""

Pair = tuple[int, int]


@dataclass(frozen=True)
class ReceptiveField:
    """Input region of a layer's units: unit ``(i, j)`` reads rows
    ``[start[0] + i * stride[0], ... + size[0])`` and columns likewise (may leave the image)."""

    size: Pair = (1, 1)
    stride: Pair = (1, 1)
    start: Pair = (0, 0)

    def then(self, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> ReceptiveField:
        """The receptive field after one more sliding-window operation (module docstring)."""
        return ReceptiveField(
            size=_pair_map(
                lambda r, k, d, j: r + (k - 1) * d * j, self.size, kernel, dilation, self.stride
            ),
            stride=_pair_map(lambda j, s: j * s, self.stride, stride),
            start=_pair_map(lambda a, p, j: a - p * j, self.start, padding, self.stride),
        )

    def boxes(self, positions: torch.Tensor) -> torch.Tensor:
        """``[n, 4]`` input boxes ``(x0, y0, x1, y1)`` (end exclusive) of units ``[n, 2]`` (row, col)."""
        if positions.dim() != 2 or positions.shape[1] != 2:
            raise ValueError(f"positions must be [n, 2] (row, col), got {tuple(positions.shape)}")
        y0 = self.start[0] + positions[:, 0] * self.stride[0]
        x0 = self.start[1] + positions[:, 1] * self.stride[1]
        return torch.stack([x0, y0, x0 + self.size[1], y0 + self.size[0]], dim=1)


def _pair_map(fn, *pairs: Pair) -> Pair:  # type: ignore[no-untyped-def]
    return (fn(*(p[0] for p in pairs)), fn(*(p[1] for p in pairs)))


def _as_pair(value: int | tuple[int, ...], what: str, name: str) -> Pair:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (value[0], value[1])
    raise ValueError(f"{name}: cannot analyse {what}={value!r}; expected an int or a 2-tuple")


def module_receptive_field(
    module: nn.Module, field: ReceptiveField | None = None, name: str = "module"
) -> ReceptiveField:
    """Apply a whole ``module`` to ``field`` (default: the input pixel itself).

    Raises:
        ValueError: for a module whose geometry is not known, naming it (``name``).
    """
    field = ReceptiveField() if field is None else field
    if isinstance(module, nn.Conv2d):
        kernel = _as_pair(module.kernel_size, "kernel_size", name)
        dilation = _as_pair(module.dilation, "dilation", name)
        if module.padding == "valid":
            padding: Pair = (0, 0)
        elif module.padding == "same":  # PyTorch puts the odd pixel at the end
            padding = _pair_map(lambda k, d: d * (k - 1) // 2, kernel, dilation)
        else:
            padding = _as_pair(module.padding, "padding", name)
        stride = _as_pair(module.stride, "stride", name)
        return field.then(kernel, stride, padding, dilation)
    if isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
        kernel = _as_pair(module.kernel_size, "kernel_size", name)
        stride = _as_pair(module.stride if module.stride else module.kernel_size, "stride", name)
        padding = _as_pair(module.padding, "padding", name)
        dilation = _as_pair(getattr(module, "dilation", 1), "dilation", name)
        return field.then(kernel, stride, padding, dilation)
    if isinstance(module, ELEMENTWISE):
        return field
    if type(module) is nn.Sequential:
        for child_name, child in module.named_children():
            field = module_receptive_field(child, field, f"{name}.{child_name}")
        return field
    raise ValueError(
        f"cannot compute the receptive field through {name!r} ({type(module).__name__}): "
        "only Conv2d, MaxPool2d, AvgPool2d, element-wise modules and nn.Sequential are analysed"
    )


def receptive_field(model: nn.Module, layer: str) -> ReceptiveField:
    """Receptive field of the units of ``layer``'s output, in input pixels.

    The model's top-level children are taken to run in registration order (true of
    ``nn.Sequential`` and the fam_core backbones); below the top level only ``nn.Sequential``
    containers are entered. Every module on the path must be analysable
    (:func:`module_receptive_field`), else ``ValueError`` names it.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(4, 4, 3))
        >>> receptive_field(net, "1")
        ReceptiveField(size=(7, 7), stride=(2, 2), start=(0, 0))
    """
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"layer must be a module name, got {layer!r}")
    if layer not in dict(model.named_modules()):
        raise ValueError(f"unknown layer {layer!r}; expected the name of a model module")
    field = ReceptiveField()
    container, prefix = model, ""
    while True:
        for child_name, child in container.named_children():
            full = f"{prefix}{child_name}"
            if full == layer:
                return module_receptive_field(child, field, full)
            if layer.startswith(full + "."):
                if type(child) is not nn.Sequential:
                    raise ValueError(
                        f"cannot compute the receptive field of {layer!r}: it lies inside "
                        f"{full!r} ({type(child).__name__}), whose order of execution is unknown "
                        "(only nn.Sequential containers are entered)"
                    )
                container, prefix = child, full + "."
                break
            field = module_receptive_field(child, field, full)
        else:  # pragma: no cover - the layer exists, so the walk always finds it
            raise ValueError(f"layer {layer!r} not found among the children of the model")


def crop(images: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Cut ``boxes[n] = (x0, y0, x1, y1)`` out of ``images[indices[n]]``: ``[n, C, h, w]``.

    All boxes must have the same size. Pixels outside the image are filled with that image's
    per-channel mean (so the border neither darkens nor brightens average crops).

    Example:
        >>> image = torch.arange(4.0).view(1, 1, 2, 2)  # mean 1.5
        >>> crop(image, torch.tensor([0]), torch.tensor([[1, 0, 3, 1]]))
        tensor([[[[1.0000, 1.5000]]]])
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 4 or indices.shape != boxes.shape[:1]:
        raise ValueError(
            f"boxes must be [n, 4] with indices [n], got {tuple(boxes.shape)} and "
            f"{tuple(indices.shape)}"
        )
    sizes = (boxes[:, 2:] - boxes[:, :2]).unique(dim=0)
    if sizes.shape[0] > 1 or (sizes <= 0).any():
        raise ValueError(f"all boxes must have the same positive size, got sizes {sizes.tolist()}")
    if boxes.shape[0] == 0:
        return images.new_zeros(0, images.shape[1], 0, 0)
    width, height = (int(v) for v in sizes[0])
    _, channels, h, w = images.shape
    pad_top = max(0, -int(boxes[:, 1].min()))
    pad_left = max(0, -int(boxes[:, 0].min()))
    pad_bottom = max(0, int(boxes[:, 3].max()) - h)
    pad_right = max(0, int(boxes[:, 2].max()) - w)
    chosen = images[indices]
    padded = chosen.mean(dim=(2, 3), keepdim=True).expand(
        -1, -1, h + pad_top + pad_bottom, w + pad_left + pad_right
    )
    padded = padded.clone()
    padded[:, :, pad_top : pad_top + h, pad_left : pad_left + w] = chosen
    device = images.device
    rows = (boxes[:, 1:2].to(device) + pad_top) + torch.arange(height, device=device)  # [n, h]
    cols = (boxes[:, 0:1].to(device) + pad_left) + torch.arange(width, device=device)  # [n, w]
    n = torch.arange(boxes.shape[0], device=device)
    ch = torch.arange(channels, device=device)
    return padded[
        n[:, None, None, None],
        ch[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
