"""Relevance-CAM (Lee et al., CVPR 2021, https://arxiv.org/abs/2106.00090), FAM paper
section III-C, eq. 8-9.

R^(L)_n = v_t if n = t, else -v_t / (N - 1)             eq. 8  (class targets)
R_i     = sum_j (A_i w_ij)^+ / sum_i (A_i w_ij)^+  R_j  eq. 9  (z+ rule, layer by layer)
w_n     = sum_ij R^n_ij                                  relevance of channel n
L       = ReLU(sum_n w_n A^n)                            FAM paper eq. 2

The relevance starts at the explained score. A class target of a classifier starts with
eq. 8 (``contrastive=True``, the paper's choice; its relevance sums to zero) or with the
logit alone (``contrastive=False``: ``R^(L) = v_t e_t``). A reference-embedding target
explains the similarity of FAM eq. 11, linear in the embedding ``z`` (``y = <z, c>``,
:func:`~fam_core.explainers.cam.cam_common.linear_coefficients`), so the score is one more
linear layer: the exact z-rule through it gives ``R^(L)_d = z_d c_d`` (summing to ``y``),
and eq. 9 takes over from there.

Eq. 9 is the z+ rule (LRP alpha=1, beta=0): only positive contributions ``A_i w_ij`` carry
relevance, biases none, so relevance is conserved through every layer where an output has
a positive contribution. For inputs that may be negative (LeakyReLU, an embedding fed to a
classifier) the positive contributions are ``x^+ w^+ + x^- w^-``, which is ``x w^+`` for
``x >= 0``. The layers are those of the head after the target layer (global pooling, then
linear / ``BatchNorm1d`` layers, :mod:`fam_core.anatomy.head_fit`); global pooling passes the
relevance of ``z_n`` to the positions by their positive contributions
``(A_nij dz_n/dA_nij)^+`` (``A_nij / hw`` for average pooling, the maximum for max pooling).
Relevance that reaches a channel without positive contributions (a LeakyReLU channel whose
values are all negative) stops there: conservation is exact on ReLU networks.
A head found by probing (functional layers, :func:`~fam_core.anatomy.head_fit.fit_head`) is one
composed linear map, so eq. 9 runs through it as one layer. The authors' code averages the
relevance over positions where this sums it: a factor ``hw`` that min-max normalisation
removes.

Why not Captum's ``LayerLRP`` (``Alpha1_Beta0_Rule``)? It needs a rule on every leaf module
of the *whole* model, before the target layer too, and supports none of ours there:
``GlobalPool``, ``LeakyReLU``, ``BatchNorm2d`` under z+, and residual sums written as
``out + identity`` (Captum splits only an explicit ``Addition_Module``). Its rules also set
attributes on the user's modules. Here the rule runs only on the head, a few matrix
products; the tests check it against Captum's ``LayerLRP`` on a model Captum supports.
A target layer followed by layers that are not global pooling plus affine layers (a
convolution, a residual block) is refused with the layer's name: use a deeper layer.
"""

from __future__ import annotations

import torch
from torch import nn

from fam_core.anatomy.adapters import Head, linear_matrix
from fam_core.explainers.base import ChannelExplainer, ForwardPass
from fam_core.explainers.cam.cam_common import linear_coefficients
from fam_core.explainers.registry import register
from fam_core.explainers.targets import ResolvedTarget
from fam_core.maths.fam import rectified_sum


def z_plus(inputs: torch.Tensor, matrix: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """Eq. 9 through ``out = inputs @ matrix.T``: ``[B, N]`` relevance of ``inputs`` ``[B, N]``
    from ``relevance`` ``[B, J]`` of the outputs (``matrix`` ``[J, N]``).

    An output with no positive contribution passes no relevance on.

    Example:
        >>> z_plus(torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 1.0], [2.0, -1.0]]),
        ...        torch.tensor([[4.0, 5.0]]))
        tensor([[6., 3.]])
    """
    positive, negative = matrix.clamp_min(0), matrix.clamp_max(0)
    x_pos, x_neg = inputs.clamp_min(0), inputs.clamp_max(0)
    z = x_pos @ positive.T + x_neg @ negative.T  # sum_i (x_i w_ij)^+, [B, J]
    ratio = torch.where(z > 0, relevance / torch.where(z > 0, z, 1.0), 0.0)
    return x_pos * (ratio @ positive) + x_neg * (ratio @ negative)  # eq. 9


def pooled_to_positions(
    pooling: nn.Module, activations: torch.Tensor, relevance: torch.Tensor
) -> torch.Tensor:
    """Eq. 9 through global pooling: ``[B, N, h, w]`` from ``relevance`` ``[B, N]`` of the
    pooled vector, shared by each channel's positive contributions ``(A dz/dA)^+``."""
    leaf = activations.detach().requires_grad_(True)
    with torch.enable_grad():
        pooled = pooling(leaf).flatten(1)
        (grads,) = torch.autograd.grad(pooled.sum(), leaf)
    contributions = (leaf.detach() * grads).clamp_min(0)
    totals = contributions.sum(dim=(2, 3), keepdim=True)
    shares = torch.where(totals > 0, contributions / torch.where(totals > 0, totals, 1.0), 0.0)
    return shares * relevance[:, :, None, None]


def is_class_target(target: ResolvedTarget) -> bool:
    """Whether ``target`` is one class per image (one one-hot reference, dot product)."""
    references = target.references
    if target.similarity != "dot" or references.shape[1] != 1:
        return False
    return bool(((references == 0) | (references == 1)).all() and (references.sum(-1) == 1).all())


@register
class RelevanceCAM(ChannelExplainer):
    """Relevance-CAM: channels weighted by their z+ relevance for the explained score.

    Args:
        model, target_layer: as :class:`~fam_core.explainers.base.Explainer`, like the other
            options (``similarity``, ``pooling``, ``head``, ``task``...); the layers after
            ``target_layer`` must be global pooling and affine layers.
        contrastive: start a class target's relevance with eq. 8 (default, as the paper);
            ``False`` starts it with the logit alone. Reference targets are not affected.

    ``extras["relevance"]`` holds the relevance at the target layer ``[B, N, h, w]``.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> model = conv4(num_classes=5, width=0.25, activation="relu").eval()
        >>> explainer = RelevanceCAM(model, "block4", contrastive=False)
        >>> explanation = explainer(torch.rand(1, 3, 84, 84), target=2)
        >>> relevance = explanation.extras["relevance"].sum().item()  # conserved: the logit
        >>> abs(relevance - explanation.scores.item()) < 1e-4
        True
    """

    method = "relevancecam"

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        contrastive: bool = True,
        **options: object,
    ) -> None:
        super().__init__(model, target_layer, **options)  # type: ignore[arg-type]
        if not isinstance(contrastive, bool):
            raise TypeError(f"contrastive must be a bool, got {contrastive!r}")
        self.contrastive = contrastive

    @torch.no_grad()
    def channel_weights(
        self, forward: ForwardPass, target: ResolvedTarget, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        head = self.propagation_head(forward, images)
        activations, outputs = forward.activations.detach(), forward.outputs.detach()
        scores = self.score(outputs, target)
        relevance = self.output_relevance(outputs, target, scores)  # R^(L), eq. 8
        inputs = [head.pool(activations)]
        for module in head.transform:  # the forward pass through the head, layer by layer
            inputs.append(module(inputs[-1]))
        for module, layer_input in zip(
            reversed(head.transform), reversed(inputs[:-1]), strict=True
        ):
            matrix = linear_matrix(nn.Sequential(module))  # None: a pass-through layer
            if matrix is not None:
                relevance = z_plus(layer_input, matrix.to(layer_input), relevance)  # eq. 9
        at_layer = pooled_to_positions(head.pooling, activations, relevance)  # eq. 9
        weights = at_layer.sum(dim=(2, 3))
        return weights, scores, {"relevance": at_layer}

    def output_relevance(
        self, outputs: torch.Tensor, target: ResolvedTarget, scores: torch.Tensor
    ) -> torch.Tensor:
        """``R^(L)`` ``[B, D]``: eq. 8 for a class target (``contrastive``), else the exact
        z-rule through the linear score ``y = <z, c>``: ``z_d c_d``."""
        if is_class_target(target):
            one_hot = target.references[:, 0]
            relevance = one_hot * scores.unsqueeze(1)  # v_t at n = t
            classes = outputs.shape[1]
            if self.contrastive and classes > 1:  # eq. 8
                relevance = relevance - (1 - one_hot) * (scores / (classes - 1)).unsqueeze(1)
            return relevance
        return outputs * linear_coefficients(outputs, target, "Relevance-CAM")

    def propagation_head(self, forward: ForwardPass, images: torch.Tensor) -> Head:
        """The head eq. 9 runs through: global pooling and affine layers, else refused."""
        head = self.head_for(forward, images)
        if head.kind == "jacobian":
            raise ValueError(
                "Relevance-CAM propagates relevance through global pooling and affine layers; "
                f"after {self.target_layer!r} it found {head.nonlinear_layer!r} (choose the "
                "last feature layer, or use GradCAM / LIFT-CAM)"
            )
        return head

    def combine(self, weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        return rectified_sum(weights, activations)  # FAM paper eq. 2
