"""XGrad-CAM (Fu et al., 2020): activation-weighted gradients.

w_n = sum_ij (A^n_ij / sum_ab A^n_ab) dy/dA^n_ij        (XGrad-CAM eq. 10)
L   = ReLU(sum_n w_n A^n)                               (FAM paper eq. 2)
"""

from __future__ import annotations

import torch

from fam_core.explainers.cam.cam_common import GradientCAM
from fam_core.explainers.registry import register

_EPS = 1e-8  # added to sum_ab A_ab as torchcam does, so an all-zero channel gets weight 0


@register
class XGradCAM(GradientCAM):
    """XGrad-CAM: gradients averaged with the activations as weights.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> model = conv4(num_classes=5, width=0.25).eval()
        >>> XGradCAM(model, "block4")(torch.rand(1, 3, 84, 84), target=2).raw.shape
        torch.Size([1, 5, 5])
    """

    method = "xgradcam"

    # same step as every gradient method, a different paper's weight equation (parallel by design)
    def gradient_weights(
        self, grads: torch.Tensor, activations: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weighted = (grads * activations).sum(dim=(2, 3))
        return weighted / (activations.sum(dim=(2, 3)) + _EPS), {}
