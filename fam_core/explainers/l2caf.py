"""L2-CAF (Taha, Yang, Shrivastava, Davis): a constrained attention filter, optimised.

Paper: https://arxiv.org/abs/2007.09748. One filter ``f`` of the target layer's spatial size
``h x w`` is shared by all channels:

    A_f   = A * f / ||f||_2                                  filtered activations
    NT    = F_tail(A),  FT = F_tail(A_f)                     outputs without / with filter
    S     = ||NT - F_tail(0)||                               what the layer adds to the output
    loss  = ||FT - NT||^2 / S^2                              class-oblivious (target None)
          = (sum_{j != c} FT_j - FT_c) / S                   class-specific (class target c)
          = mean_k <FT - NT, r_k>^2 / S^2,                   targeted: reference embeddings
            r_k = R_k / ||R_k||                              R_1..R_K
    map   = |f| / ||f||_2                                    upsampled, min-max

The targeted loss asks the filter to keep the original output's component along each
reference: the part of the output that the match with ``R_k`` reads. It replaces
``-mean_k s(FT, R_k)``, which is scale-invariant (``s(a FT, R) = s(FT, R)`` for the cosine):
the constraint ``||f / ||f|| || = 1`` then costs nothing, cells with zero activations get no
gradient, and the filter stays at its uniform start. Matching a component, like the
class-oblivious MSE, is not scale-invariant: with a unit-norm filter the output can only
keep its size by putting the filter's mass where the activations that make it are. (The
other remedy, the authors' constraint as in their code, is what ``f / ||f||`` already is;
it is the loss that lacked scale.)

Units (a deviation from the authors' code, which minimises the plain MSE of ImageNet logits
with lr 0.5): every loss is divided by ``S``, the size of what the target layer adds to the
output (the output minus the output of an all-zero filter, i.e. without a head's bias;
squared for the squared losses), so the same learning rate moves the filter alike for a
model whose outputs are unit-norm embeddings or logits of size 10; the plain losses made
L2-CAF stop after 50 iterations on small outputs (change below ``tolerance``) with a
near-uniform filter. ``S`` costs one more pass of the tail.
On these units the default ``lr`` is 2: with 0.5, the cells that carry nothing still keep
30 % of the filter's energy after 1000 iterations on the quadrant model of
``tests/explainers/test_quadrant.py`` (99 % goes to the quadrant with 2).

Settled details (seeds README, from the authors' code): ``f`` starts at ones; plain SGD with
lr decayed linearly to 0 over ``iterations`` (1000); every ``check_every`` (50)
iterations the loss is compared with the last check and optimisation stops when no image's
loss moved by more than ``tolerance`` (1e-6). A batch optimises one filter per image, all
together (the losses are independent, so the summed loss gives each filter its own
gradient).

Fast mode (default) computes ``A`` once and runs only the part of the network after the
target layer: the model's top-level children after it, or the head found from the dataflow
when it is linear (:mod:`fam_core.anatomy.head_fit`), each checked to reproduce the model's output.
Where neither does (a nested layer followed by more blocks), it falls back on its own to
the slow mode, which runs the whole model each iteration with the filtered ``A``
substituted by a temporary forward hook. ``extras["tail"]`` says which ran: ``"children"``,
``"head"`` or ``"model"``.
"""

from __future__ import annotations

import torch
from torch import nn

from fam_core.anatomy.head_fit import reproduces
from fam_core.explainers.base import Explainer, ForwardPass
from fam_core.explainers.postprocess import upsample
from fam_core.explainers.registry import register
from fam_core.explainers.targets import Target
from fam_core.explanation import Explanation


@register
class L2CAF(Explainer):
    """L2-CAF: the map is the optimised, L2-normalised spatial filter (module docstring).

    Args:
        iterations: maximum SGD iterations (default 1000).
        lr: initial learning rate, decayed linearly to 0 (default 2; module docstring).
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

    # the one construction every method has (Explainer): only the method's options differ
    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        iterations: int = 1000,
        lr: float = 2.0,
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
        tail, run_tail = "model", self._full(images)
        if self.fast:
            tail, run_tail = self._tail(forward, images) or (tail, run_tail)
        with torch.no_grad():  # ||NT - F_tail(0)||: what the target layer adds to the output
            size = (original - run_tail(torch.zeros_like(activations))).norm(dim=1)
        loss_of = self._objective(target, original, size.clamp_min(1e-12))
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

    def _objective(self, target: Target, original: torch.Tensor, size: torch.Tensor):  # noqa: ANN202
        """Per-image loss ``[B]`` of the filtered outputs ``FT``, in units of ``size``
        ``[B]`` (module docstring)."""
        if target is None:  # class-oblivious: ||FT - NT||^2 / S^2
            return lambda outputs: (outputs - original).square().sum(dim=1) / size.square()
        resolved = self.resolve_target(target, original)
        if resolved.similarity == "dot" and not (
            isinstance(target, torch.Tensor) and target.is_floating_point()
        ):  # class-specific: (sum_{j != c} FT_j - FT_c) / S
            one_hot = resolved.references[:, 0, :]

            def class_specific(outputs: torch.Tensor) -> torch.Tensor:
                target_logit = (outputs * one_hot).sum(dim=1)
                return (outputs.sum(dim=1) - 2 * target_logit) / size

            return class_specific
        # targeted: mean_k <FT - NT, r_k / ||r_k||>^2 / S^2
        references = resolved.references
        directions = references / references.norm(dim=2, keepdim=True).clamp_min(1e-12)
        kept = (directions * original.unsqueeze(1)).sum(dim=2)  # <NT, r_k / ||r_k||>, [B, K]

        def targeted(outputs: torch.Tensor) -> torch.Tensor:
            along = (directions * outputs.unsqueeze(1)).sum(dim=2)  # <FT, r_k / ||r_k||>
            return (along - kept).square().mean(dim=1) / size.square()

        return targeted

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
