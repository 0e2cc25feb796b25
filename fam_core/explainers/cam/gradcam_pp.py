"""Grad-CAM++ (Chattopadhay et al., 2018), with the exponential-score closed form.

g      = dy/dA (FAM paper eq. 3, 5)
alpha  = g^2 / (2 g^2 + g^3 sum_ab A_ab)   where g != 0, else 0     (Grad-CAM++ eq. 19)
w_n    = sum_ij alpha_ij ReLU(g_ij)                                 (Grad-CAM++ eq. 7)
L      = ReLU(sum_n w_n A^n)                                        (FAM paper eq. 2)

torchcam 0.5's ``GradCAMpp`` differs: its denominator sums ``A_ab g^3_ab`` over the map
instead of ``g^3_ij sum_ab A_ab``, and its division by the denominator runs on a copy
(``alpha[mask].div_``), so its alpha stays ``g^2``. Both agree with this formula only
when the gradient is constant over the map (the target layer feeds global average
pooling and a linear layer) *and* the division is applied, which torchcam's
``SmoothGradCAMpp`` does; the tests compare with that and with a hand computation.
"""

from __future__ import annotations

import torch

from fam_core.explainers.cam.cam_common import GradientCAM
from fam_core.explainers.registry import register


@register
class GradCAMPlusPlus(GradientCAM):
    """Grad-CAM++: pixel-wise weighted positive gradients.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> model = conv4(num_classes=5, width=0.25).eval()
        >>> GradCAMPlusPlus(model, "block4")(torch.rand(1, 3, 84, 84), target=2).weights.shape
        torch.Size([1, 16])
    """

    method = "gradcam++"

    # same step as every gradient method, a different paper's weight equation (parallel by design)
    def gradient_weights(
        self, grads: torch.Tensor, activations: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        grads_2 = grads.square()
        grads_3 = grads_2 * grads
        totals = activations.sum(dim=(2, 3), keepdim=True)
        denominator = 2 * grads_2 + grads_3 * totals
        safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
        alpha = torch.where(grads != 0, grads_2 / safe, torch.zeros_like(grads))  # eq. 19
        weights = (alpha * grads.clamp_min(0)).sum(dim=(2, 3))  # eq. 7
        return weights, {"alpha": alpha}
