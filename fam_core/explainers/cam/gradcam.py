"""Grad-CAM (Selvaraju et al., 2017), FAM paper section III-B.

a_n = (1/D) sum_ij dy/dA^n_ij                           eq. 3
L   = ReLU(sum_n a_n A^n)                               eq. 2
"""

from __future__ import annotations

import torch

from fam_core.explainers.cam.cam_common import GradientCAM
from fam_core.explainers.registry import register


@register
class GradCAM(GradientCAM):
    """Grad-CAM: channel weights are the spatially averaged gradients of the score.

    The score is the class logit for class targets and the mean similarity to the
    references for embedding targets.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> model = conv4(num_classes=5, width=0.25).eval()
        >>> explanation = GradCAM(model, "block4")(torch.rand(2, 3, 84, 84), target=[0, 3])
        >>> explanation.maps.shape, explanation.raw.shape
        (torch.Size([2, 84, 84]), torch.Size([2, 5, 5]))
    """

    method = "gradcam"

    def gradient_weights(
        self, grads: torch.Tensor, activations: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return grads.mean(dim=(2, 3)), {}  # eq. 3
