"""Score-FAM (Wu, Chen, Che, Pu, appendix): Score-CAM's masking scores on a similarity.

M^n   = norm(up(A^n))                        mask of channel n (FAM paper, eq. 7)
X'_n  = X o M^n                              masked input
d_n   = S(F(X'_n)) - S(F(X))                 score relative to the unmasked baseline
w     = softmax_n(d_n)                       channel weights (eq. 7)
L     = ReLU(sum_n w_n A^n)                  then min-max and upsampling

``S`` is the mean similarity to the target references (FAM eq. 11; the logit for class
targets); with no target on an embedding model the reference is the unmasked image's own
embedding. Masked inputs run in batches of ``batch_size``. Channels whose map is constant
give no mask (min-max is undefined), are never run, and get weight 0 (the softmax runs over
the evaluated channels only).

``top_k``: only the ``k`` channels with the largest FAM contributions (FAM eq. 15-18) are
run. ``top_k_rest`` says what the others get: ``"baseline"`` (default) assumes they leave
the score unchanged (``d_n = 0``, the neutral value of eq. 7), ``"zero"`` drops them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from fam_core.explainers.base import ForwardPass
from fam_core.explainers.cam.cam_common import BatchedExplainer, rectified_sum
from fam_core.explainers.fam.fam import FAM
from fam_core.explainers.registry import register
from fam_core.explainers.targets import ResolvedTarget

TopKRest = Literal["baseline", "zero"]


@register
class ScoreFAM(BatchedExplainer):
    """Score-FAM: each channel's weight is the score of the input masked by that channel.

    Args:
        batch_size: masked inputs per forward pass (default 32).
        top_k: run only the ``k`` channels with the largest FAM contributions (``None``:
            all non-constant channels, the exact method).
        top_k_rest: weight of the channels ``top_k`` leaves out (module docstring).
        Other arguments: see :class:`~fam_core.explainers.base.Explainer`.

    ``Explanation.weights`` holds the softmax weights ``w_n``; ``scores`` the baseline score
    ``S(F(X))``; ``extras["differences"]`` the ``d_n`` (0 where not run) and
    ``extras["evaluated"]`` which channels ran.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> explainer = ScoreFAM(conv4(width=0.25).eval(), target_layer="block4")
        >>> explainer(torch.rand(1, 3, 84, 84)).weights.shape
        torch.Size([1, 16])
    """

    method = "scorefam"

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        batch_size: int = 32,
        top_k: int | None = None,
        top_k_rest: TopKRest = "baseline",
        **kwargs: object,
    ) -> None:
        super().__init__(model, target_layer, batch_size=batch_size, **kwargs)  # type: ignore[arg-type]
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
        ):
            raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
        if top_k_rest not in ("baseline", "zero"):
            raise ValueError(f"top_k_rest must be 'baseline' or 'zero', got {top_k_rest!r}")
        self.top_k = top_k
        self.top_k_rest: TopKRest = top_k_rest
        self._fam = FAM(  # ranks channels for top_k
            model,
            self.target_layer,
            similarity=self.similarity,
            pooling=self.pooling,
            head=self._head_spec,
            nonlinear_head=self.nonlinear_head,
            task=self._task_given,
            output=self.output,
            layout=self.layout_spec,
        )

    def channel_weights(
        self, forward: ForwardPass, target: ResolvedTarget, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        activations = forward.activations.detach()
        baseline = self.score(forward.outputs.detach(), target)  # S(F(X))
        flat = activations.flatten(2)
        varying = flat.amax(dim=2) > flat.amin(dim=2)  # constant maps are not run
        evaluated = varying
        if self.top_k is not None and self.top_k < activations.shape[1]:
            evaluated = self._top_k_channels(forward, target, varying, images)
        differences = torch.zeros_like(baseline.unsqueeze(1).expand_as(varying))
        image_index, channel_index = evaluated.nonzero().unbind(1)  # the pairs to run
        masked_scores = self.masked_scores(images, activations, target, image_index, channel_index)
        differences[image_index, channel_index] = masked_scores - baseline[image_index]
        included = varying if self.top_k_rest == "baseline" else evaluated
        logits = differences.masked_fill(~included, float("-inf"))
        weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # eq. 7; none included -> 0
        return weights, baseline, {"differences": differences, "evaluated": evaluated}

    def combine(self, weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        """``ReLU(sum_n w_n A^n)`` (eq. 7)."""
        return rectified_sum(weights, activations.detach())

    def _top_k_channels(
        self,
        forward: ForwardPass,
        target: ResolvedTarget,
        varying: torch.Tensor,
        images: torch.Tensor,
    ) -> torch.Tensor:
        """The ``top_k`` non-constant channels with the largest FAM contributions."""
        _, _, extras = self._fam.channel_weights(forward, target, images)  # FAM eq. 11-18
        channel = extras["channel_contributions"]
        ranked = channel.masked_fill(~varying, float("-inf"))
        top = ranked.topk(min(self.top_k or 1, ranked.shape[1]), dim=1).indices
        chosen = torch.zeros_like(varying).scatter_(1, top, True)
        return chosen & varying
