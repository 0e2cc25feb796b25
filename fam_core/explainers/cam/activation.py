"""Upsampled activation map: the plain, target-free baseline of the CAM family.

L = (1/N) sum_n A^n        (the channel mean of the target layer, upsampled)

Used as the "upsampled activation" baseline by Oramas et al. (ICLR 2019): it shows where
the layer responds, whatever the target. The score is still the target's score.
"""

from __future__ import annotations

import torch

from fam_core.explainers.base import ChannelExplainer, ForwardPass
from fam_core.explainers.registry import register
from fam_core.explainers.targets import ResolvedTarget


@register
class UpsampledActivation(ChannelExplainer):
    """Mean activation map of the target layer (equal channel weights ``1/N``).

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> model = conv4(width=0.25).eval()
        >>> UpsampledActivation(model, "block4")(torch.rand(1, 3, 84, 84)).weights[0, :2]
        tensor([0.0625, 0.0625])
    """

    method = "activation"

    def channel_weights(
        self, forward: ForwardPass, target: ResolvedTarget, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        batch, channels = forward.activations.shape[:2]
        weights = forward.activations.new_full((batch, channels), 1.0 / channels)
        return weights, self.score(forward.outputs.detach(), target), {}
