"""Input-space backprop explainers: guided backpropagation and deconvnet, with the stride fix.

Backward rules at a rectifier ``y = f(x)`` receiving the signal ``R``:

- guided backprop (Springenberg et al.): ``f'(x) * max(R, 0)`` (from
  :mod:`fam_core.explainers.backprop.guided`, shared with Guided Grad-CAM);
- deconvnet (Zeiler & Fergus): ``max(R, 0)``, ignoring the forward pass.

Max pooling routes the signal through its forward switches, convolutions through their
transposed filters: the ordinary backward pass.

Stride fix (Oramas et al., section 3.3). An operation with kernel ``M``, padding ``O`` and
stride ``S > 1`` maps an input of size ``A`` to ``B = floor((A + 2 O - M) / S) + 1``
(eq. 2-3). In the backward pass its incoming signal ``A_d`` (size ``B``) is first resampled
by nearest neighbour to ``B|_{S=1} = A + 2 O - M + 1`` and then sent back through the same
operation with stride 1. Strided backward passes scatter each output onto a sparse grid of
inputs (grid artifacts); at stride 1 every input receives signal.

All hooks live only inside :func:`backprop_rules` and are removed in ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fam_core.explainers.backprop.guided import GUIDED_MODULES, guided_relus
from fam_core.explainers.base import Explainer
from fam_core.explainers.postprocess import min_max
from fam_core.explainers.registry import register
from fam_core.explainers.targets import Target
from fam_core.explanation import Explanation

BackpropRule = Literal["guided", "deconvnet", "gradient"]
BACKPROP_RULES: tuple[str, ...] = ("guided", "deconvnet", "gradient")
_STRIDED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


class _DeconvRectifier(torch.autograd.Function):
    """Forward: the rectifier's own output; backward: ``max(R, 0)`` to its input."""

    @staticmethod
    def forward(ctx: Any, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.clamp_min(0), None


def _deconv_hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):  # noqa: ANN202
    return _DeconvRectifier.apply(inputs[0], output.detach())


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))


def stride_one_size(module: nn.Module, input_size: tuple[int, int]) -> tuple[int, int]:
    """``B|_{S=1} = A + 2 O - M_eff + 1`` per spatial dimension (eq. 3 with ``S = 1``).

    Example:
        >>> stride_one_size(nn.MaxPool2d(2), (8, 8))
        (7, 7)
    """
    kernel = _pair(module.kernel_size)  # type: ignore[arg-type]
    padding = _pair(module.padding)  # type: ignore[arg-type]
    dilation = _pair(getattr(module, "dilation", 1))  # type: ignore[arg-type]
    return tuple(  # type: ignore[return-value]
        a + 2 * o - (d * (m - 1) + 1) + 1
        for a, o, m, d in zip(input_size, padding, kernel, dilation, strict=True)
    )


class _StrideOneBackward(torch.autograd.Function):
    """Forward: the strided operation's own output; backward: resample, then stride 1."""

    @staticmethod
    def forward(
        ctx: Any, inputs: torch.Tensor, outputs: torch.Tensor, module: nn.Module
    ) -> torch.Tensor:
        ctx.save_for_backward(inputs)
        ctx.module = module
        return outputs.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inputs,) = ctx.saved_tensors
        module = ctx.module
        size = stride_one_size(module, tuple(inputs.shape[-2:]))
        resampled = F.interpolate(grad, size=size, mode="nearest")  # A_d -> B|_{S=1}
        if isinstance(module, nn.Conv2d):
            weight = module.weight.detach()
            grad_inputs = torch.nn.grad.conv2d_input(
                inputs.shape, weight, resampled, stride=1, padding=module.padding,
                dilation=module.dilation, groups=module.groups,
            )  # fmt: skip
            return grad_inputs, None, None
        with torch.enable_grad():
            leaf = inputs.detach().requires_grad_(True)
            if isinstance(module, nn.MaxPool2d):
                out = F.max_pool2d(
                    leaf, module.kernel_size, 1, module.padding, module.dilation, module.ceil_mode
                )
            else:
                out = F.avg_pool2d(leaf, module.kernel_size, 1, module.padding, module.ceil_mode)
            (grad_inputs,) = torch.autograd.grad(out, leaf, resampled)
        return grad_inputs, None, None


def _stride_fix_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):  # noqa: ANN202
    return _StrideOneBackward.apply(inputs[0], output.detach(), module)


def _is_strided(module: nn.Module) -> bool:
    if not isinstance(module, _STRIDED):
        return False
    stride = module.stride if module.stride is not None else module.kernel_size
    if isinstance(module.padding, str) or getattr(module, "ceil_mode", False):
        return False
    return max(_pair(stride)) > 1  # type: ignore[arg-type]


@contextmanager
def backprop_rules(
    model: nn.Module, rule: BackpropRule = "guided", *, stride_fix: bool = False
) -> Iterator[None]:
    """Inside the block, backward passes through ``model`` follow ``rule`` (and the fix).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2), nn.ReLU())
        >>> x = torch.rand(1, 1, 9, 9, requires_grad=True)
        >>> with backprop_rules(net, "deconvnet", stride_fix=True):
        ...     (g,) = torch.autograd.grad(net(x).sum(), x)
        >>> g.shape
        torch.Size([1, 1, 9, 9])
    """
    if rule not in BACKPROP_RULES:
        raise ValueError(f"unknown backprop rule {rule!r}; expected one of {BACKPROP_RULES}")
    with ExitStack() as stack:
        handles = []
        try:
            if stride_fix:
                handles += [
                    module.register_forward_hook(_stride_fix_hook)
                    for module in model.modules()
                    if _is_strided(module)
                ]
            if rule == "guided":
                stack.enter_context(guided_relus(model))
            elif rule == "deconvnet":
                handles += [
                    module.register_forward_hook(_deconv_hook)
                    for module in model.modules()
                    if isinstance(module, GUIDED_MODULES)
                ]
            yield
        finally:
            for handle in handles:
                handle.remove()


def input_signal(
    model: nn.Module,
    images: torch.Tensor,
    source: nn.Module,
    channel: int,
    *,
    rule: BackpropRule = "guided",
    stride_fix: bool = False,
) -> torch.Tensor:
    """Signal ``[B, C, H, W]`` from one channel of ``source``'s output back to the input.

    The channel's own activations are sent back (Grün et al.; all other channels zero);
    ``source`` may be convolutional (``[B, N, h, w]``) or linear (``[B, N]``).
    """
    captured: list[torch.Tensor] = []
    handle = source.register_forward_hook(lambda _m, _i, o: captured.append(o))
    inputs = images.detach().requires_grad_(True)
    try:
        with backprop_rules(model, rule, stride_fix=stride_fix), torch.enable_grad():
            model(inputs)
            if not captured:
                raise ValueError("the source layer did not run in the forward pass")
            output = captured[-1]
            if not 0 <= channel < output.shape[1]:
                raise ValueError(f"channel {channel} out of range [0, {output.shape[1]})")
            seed = torch.zeros_like(output)
            seed[:, channel] = output[:, channel].detach()
            (signal,) = torch.autograd.grad(output, inputs, seed)
    finally:
        handle.remove()
    return signal


def heatmap(signal: torch.Tensor) -> torch.Tensor:
    """``max_c |signal_c|`` ``[B, H, W]``: the input-space map of a backprop signal."""
    return signal.abs().amax(dim=1)


class InputBackprop(Explainer):
    """Base of explainers whose map is a backward signal in input space.

    ``Explanation.raw`` is :func:`heatmap` of the signal at input resolution (before
    min-max); ``weights`` ``[B, C_in]`` the signal summed over pixels per input channel;
    ``extras["signal"]`` the signal ``[B, C_in, H, W]``; ``scores`` the explained score
    (eq. 11, as every method reports it). The signal starts from that score's gradient at
    the output, except when an embedding explains itself (``target=None`` on an embedding
    model): it then starts from the embedding ``Z`` itself, the projection of an activation
    that Zeiler & Fergus define (as :func:`input_signal` does for one channel; for the dot
    product this is the score's gradient, the cosine's is zero), and ``scores`` is
    ``s(Z, Z)`` (1 for cosine, ``|Z|^2`` for dot). ``target_layer`` is unused by the map
    (it is reported as ``"input"``).
    """

    rule: ClassVar[BackpropRule]

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        stride_fix: bool = False,
        **kwargs: object,
    ) -> None:
        if not hasattr(type(self), "rule"):
            raise TypeError(
                f"{type(self).__name__} has no backward rule: use Deconvnet or GuidedBackprop, "
                "or set the class attribute `rule`"
            )
        super().__init__(model, target_layer, **kwargs)  # type: ignore[arg-type]
        if not isinstance(stride_fix, bool):
            raise TypeError(f"stride_fix must be a bool, got {stride_fix!r}")
        self.stride_fix = stride_fix

    def __call__(self, images: torch.Tensor, target: Target = None) -> Explanation:
        images = self._check_images(images)
        inputs = images.detach().requires_grad_(True)
        rules = backprop_rules(self.model, self.rule, stride_fix=self.stride_fix)
        with rules, torch.enable_grad():
            outputs = self._as_vectors(self.model(inputs))
            resolved = self.resolve_target(target, outputs)
            scores = self.score(outputs, resolved)  # eq. 11; s(Z, Z) for a self target
            if resolved.explains_self:  # the embedding itself is sent back (Zeiler & Fergus)
                (signal,) = torch.autograd.grad(outputs, inputs, outputs.detach())
            else:
                (signal,) = torch.autograd.grad(scores.sum(), inputs)
        raw = heatmap(signal)
        return Explanation(
            maps=min_max(raw, dim=(1, 2)).float(),
            raw=raw,
            weights=signal.sum(dim=(2, 3)),
            scores=scores.detach(),
            method=self.method,
            target_layer="input",
            extras={"signal": signal},
        )


@register
class GuidedBackprop(InputBackprop):
    """Guided backpropagation of the explained score to the input.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> e = GuidedBackprop(conv4(width=0.25).eval(), stride_fix=True)(torch.rand(1, 3, 84, 84))
        >>> e.maps.shape
        torch.Size([1, 84, 84])
    """

    method = "guided-backprop"
    rule = "guided"


@register
class Deconvnet(InputBackprop):
    """Deconvnet (Zeiler & Fergus) of the explained score to the input.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> Deconvnet(conv4(width=0.25).eval())(torch.rand(1, 3, 84, 84)).maps.shape
        torch.Size([1, 84, 84])
    """

    method = "deconvnet"
    rule = "deconvnet"
