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
import torch.nn.functional as F

from fam_core.explainers.base import ForwardPass, ResolvedTarget, min_max
from fam_core.explainers.cam_common import (
    BatchedExplainer,
    chunks,
    rectified_sum,
    select_references,
)
from fam_core.explainers.registry import register


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
        >>> ScoreCAM(model, "block4", batch_size=8)(torch.rand(1, 3, 84, 84), 1).weights.sum()
        tensor(1.)
    """

    method = "scorecam"

    @torch.no_grad()
    def channel_weights(
        self, forward: ForwardPass, target: ResolvedTarget, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        activations = forward.activations.detach()
        batch, channels = activations.shape[:2]
        base_scores = self.score(forward.outputs.detach(), target)  # F(X)
        masks = activations.flatten(0, 1).unsqueeze(1)  # [B*N, 1, h, w]
        rows = torch.arange(batch, device=images.device).repeat_interleave(channels)
        masked_scores = base_scores.new_empty(batch * channels)
        for part in chunks(batch * channels, self.batch_size):
            upsampled = F.interpolate(
                masks[part], size=images.shape[-2:], mode="bilinear", align_corners=False
            )
            normalised = min_max(upsampled, dim=(2, 3))  # M_n = norm(up(A^n))
            masked = images[rows[part]] * normalised  # X' = X o M_n
            outputs = self._as_vectors(self.model(masked))
            masked_scores[part] = self.score(outputs, select_references(target, rows[part]))
        increase = masked_scores.view(batch, channels) - base_scores.unsqueeze(1)
        weights = torch.softmax(increase, dim=1)  # eq. 7
        return weights, base_scores, {"score_increase": increase}

    def combine(self, weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        return rectified_sum(weights, activations)  # eq. 7
