"""Find the target layer from the model's real dataflow.

One forward pass with a temporary hook on every module records each output that holds
feature maps (:func:`fam_core.anatomy.layouts.detect_layout`), in the order the model runs them.
One backward pass from a random projection of the explained output then tells which of
those maps the output depends on: the patch tokens of a vision transformer's last block do
not reach its class token, a layer after global pooling has no spatial extent.

The chosen layer is the last one that ran, has a spatial map (``h * w > 1``) and reaches the
output, preferring the model's building blocks (children of the model, of an
``nn.ModuleList`` / ``nn.Sequential`` or a container of children named by index, as
``torch.export.unflatten`` rebuilds them, or of the module that owns one: stages, blocks,
encoder layers, a backbone's final norm) over the layers inside them. That is ``layer4`` of a ResNet, the last stage of a ConvNeXt, and, for a vision
transformer explained through its class token, the block before the last.

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
    ...                     nn.Flatten(), nn.Linear(4, 2))
    >>> search = find_layers(net, (32, 32))
    >>> search.chosen, [c.name for c in search.candidates]
    ('1', ['0', '1', '2'])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fam_core.anatomy.layouts import FeatureLayout, detect_layout
from fam_core.anatomy.outputs import OutputSpec, select_output
from fam_core.anatomy.pooling import global_pool


class ModelDoesNotRun(ValueError):
    """The layer search's input failed in the model: ``reason`` says how; the message adds
    the Python API's way out (``input_size=`` or ``target_layer=``), which config front doors
    phrase as config keys."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}; pass input_size= or target_layer=")
        self.reason = reason


@dataclass(frozen=True)
class LayerCandidate:
    """A layer whose output holds feature maps."""

    name: str
    shape: tuple[int, ...]
    layout: FeatureLayout
    reaches_output: bool
    block: bool  # a child of the model, of a ModuleList / Sequential, or of their owner

    @property
    def spatial(self) -> bool:
        return self.layout.grid[0] * self.layout.grid[1] > 1


@dataclass(frozen=True)
class LayerSearch:
    """The candidates in execution order, and the chosen layer (``None``: none fits)."""

    candidates: tuple[LayerCandidate, ...]
    chosen: str | None
    input_size: tuple[int, int]

    def __str__(self) -> str:
        lines = [f"input {self.input_size[0]}x{self.input_size[1]}; candidate layers:"]
        for c in self.candidates:
            mark = "*" if c.name == self.chosen else " "
            layout = c.layout.kind + (
                f", {c.layout.prefix} leading tokens" if c.layout.prefix else ""
            )
            reach = "" if c.reaches_output else "  (does not reach the output)"
            lines.append(f" {mark} {c.name:<40} {list(c.shape)!s:<22} {layout}{reach}")
        lines.append(f"chosen: {self.chosen}")
        return "\n".join(lines)


def _first_tensor(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, list | tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def find_layers(
    model: nn.Module,
    input_size: tuple[int, int],
    *,
    output: OutputSpec = None,
    channels: int = 3,
    pooling: str = "avg",
) -> LayerSearch:
    """Run the model once on a random ``[1, channels, H, W]`` input and rank its layers.

    Raises ``ValueError`` when the model does not run on that input.
    """
    modules = dict(model.named_modules())
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else None
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, channels, *input_size, generator=generator)
    image = image.to(device=device, dtype=dtype or torch.float32).requires_grad_(True)
    seen: list[tuple[str, torch.Tensor, FeatureLayout]] = []

    def recorder(name: str):
        def hook(_module: nn.Module, _inputs: object, out: object) -> None:
            tensor = _first_tensor(out)
            if tensor is None or not tensor.requires_grad:
                return
            layout = detect_layout(tensor, input_size)
            if layout is not None:
                seen.append((name, tensor, layout))

        return hook

    handles = [m.register_forward_hook(recorder(n)) for n, m in modules.items() if n]
    try:
        with torch.enable_grad():
            try:
                outputs = select_output(model(image), output)
            except (RuntimeError, ValueError, TypeError) as error:
                raise ModelDoesNotRun(
                    f"the model does not run on a {input_size[0]}x{input_size[1]} input ({error})"
                ) from error
            if outputs.dim() == 4:
                outputs = global_pool(outputs, pooling)  # type: ignore[arg-type]
            direction = torch.randn(outputs.shape, generator=generator).to(outputs)
            tensors = [t for _, t, _ in seen]
            grads = torch.autograd.grad((outputs * direction).sum(), tensors, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    candidates = []
    earlier: set[int] = set()
    for (name, tensor, layout), grad in zip(seen, grads, strict=True):
        alias = id(tensor) in earlier
        earlier.add(id(tensor))
        if alias and _parent(name) == "" and len(list(modules[name].children())) == 1:
            # a top-level wrapper passing on its only child's maps (an encoder rebuilt by
            # torch.export.unflatten returns its last stage's tensor): the stage names them
            continue
        reaches = grad is not None and bool(layout.to_map(grad).abs().amax() > 0)
        parent = modules[_parent(name)]
        block = (
            _parent(name) == ""
            or _is_sequence(parent)
            or any(_is_sequence(child) for child in parent.children())
        )
        candidates.append(LayerCandidate(name, tuple(tensor.shape), layout, reaches, block))
    return LayerSearch(tuple(candidates), _choose(candidates), input_size)


def _is_sequence(module: nn.Module) -> bool:
    """A ``ModuleList`` / ``Sequential``, or a container whose children are named by their
    index: what ``torch.export.unflatten`` rebuilds a ``ModuleList`` as."""
    if isinstance(module, nn.ModuleList | nn.Sequential):
        return True
    names = [name for name, _ in module.named_children()]
    return bool(names) and names == [str(index) for index in range(len(names))]


def _choose(candidates: list[LayerCandidate]) -> str | None:
    useful = [c for c in candidates if c.reaches_output and c.spatial]
    blocks = [c for c in useful if c.block]
    for group in (blocks, useful, [c for c in candidates if c.reaches_output]):
        if group:
            return group[-1].name
    return None


def probe_size(model: nn.Module, input_size: int | tuple[int, int] | None) -> tuple[int, int]:
    """The input size to search layers with: ``input_size``, the ``config.image_size`` of the
    model or a module inside it (``transformers`` models), a ``default_input_size``, else 224."""
    size = input_size
    for module in model.modules() if size is None else ():  # the model or a wrapped one
        config = getattr(module, "config", None)
        size = getattr(config, "image_size", None) or getattr(module, "default_input_size", None)
        if size is not None:
            break
    if size is None:
        size = 224
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return (int(size[0]), int(size[1]))
    raise ValueError(f"input_size must be an int or (H, W), got {size!r}")
