"""Model adapters: the target layer, and the head between it and the embedding.

FAM's transformation module (Liao et al., section IV-D, eq. 16-18) maps contributions
computed on the embedding ``Z' = Z W`` back onto the pooled channels ``Z`` with
``C = W C'^T``. This module finds that head after the target layer and reduces it to
one matrix.

Automatic detection walks ``model.named_modules()`` in registration order, which must be
the order ``forward`` runs them in (true for ``nn.Sequential`` and for models that
register layers in the order they call them, like every backbone in
:mod:`fam_core.models`). The leaves after the target layer must be one global pooling
followed by affine layers (``Linear``, ``BatchNorm1d`` in eval mode, ``Dropout`` in eval
mode, ``Flatten``, ``Identity``). Anything else (a ``ReLU`` in an MLP projector, a
``LayerNorm``) is a non-linear head: explainers raise :class:`ValueError` naming the
layer, or, with ``nonlinear_head="jacobian"``, use the head's Jacobian at each sample
(the exact local linearisation; it equals ``W`` for linear heads).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fam_core.anatomy.pooling import GlobalPool, PoolingKind

NonlinearHead = Literal["error", "jacobian"]
HeadKind = Literal["identity", "linear", "jacobian"]

_POOLING_TYPES = (GlobalPool, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_PASS_THROUGH = (nn.Flatten, nn.Identity, nn.Dropout)


def resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> tuple[str, nn.Module]:
    """Return ``(name, module)`` for a layer given by name, by module, or ``None``.

    ``None`` takes ``model.default_target_layer`` when the model declares one, else the
    last top-level child before the model's pooling layer.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1))
        >>> resolve_layer(net, None)[0]
        '0'
    """
    modules = dict(model.named_modules())
    if layer is None:
        layer = getattr(model, "default_target_layer", None) or _last_child_before_pool(model)
    if isinstance(layer, nn.Module):
        for name, module in modules.items():
            if module is layer and name:
                return name, module
        raise ValueError("target_layer is a module that is not part of the model")
    if not isinstance(layer, str):
        raise TypeError(f"target_layer must be a layer name or an nn.Module, got {type(layer)}")
    if layer not in modules or layer == "":
        hint = (
            f"; did you mean {', '.join(repr(c) for c in close)}?"
            if (close := close_layers(model, layer))
            else ""
        )
        raise ValueError(f"unknown target layer {layer!r}{hint}")
    return layer, modules[layer]


def close_layers(model: nn.Module, layer: str, n: int = 3) -> list[str]:
    """Layer names of ``model`` close to ``layer`` (difflib): among every module name, else,
    more loosely, among the top-level children (``layer4`` finds ``block4``).

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> close_layers(conv4(width=0.25), "layer4")
        ['block4']
    """
    names = [name for name, _ in model.named_modules() if name]
    close = difflib.get_close_matches(layer, names, n=n)
    if close:
        return close
    children = [name for name, _ in model.named_children()]
    return difflib.get_close_matches(layer, children, n=n, cutoff=0.3)


def _last_child_before_pool(model: nn.Module) -> str:
    previous = None
    for name, child in model.named_children():
        if isinstance(child, _POOLING_TYPES):
            break
        previous = name
    if previous is None:
        raise ValueError("cannot guess the target layer of this model: pass target_layer")
    return previous


def input_channels(model: nn.Module) -> int | None:
    """The ``in_channels`` of the model's first convolution, if it has one."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


@dataclass(frozen=True)
class Head:
    """What follows the target layer: ``embedding = transform(pool(A))``.

    Attributes:
        pooling: the pooling kind ``p`` of eq. 11.
        transform: the modules between the pooled vector and the embedding.
        matrix: ``[J, N]`` the transform as one linear map (``None`` when not linear;
            ``None`` with an empty ``transform`` means the identity).
        nonlinear_layer: name of the first layer that is not affine, if any.
        kind: ``"identity"``, ``"linear"`` (eq. 16-18 with ``matrix``) or ``"jacobian"``
            (not linear: explainers use the head's Jacobian at each sample).
    """

    pooling: nn.Module
    transform: nn.Sequential
    matrix: torch.Tensor | None
    nonlinear_layer: str | None
    kind: HeadKind | None = None

    def __post_init__(self) -> None:
        if self.kind is None:
            if self.nonlinear_layer is not None:
                kind = "jacobian"
            else:
                kind = "identity" if len(self.transform) == 0 else "linear"
            object.__setattr__(self, "kind", kind)

    @property
    def is_identity(self) -> bool:
        return self.kind == "identity"

    def pool(self, activations: torch.Tensor) -> torch.Tensor:
        return self.pooling(activations).flatten(1)

    def jacobian(self, pooled: torch.Tensor) -> torch.Tensor:
        """``[B, J, N]`` derivative of the embedding with respect to the pooled features."""
        transform = self.transform

        def one(z: torch.Tensor) -> torch.Tensor:
            return transform(z.unsqueeze(0)).squeeze(0)

        with torch.enable_grad():
            return torch.func.vmap(torch.func.jacrev(one))(pooled)


def find_head(model: nn.Module, layer_name: str, default_pooling: PoolingKind = "avg") -> Head:
    """Find the head after ``layer_name`` (see the module docstring for the rules).

    A model whose target layer is its last module gets ``default_pooling`` and no
    transform.
    """
    names = [name for name, _ in model.named_modules()]
    modules = dict(model.named_modules())
    prefix = layer_name + "."
    after = [
        (name, modules[name])
        for name in names[names.index(layer_name) + 1 :]
        if not name.startswith(prefix) and not list(modules[name].children())
    ]
    if not after:
        return Head(GlobalPool(default_pooling), nn.Sequential(), None, None)
    pool_name, pooling = after[0]
    if not isinstance(pooling, _POOLING_TYPES):
        return Head(GlobalPool(default_pooling), nn.Sequential(), None, pool_name)
    transform = nn.Sequential(*(m for _, m in after[1:] if not isinstance(m, _PASS_THROUGH)))
    for name, module in after[1:]:
        if not _is_affine(module):
            return Head(pooling, transform, None, name)
    return Head(pooling, transform, linear_matrix(transform), None)


def head_from_module(head: nn.Module | torch.Tensor, pooling: PoolingKind) -> Head:
    """A :class:`Head` from an explicit head module, or a ``[J, N]`` weight matrix."""
    if isinstance(head, torch.Tensor):
        if head.dim() != 2:
            raise ValueError(f"a head matrix must be [J, N], got shape {tuple(head.shape)}")
        linear = nn.Linear(head.shape[1], head.shape[0], bias=False)
        with torch.no_grad():
            linear.weight.copy_(head)
        head = linear.to(head.device)
    if not isinstance(head, nn.Module):
        raise TypeError(f"head must be 'auto', None, an nn.Module or a tensor, got {type(head)}")
    leaves = [m for m in head.modules() if not list(m.children())]
    transform = nn.Sequential(*(m for m in leaves if not isinstance(m, _PASS_THROUGH)))
    nonlinear = next((type(m).__name__ for m in leaves if not _is_affine(m)), None)
    matrix = None if nonlinear else linear_matrix(transform)
    return Head(GlobalPool(pooling), transform, matrix, nonlinear)


def _is_affine(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear | nn.Flatten | nn.Identity):
        return True
    if isinstance(module, nn.Dropout):
        return not module.training
    if isinstance(module, nn.BatchNorm1d):
        return not module.training and module.track_running_stats
    return False


def linear_matrix(transform: nn.Sequential) -> torch.Tensor | None:
    """Compose affine layers into one ``[J, N]`` matrix (biases drop out of eq. 18)."""
    matrix: torch.Tensor | None = None
    for module in transform:
        if isinstance(module, nn.Linear):
            step = module.weight
        elif isinstance(module, nn.BatchNorm1d):
            scale = (module.running_var + module.eps).rsqrt()
            step = torch.diag(scale if module.weight is None else module.weight * scale)
        else:
            continue
        matrix = step if matrix is None else step @ matrix
    return None if matrix is None else matrix.detach()
