"""Guided Grad-CAM (Selvaraju et al., 2017): guided backprop times the upsampled Grad-CAM.

G   = guided-backprop gradient dy/dX at input resolution  [B, C, H, W]   (guided.py)
L   = ReLU(sum_n a_n A^n)  (Grad-CAM, FAM paper eq. 2-3), upsampled bilinearly to H x W
E   = G o up(L)            per input channel (``extras["attributions"]``, as Captum's)
map = max_c |E_c|          then min-max normalised

The map is at input resolution, so ``Explanation.raw`` is ``max_c |E_c|`` ``[B, H, W]``
(not at the layer's resolution); ``extras["gradcam"]`` keeps the layer-resolution Grad-CAM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fam_core.explainers.backprop.guided import guided_backprop
from fam_core.explainers.base import ForwardPass
from fam_core.explainers.cam.cam_common import GradientCAM, explained_score
from fam_core.explainers.postprocess import min_max
from fam_core.explainers.registry import register
from fam_core.explainers.targets import Target
from fam_core.explanation import Explanation


@register
class GuidedGradCAM(GradientCAM):
    """Guided Grad-CAM: a fine-grained, class-discriminative map at input resolution.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> model = conv4(num_classes=5, width=0.25).eval()
        >>> explanation = GuidedGradCAM(model, "block4")(torch.rand(1, 3, 84, 84), target=2)
        >>> explanation.raw.shape, explanation.extras["attributions"].shape
        (torch.Size([1, 84, 84]), torch.Size([1, 3, 84, 84]))
    """

    method = "guided-gradcam"

    def explain_forward(
        self, forward: ForwardPass, target: Target, images: torch.Tensor
    ) -> Explanation:
        """Grad-CAM from ``forward`` times guided backprop to ``images`` (module docstring)."""
        resolved, grads, scores = self.target_gradients(forward, target)
        weights, _ = self.gradient_weights(grads, forward.activations.detach())
        gradcam = self.combine(weights, forward.activations.detach())  # eq. 2
        guided = guided_backprop(
            self.model, images, lambda out: explained_score(self, self._as_vectors(out), resolved)
        )
        upsampled = F.interpolate(
            gradcam.unsqueeze(1), size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        attributions = guided * upsampled
        raw = attributions.abs().amax(dim=1)
        return Explanation(
            maps=min_max(raw, dim=(1, 2)).float(),
            raw=raw.detach(),
            weights=weights.detach(),
            scores=scores.detach(),
            method=self.method,
            target_layer=self.target_layer,
            extras={
                "attributions": attributions.detach(),
                "guided_backprop": guided.detach(),
                "gradcam": gradcam.detach(),
            },
        )

    def gradient_weights(
        self, grads: torch.Tensor, activations: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Grad-CAM's weights (eq. 3)."""
        return grads.mean(dim=(2, 3)), {}
