"""FAM: Feature Activation Map (Liao, Gao, Zhang), section IV.

s_k   = s(Z', R_k)                                      eq. 14 (cosine) / similarity.py
c'_kn = contribution of channel n to s_k, / |s_k|       eq. 15
C'    = mean_k c'_k ,   S = mean_k s_k                  eq. 11
C     = W x C'^T        (head between pooling and Z')   eq. 16-18
c̄_n   = (c_n - min C) / (max C - min C)                 eq. 12
L_FAM = sum_n c̄_n A^n                                   eq. 13

The steps are the pure functions of :mod:`fam_core.maths.fam`, which the ONNX export heads
(:mod:`fam_core.exporters.heads`) call too.
"""

from __future__ import annotations

import torch

from fam_core.anatomy.adapters import Head
from fam_core.anatomy.head_fit import reproduces
from fam_core.explainers.base import ChannelExplainer, ForwardPass
from fam_core.explainers.postprocess import min_max
from fam_core.explainers.registry import register
from fam_core.explainers.targets import ResolvedTarget
from fam_core.maths.fam import fam_embedding_weights, to_channels
from fam_core.maths.similarity import channel_contributions


@register
class FAM(ChannelExplainer):
    """Feature Activation Map: channel weights are each channel's share of the similarity.

    Works on embedding models without a classifier (few-shot, kNN, retrieval, re-ID): the
    target is a set of reference embeddings, e.g. a class prototype or a gallery image.
    On a classifier, a class target is the one-hot reference scored by the dot product,
    and FAM's weights become the classifier's weights of that class (CAM, eq. 1).

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> model = conv4().eval()
        >>> explainer = FAM(model, target_layer="block4")
        >>> refs = explainer.embed(torch.rand(2, 3, 84, 84))
        >>> explanation = explainer(torch.rand(3, 3, 84, 84), target=refs)
        >>> explanation.maps.shape, explanation.weights.shape
        (torch.Size([3, 84, 84]), torch.Size([3, 64]))
    """

    method = "fam"
    uses_head = True

    def channel_weights(
        self, forward: ForwardPass, target: ResolvedTarget, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        contributions, pair_scores = self.pair_contributions(forward.outputs, target)
        _, embedding_weights = fam_embedding_weights(contributions, scores=pair_scores)  # 15, 11
        head = self.head_for(forward, images)
        channel = self.to_channels(embedding_weights, forward, images)  # eq. 18, [B, N]
        return (
            self.normalise(channel),  # eq. 12
            pair_scores.mean(dim=1),  # eq. 11
            {
                "contributions": contributions.mean(dim=1),
                "channel_contributions": channel,
                "head": head.kind or "linear",
            },
        )

    def pair_contributions(
        self, outputs: torch.Tensor, target: ResolvedTarget
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each channel's contribution ``[B, K, D]`` to ``s(Z', R_k)`` (eq. 14-15) and the
        pairs' scores ``[B, K]`` (their sum). Variants override this step."""
        contributions = channel_contributions(outputs, target.references, target.similarity)
        return contributions, contributions.sum(dim=2)

    def normalise(self, channel: torch.Tensor) -> torch.Tensor:
        """Eq. 12: min-max of the channel weights ``[B, N]``. Variants override this step."""
        return min_max(channel, dim=1)

    def to_channels(
        self, embedding_weights: torch.Tensor, forward: ForwardPass, images: torch.Tensor
    ) -> torch.Tensor:
        """Map weights on the embedding ``[B, J]`` to the target layer's channels ``[B, N]``."""
        channels = forward.activations.shape[1]
        head = self.head_for(forward, images)
        if head.kind == "jacobian":
            if self.nonlinear_head == "error":
                raise ValueError(
                    f"the head after {self.target_layer!r} is not linear "
                    f"(layer {head.nonlinear_layer!r}); FAM's eq. 18 needs a linear head: pass "
                    "head= with its linear part, or nonlinear_head='jacobian' to linearise it"
                )
            if isinstance(self._head_spec, str):  # the model's own head, through autograd
                return self.head_jacobian_product(forward, embedding_weights, images)
            jacobian = head.jacobian(head.pool(forward.activations).detach())  # [B, J, N]
            return torch.einsum("bj,bjn->bn", embedding_weights, jacobian)
        self._check_head(head, forward)
        if head.matrix is None:
            if embedding_weights.shape[1] != channels:
                raise ValueError(
                    f"the embedding has {embedding_weights.shape[1]} dimensions but layer "
                    f"{self.target_layer!r} has {channels} channels and no linear head follows it"
                )
            return embedding_weights
        return to_channels(embedding_weights, head.matrix)  # C = W x C'^T (eq. 18)

    def _check_head(self, head: Head, forward: ForwardPass) -> None:
        """The head must reproduce the model's output, or eq. 18 maps the wrong thing."""
        with torch.no_grad():
            predicted = head.transform(head.pool(forward.activations.detach()))
        if not reproduces(predicted.to(forward.outputs.dtype), forward.outputs):
            raise ValueError(
                f"the head after {self.target_layer!r} ({head.kind}) does not reproduce the "
                "model's output: pass head= explicitly"
            )
