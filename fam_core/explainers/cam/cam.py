"""CAM (Zhou et al., 2016), FAM paper section III-A.

L^c = sum_n w^c_n A^n                                   eq. 1

``w^c`` is the row of the linear classifier after global average pooling. For an
embedding target the explained score is linear in the output ``y`` (dot product
``<y, r>``, or cosine with ``|y|`` held constant), so its coefficients on the output,
``r`` or ``r / (|y| |r|)`` averaged over the references, pass through the same linear
layer; a class target is the one-hot reference ``e_c`` and gives ``w^c`` exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from fam_core.anatomy.adapters import Head
from fam_core.anatomy.pooling import GlobalPool
from fam_core.explainers.base import ChannelExplainer, ForwardPass
from fam_core.explainers.cam.cam_common import linear_coefficients
from fam_core.explainers.registry import register
from fam_core.explainers.targets import ResolvedTarget
from fam_core.maths.fam import to_channels


def cam_refusal(head: Head) -> str | None:
    """Why CAM cannot read class weights from ``head`` (``None``: it can): it needs global
    average pooling then a linear classifier.

    Example:
        >>> from fam_core.anatomy.pooling import GlobalPool
        >>> cam_refusal(Head(GlobalPool("avg"), nn.Sequential(), None, "norm", "jacobian"))
        "found 'norm' after the target layer, not a linear classifier"
    """
    if head.kind == "jacobian" or head.matrix is None:
        found = head.nonlinear_layer or "no linear layer"
        return f"found {found!r} after the target layer, not a linear classifier"
    if not is_average_pooling(head.pooling):
        return f"the pooling after the target layer is {head.pooling!r}, not global average"
    return None


def is_average_pooling(pooling: nn.Module) -> bool:
    if isinstance(pooling, GlobalPool):
        return pooling.kind == "avg"
    return isinstance(pooling, nn.AdaptiveAvgPool2d) and pooling.output_size in (1, (1, 1))


@register
class CAM(ChannelExplainer):
    """Class Activation Mapping: the classifier's weights of the target weight the maps.

    Needs global average pooling right after the target layer and a linear head (the
    classifier, possibly after linear projections, composed into one matrix).

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> model = conv4(num_classes=5, width=0.25).eval()
        >>> explanation = CAM(model, "block4")(torch.rand(1, 3, 84, 84), target=2)
        >>> torch.equal(explanation.weights[0], model.fc.weight[2].detach())
        True
    """

    method = "cam"

    def channel_weights(
        self, forward: ForwardPass, target: ResolvedTarget, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        matrix = self.classifier_matrix(self.head_for(forward, images))  # [J, N]
        outputs = forward.outputs.detach()
        weights = to_channels(linear_coefficients(outputs, target, "CAM"), matrix)  # w^c, eq. 1
        scores = self.score(outputs, target)
        return weights, scores, {}

    def classifier_matrix(self, head: Head) -> torch.Tensor:
        """The linear map ``[J, N]`` from the pooled target layer to the output."""
        refusal = cam_refusal(head)
        if refusal is not None or head.matrix is None:
            raise ValueError(
                f"CAM needs global average pooling and a linear classifier after "
                f"{self.target_layer!r}; {refusal} (use GradCAM or FAM for this model)"
            )
        return head.matrix

    def refusal(self, images: torch.Tensor) -> str | None:
        """Why CAM cannot explain this model on inputs like ``images`` (``None``: it can);
        the head found is kept for later calls.

        Example:
            >>> from fam_core.models.backbones import conv4
            >>> print(CAM(conv4(num_classes=5, width=0.25).eval(), "block4").refusal(
            ...     torch.rand(1, 3, 84, 84)))
            None
        """
        images = self._check_images(images)
        return cam_refusal(self.head_for(self.forward(images), images))
