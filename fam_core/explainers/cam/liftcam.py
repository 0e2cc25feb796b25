"""LIFT-CAM (Jung and Oh, ICCV 2021, https://arxiv.org/abs/2102.05228), FAM paper
section III-C, eq. 10.

C^n_ij = DeepLIFT contribution of A^n_ij to y, reference A' = 0       (rescale rule)
a_n    = sum_ij C^n_ij  ~ the SHAP value of channel n                 eq. 10
L      = ReLU(sum_n a_n A^n)                                          FAM paper eq. 2

DeepLIFT is Captum's ``DeepLift`` (rescale rule) on the part of the model after the target
layer, with the activations as its input and zeros as its reference, as the authors' code
does. That part is the head :mod:`fam_core.anatomy.head_fit` found when it reproduces the output
(global pooling and affine layers: a few small matrix products), else the whole model with
the target layer's output replaced (:meth:`~fam_core.explainers.base.Explainer.run_with`;
Captum applies the rescale rule to the nonlinearities it hooks: ReLU, LeakyReLU, ELU,
Sigmoid, Tanh, Softplus, max pooling, softmax; other operations pass gradients).

The explained output ``y`` is the class logit for class targets and, for reference
embeddings, the similarity of FAM eq. 11 in its linear form ``y = <z, c>``
(:func:`~fam_core.explainers.cam.cam_common.linear_coefficients`), a last linear layer
DeepLIFT treats exactly. On an affine head the contributions are exact,
``C^n_ij = A^n_ij dy/dA^n_ij`` and ``sum_n a_n = y(A) - y(0)``: after global average
pooling and a linear classifier, ``a_n = w^c_n mean(A^n)`` and ``sum_n C^n`` is the CAM
map divided by ``hw``. The contributions are kept in ``extras["contributions"]``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fam_core.explainers.base import ChannelExplainer, Explainer, ForwardPass
from fam_core.explainers.cam.cam_common import linear_coefficients
from fam_core.explainers.registry import register
from fam_core.explainers.targets import ResolvedTarget
from fam_core.extras import require
from fam_core.maths.fam import rectified_sum


class ScoreAfterLayer(nn.Module):
    """``maps -> y = <f(maps), c>``: the explained score as a function of the target layer's
    maps, the module Captum's ``DeepLift`` attributes (its nonlinear submodules are hooked).

    ``forward(maps, images, coefficients)`` takes the images (only the whole-model path
    uses them) and ``c`` ``[B, D]`` per row, so Captum repeats them with the reference rows.
    """

    def __init__(self, explainer: Explainer, forward: ForwardPass, images: torch.Tensor) -> None:
        super().__init__()
        head = explainer.head_for(forward, images)
        self.explainer = explainer
        self.exact = head.kind != "jacobian"
        # the modules Captum hooks: the head's, or the whole model's
        self.layers = nn.ModuleList([head.pooling, head.transform] if self.exact else [])
        self.model = None if self.exact else explainer.model

    def forward(
        self, maps: torch.Tensor, images: torch.Tensor, coefficients: torch.Tensor
    ) -> torch.Tensor:
        if self.exact:
            pooling, transform = self.layers
            outputs = self.explainer._as_vectors(transform(pooling(maps).flatten(1)))
        else:
            outputs = self.explainer.run_with(images, maps)
        return (outputs * coefficients.to(outputs)).sum(dim=1)  # y = <z, c>


@register
class LiftCAM(ChannelExplainer):
    """LIFT-CAM: channels weighted by their DeepLIFT contributions (approximate SHAP values).

    Needs the ``captum`` extra (:class:`~fam_core.extras.MissingExtraError` when it is
    built without it). ``extras["contributions"]`` holds ``C`` ``[B, N, h, w]``.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> model = conv4(num_classes=5, width=0.25).eval()
        >>> images = torch.rand(1, 3, 84, 84)
        >>> explanation = LiftCAM(model, "block4")(images, target=2)
        >>> delta = model(images)[0, 2] - model.fc.bias[2]  # y(A) - y(0): DeepLIFT's sum
        >>> abs(explanation.weights.sum().item() - delta.item()) < 1e-4
        True
    """

    method = "liftcam"

    def __init__(
        self, model: nn.Module, target_layer: str | nn.Module | None = None, **options: object
    ) -> None:
        self._deep_lift = require("captum", "captum.attr").DeepLift  # before any work
        super().__init__(model, target_layer, **options)  # type: ignore[arg-type]

    def channel_weights(
        self, forward: ForwardPass, target: ResolvedTarget, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        outputs, maps = forward.outputs.detach(), forward.activations.detach()
        coefficients = linear_coefficients(outputs, target, "LIFT-CAM")
        score = ScoreAfterLayer(self, forward, images)
        with warnings.catch_warnings():  # Captum announces its (temporary) hooks every call
            warnings.filterwarnings("ignore", message="Setting forward, backward hooks")
            contributions = self._deep_lift(score).attribute(
                maps.clone().requires_grad_(True),
                baselines=torch.zeros_like(maps),  # reference activation A' = 0
                additional_forward_args=(images, coefficients),
            )
        weights = contributions.sum(dim=(2, 3))  # eq. 10
        return weights, self.score(outputs, target), {"contributions": contributions}

    def combine(self, weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        return rectified_sum(weights, activations)  # FAM paper eq. 2
