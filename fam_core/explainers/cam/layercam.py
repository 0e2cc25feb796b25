"""LayerCAM (Jiang et al., 2021): every location keeps its own positive gradient.

w^n_ij = ReLU(dy/dA^n_ij)                               (LayerCAM eq. 6)
L_ij   = ReLU(sum_n w^n_ij A^n_ij)                      (LayerCAM eq. 7)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fam_core.explainers.base import ForwardPass
from fam_core.explainers.cam.cam_common import GradientCAM
from fam_core.explainers.postprocess import build_explanation
from fam_core.explainers.registry import register
from fam_core.explainers.targets import Target
from fam_core.explanation import Explanation


@register
class LayerCAM(GradientCAM):
    """LayerCAM: positive gradients as pixel-wise weights.

    The weights are spatial, so ``Explanation.weights`` holds their spatial mean
    (``[B, N]``) and ``extras["pixel_weights"]`` the full ``[B, N, h, w]``.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> model = conv4(num_classes=5, width=0.25).eval()
        >>> LayerCAM(model, "block4")(torch.rand(1, 3, 84, 84), target=2).extras["pixel_weights"].shape
        torch.Size([1, 16, 5, 5])
    """

    method = "layercam"

    def explain_forward(
        self, forward: ForwardPass, target: Target, images: torch.Tensor
    ) -> Explanation:
        """The map from pixel-wise weights (eq. 6-7), which the channel weights cannot give."""
        _, grads, scores = self.target_gradients(forward, target)
        pixel_weights = grads.clamp_min(0)  # eq. 6
        raw = F.relu((pixel_weights * forward.activations.detach()).sum(dim=1))  # eq. 7
        weights = pixel_weights.mean(dim=(2, 3))
        return build_explanation(
            self, images, raw, weights, scores, {"pixel_weights": pixel_weights}
        )

    def gradient_weights(
        self, grads: torch.Tensor, activations: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The spatial mean of the pixel weights (the map itself needs all of them)."""
        return grads.clamp_min(0).mean(dim=(2, 3)), {}
