"""Eigen-CAM (Muhammad & Yeasin, 2020): the first principal direction of the activations.

A  = activations as a matrix [h*w, N]
A  = U S V^T,   v = V[:, 0]  (first right singular vector; sign with sum(v) >= 0)
L  = A v = sum_n v_n A^n

Class-agnostic: the map does not depend on the target (the score does). Like the paper
(and unlike pytorch-grad-cam, which centres A first) the activations are not centred.
"""

from __future__ import annotations

import torch

from fam_core.explainers.base import ChannelExplainer, ForwardPass
from fam_core.explainers.registry import register
from fam_core.explainers.targets import ResolvedTarget


def first_right_singular_vector(matrices: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` first right singular vector of each ``[B, M, N]``, with ``sum(v) >= 0``."""
    _, _, vh = torch.linalg.svd(matrices, full_matrices=False)
    vectors = vh[:, 0, :]
    signs = torch.where(vectors.sum(dim=1, keepdim=True) < 0, -1.0, 1.0).to(vectors)
    return vectors * signs


@register
class EigenCAM(ChannelExplainer):
    """Eigen-CAM: channel weights are the first right singular vector of the activations.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> model = conv4(width=0.25).eval()
        >>> weights = EigenCAM(model, "block4")(torch.rand(1, 3, 84, 84)).weights
        >>> round(weights.norm().item(), 4)
        1.0
    """

    method = "eigencam"

    def channel_weights(
        self, forward: ForwardPass, target: ResolvedTarget, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        activations = forward.activations.detach()
        matrices = activations.flatten(2).transpose(1, 2)  # [B, h*w, N]
        weights = first_right_singular_vector(matrices.float()).to(activations.dtype)
        return weights, self.score(forward.outputs.detach(), target), {}
