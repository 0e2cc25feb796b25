"""L2-CAF (Taha, Yang, Shrivastava, Davis): a constrained attention filter, optimised.

One filter ``f`` of the target layer's spatial size ``h x w`` is shared by all channels:

    A_f   = A * f / ||f||_2                                  filtered activations
    NT    = F_tail(A),  FT = F_tail(A_f)                     outputs without / with filter
    loss  = mean_j (FT_j - NT_j)^2                           class-oblivious (target None)
          = sum_{j != c} FT_j - FT_c                         class-specific (class target c)
          = -mean_k s(FT, R_k)                               targeted, reference embeddings
    map   = |f| / ||f||_2                                    upsampled, min-max

Settled details (seeds README, from the authors' code): ``f`` starts at ones; plain SGD with
lr 0.5 decayed linearly to 0 over ``iterations`` (1000); every ``check_every`` (50)
iterations the loss is compared with the last check and optimisation stops when no image's
loss moved by more than ``tolerance`` (1e-6). A batch optimises one filter per image, all
together (the losses are independent, so the summed loss gives each filter its own
gradient).

Fast mode (default) computes ``A`` once and runs only the part of the network after the
target layer: the model's top-level children after it, or the head found from the dataflow
when it is linear (:mod:`fam_core.head_fit`), each checked to reproduce the model's output.
Where neither does (a nested layer followed by more blocks), it falls back on its own to
the slow mode, which runs the whole model each iteration with the filtered ``A``
substituted by a temporary forward hook. ``extras["tail"]`` says which ran: ``"children"``,
``"head"`` or ``"model"``.
"""

from __future__ import annotations

import torch
from torch import nn

from fam_core.explainers.base import Explainer, ForwardPass, Target, upsample
from fam_core.explainers.registry import register
from fam_core.explanation import Explanation
from fam_core.head_fit import reproduces


@register
class L2CAF(Explainer):
    """L2-CAF: the map is the optimised, L2-normalised spatial filter (module docstring).

    Args:
        iterations: maximum SGD iterations (default 1000).
        lr: initial learning rate, decayed linearly to 0 (default 0.5).
        check_every: iterations between convergence checks (default 50).
        tolerance: stop when no loss changed by more than this between checks (1e-6).
        fast: optimise through the layers after the target layer only (default True).
        Other arguments: see :class:`~fam_core.explainers.base.Explainer`.

    ``Explanation.raw`` is ``|f| / ||f||_2`` ``[B, h, w]``; ``weights`` is ones ``[B, N]``
    (the filter scales every channel alike); ``scores`` the final loss per image;
    ``extras``: ``"filter"`` (signed ``f / ||f||``), ``"initial_loss"``, ``"iterations"``.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> explainer = L2CAF(conv4(width=0.25).eval(), "block4", iterations=20)
        >>> explainer(torch.rand(2, 3, 84, 84)).raw.shape
        torch.Size([2, 5, 5])
    """

    method = "l2caf"

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        iterations: int = 1000,
        lr: float = 0.5,
        check_every: int = 50,
        tolerance: float = 1e-6,
        fast: bool = True,
        **kwargs: object,
    ) -> None:
        super().__init__(model, target_layer, **kwargs)  # type: ignore[arg-type]
        for name, value in (("iterations", iterations), ("check_every", check_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, number in (("lr", lr), ("tolerance", tolerance)):
            if isinstance(number, bool) or not isinstance(number, int | float) or number < 0:
                raise ValueError(f"{name} must be a non-negative number, got {number!r}")
        if not isinstance(fast, bool):
            raise TypeError(f"fast must be a bool, got {fast!r}")
        self.iterations, self.lr = iterations, float(lr)
        self.check_every, self.tolerance, self.fast = check_every, float(tolerance), fast

    def __call__(self, images: torch.Tensor, target: Target = None) -> Explanation:
        """Optimise one filter per image of ``images`` for ``target`` (module docstring)."""
        images = self._check_images(images)
        forward = self.forward(images)
        activations, original = forward.activations.detach(), forward.outputs.detach()
        loss_of = self._objective(target, original)
        tail, run_tail = "model", self._full(images)
        if self.fast:
            tail, run_tail = self._tail(forward, images) or (tail, run_tail)
        batch, _, height, width = activations.shape
        filters = activations.new_ones(batch, height, width, requires_grad=True)
        optimizer = torch.optim.SGD([filters], lr=self.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1.0 - step / self.iterations)
        )
        previous: torch.Tensor | None = None
        initial = losses = original.new_zeros(batch)
        done = 0
        for step in range(self.iterations):
            with torch.enable_grad():
                unit = filters / filters.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)
                losses = loss_of(run_tail(activations * unit.unsqueeze(1)))
                (filters.grad,) = torch.autograd.grad(losses.sum(), filters)
            if step == 0:
                initial = losses.detach()
            optimizer.step()
            schedule.step()
            done = step + 1
            if step % self.check_every == 0:
                current = losses.detach()
                if previous is not None and (current - previous).abs().max() < self.tolerance:
                    break
                previous = current
        final = filters.detach()
        unit = final / final.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)
        raw = unit.abs()  # map = |f| / ||f||_2
        return Explanation(
            maps=upsample(raw, images.shape[-2:]),
            raw=raw,
            weights=activations.new_ones(activations.shape[:2]),
            scores=losses.detach(),
            method=self.method,
            target_layer=self.target_layer,
            extras={
                "filter": unit,
                "initial_loss": initial,
                "iterations": torch.full((batch,), done, device=raw.device),
                "tail": tail,
            },
        )

    def _objective(self, target: Target, original: torch.Tensor):  # noqa: ANN202
        """Per-image loss ``[B]`` of the filtered outputs (module docstring)."""
        if target is None:
            return lambda outputs: (outputs - original).square().mean(dim=1)
        resolved = self.resolve_target(target, original)
        if resolved.similarity == "dot" and not (
            isinstance(target, torch.Tensor) and target.is_floating_point()
        ):  # class target c: other logits minus the target logit
            one_hot = resolved.references[:, 0, :]

            def class_specific(outputs: torch.Tensor) -> torch.Tensor:
                target_logit = (outputs * one_hot).sum(dim=1)
                return outputs.sum(dim=1) - 2 * target_logit

            return class_specific
        return lambda outputs: -self.score(outputs, resolved)

    def _tail(self, forward: ForwardPass, images: torch.Tensor):  # noqa: ANN202
        """``(kind, run)``: the network after the target layer as one function of the maps,
        or ``None`` when no shortcut reproduces the model's output."""
        activations, original = forward.activations.detach(), forward.outputs.detach()
        children = list(self.model.named_children())
        names = [name for name, _ in children]
        if self.target_layer in names and forward.layout.kind == "channels_first":
            after = [module for _, module in children[names.index(self.target_layer) + 1 :]]

            def run_children(features: torch.Tensor) -> torch.Tensor:
                for module in after:
                    features = module(features)
                return self._as_vectors(features)

            with torch.no_grad():
                try:
                    reproduced = run_children(activations)
                except (RuntimeError, TypeError, ValueError):
                    reproduced = None
            if reproduced is not None and reproduces(reproduced, original):
                return "children", run_children
        head = self.head_for(forward, images)
        if head.kind in ("identity", "linear"):

            def run_head(features: torch.Tensor) -> torch.Tensor:
                return head.transform(head.pool(features))

            with torch.no_grad():
                if reproduces(run_head(activations), original):
                    return "head", run_head
        return None

    def _full(self, images: torch.Tensor):  # noqa: ANN202
        """The whole model with the target layer's maps replaced (slow mode)."""
        return lambda filtered: self.run_with(images, filtered)
