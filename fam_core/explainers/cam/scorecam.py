"""Score-CAM (Wang et al., 2020), FAM paper section III-C.

M_n = norm(up(A^n))            min-max over the upsampled map       eq. 7
X'  = X o M_n                  (Hadamard product)
w   = softmax_n(F(X'_n) - F(X))                                     eq. 7
L   = ReLU(sum_n w_n A^n)                                           eq. 7

F is the explained score (class logit, or mean similarity to the references). The masked
images of a batch are scored ``batch_size`` at a time. torchcam 0.5 normalises ``A^n`` at
the layer's resolution before upsampling (``up(norm(A^n))``); this follows the paper and
the authors' code (``norm(up(A^n))``); the two agree when the layer has the input's size.
"""

from __future__ import annotations

import torch

from fam_core.explainers.base import ForwardPass
from fam_core.explainers.cam.cam_common import BatchedExplainer, rectified_sum
from fam_core.explainers.registry import register
from fam_core.explainers.targets import ResolvedTarget


@register
class ScoreCAM(BatchedExplainer):
    """Score-CAM: each channel is weighted by the score of the image it masks.

    Args:
        model, target_layer, similarity, pooling, head, nonlinear_head, classifier: as
            :class:`~fam_core.explainers.base.Explainer`.
        batch_size: masked images per forward pass (memory / speed trade-off).

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> model = conv4(num_classes=5, width=0.25).eval()
        >>> weights = ScoreCAM(model, "block4", batch_size=8)(torch.rand(1, 3, 84, 84), 1).weights
        >>> round(weights.sum().item(), 5)  # a softmax over the channels (eq. 7)
        1.0
    """

    method = "scorecam"

    @torch.no_grad()
    def channel_weights(
        self, forward: ForwardPass, target: ResolvedTarget, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        def masked(
            activations: torch.Tensor, rows: torch.Tensor, maps: torch.Tensor
        ) -> torch.Tensor:
            return self.masked_scores(images, activations, target, rows, maps)  # F(X')

        base_scores, masked_scores = self.channel_scores(forward, target, masked)  # F(X), F(X')
        increase = masked_scores - base_scores.unsqueeze(1)
        weights = torch.softmax(increase, dim=1)  # eq. 7
        return weights, base_scores, {"score_increase": increase}

    def combine(self, weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        return rectified_sum(weights, activations)  # eq. 7
