"""Grad-FAM (Wu, Chen, Che, Pu, appendix): Grad-CAM's gradients on a similarity score.

S     = mean_k s(Z, R_k)                     score explained (FAM eq. 11)
a_n   = 1/(hw) sum_ij dS / dA^n_ij           channel weight (Grad-CAM eq. 3)
L     = ReLU(sum_n a_n A^n)                  map (Grad-CAM eq. 2), then min-max and upsampling

Analytic path. When the head after the target layer is a global pooling ``p`` followed by
affine layers ``Z = W p(A) + b``, the chain rule gives

    sum_ij dS/dA^n_ij = (dS/dZ W)_n * sum_ij dp_n/dA^n_ij

and ``sum_ij dp_n / dA^n_ij`` is 1 for average, max and log-sum-exp pooling, and
``p_n^(1-q) mean_ij(A^n_ij^(q-1))`` for GeM with exponent ``q``. ``dS/dZ`` has a closed form
for each similarity (see :func:`similarity_gradient`). No backward pass runs; the result
equals autograd's (tested to 1e-5). Other heads fall back to autograd.

No target on an embedding model: the cosine of ``Z`` with itself is constant (zero
gradient), so Grad-FAM's weights are the gradient of the projection of ``Z`` on its own
(detached) direction, ``<Z, sg(Z)/|sg(Z)|>``, which is ``Z / |Z|``. The explained score it
reports is still the similarity of ``Z`` to itself, ``s(Z, Z)`` (1 for the cosine), as FAM
reports for the same target.
"""

from __future__ import annotations

import torch
from torch import nn

from fam_core.anatomy.adapters import Head
from fam_core.anatomy.head_fit import reproduces
from fam_core.anatomy.pooling import global_pooling_kind
from fam_core.explainers.base import ChannelExplainer, ForwardPass
from fam_core.explainers.registry import register
from fam_core.explainers.targets import ResolvedTarget
from fam_core.maths.fam import rectified_sum, to_channels
from fam_core.maths.similarity import similarity_gradient

_EPS = 1e-12


def self_projection_score(outputs: torch.Tensor) -> tuple[torch.Tensor, ResolvedTarget]:
    """Score and target used when an embedding explains itself: ``S = <Z, sg(Z)/|sg(Z)|>``.

    Returns the scores ``[B]`` (equal to ``|Z|``) and the equivalent target: the unit
    direction of ``Z`` as a reference, scored by the dot product.

    Example:
        >>> scores, target = self_projection_score(torch.tensor([[3.0, 4.0]]))
        >>> scores, target.references
        (tensor([5.]), tensor([[[0.6000, 0.8000]]]))
    """
    direction = outputs.detach() / outputs.detach().norm(dim=1, keepdim=True).clamp_min(_EPS)
    target = ResolvedTarget(direction.unsqueeze(1), "dot")
    return (outputs * direction).sum(dim=1), target


def pooling_gradient_sums(pooling: nn.Module, activations: torch.Tensor) -> torch.Tensor | None:
    """``sum_ij dp_n / dA^n_ij`` ``[B, N]`` for a known global pooling, else ``None``."""
    kind = global_pooling_kind(pooling)
    if kind in ("avg", "max", "lse"):
        return activations.new_ones(activations.shape[:2])
    if kind == "gem":
        q = pooling.p  # type: ignore[union-attr]
        powered = activations.flatten(2).clamp_min(1e-6)
        mean_q = powered.pow(q).mean(dim=2)
        inside = (activations.flatten(2) > 1e-6).to(activations.dtype)
        return mean_q.pow(1.0 / q - 1.0) * (inside * powered.pow(q - 1)).mean(dim=2)
    return None


@register
class GradFAM(ChannelExplainer):
    """Grad-FAM: channel weights are spatial means of ``dS/dA`` (module docstring).

    Args:
        analytic: ``None`` (default) uses the closed-form gradient when the head is a
            global pooling plus affine layers and autograd otherwise; ``True`` requires the
            closed form (``ValueError`` if the head does not allow it); ``False`` always
            runs autograd.
        Other arguments: see :class:`~fam_core.explainers.base.Explainer`.

    ``Explanation.weights`` holds ``a_n``; ``scores`` the explained ``S``: the similarity to
    the target in its own range, as FAM reports it (``s(Z, Z)`` when an embedding explains
    itself, the logit for class targets).

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> explainer = GradFAM(conv4().eval(), target_layer="block4")
        >>> explainer(torch.rand(2, 3, 84, 84)).maps.shape
        torch.Size([2, 84, 84])
    """

    method = "gradfam"

    # the one construction every method has (Explainer): only the method's options differ
    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        analytic: bool | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(model, target_layer, **kwargs)  # type: ignore[arg-type]
        self._closed_form: dict[tuple[int, ...], bool] = {}
        if analytic not in (None, True, False):
            raise TypeError(f"analytic must be None, True or False, got {analytic!r}")
        possible = self._analytic_head_supported()
        if analytic is True and not possible:
            raise ValueError(
                f"analytic=True needs a head of one global pooling plus affine layers after "
                f"{self.target_layer!r}; this model's head is not (first non-affine layer: "
                f"{self.head.nonlinear_layer!r}); use analytic=None or False"
            )
        self.analytic = possible if analytic is None else analytic
        self.needs_gradients = not self.analytic  # type: ignore[misc]

    def _analytic_head_supported(self) -> bool:
        try:
            head = self.head
        except (ValueError, TypeError):
            return False
        if head.nonlinear_layer is not None:
            return False
        if head.matrix is None and not head.is_identity:
            return False
        probe = torch.zeros(1, 1, 2, 2)
        return pooling_gradient_sums(head.pooling, probe) is not None

    def channel_weights(
        self, forward: ForwardPass, target: ResolvedTarget, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        outputs, activations = forward.outputs, forward.activations
        explained = self.score(outputs, target)  # FAM's S (eq. 11) for this target
        scores = explained
        if target.explains_self:  # s(Z, Z) is constant: its gradient is the projection's
            scores, target = self_projection_score(outputs)
        hw = activations.shape[2] * activations.shape[3]
        head = self.head_for(forward, images) if self.analytic else None
        if head is None or not self._head_allows_closed_form(head, forward):
            if not forward.activations.requires_grad:  # the head is not what it seemed
                forward = self.forward(images, graph=True)
                scores = self.score(forward.outputs, target)  # a self target is resolved above
            weights = self.gradients(forward, scores).sum(dim=(2, 3)) / hw  # eq. 3
            return weights, explained, {}
        d_embedding = similarity_gradient(outputs, target.references, target.similarity)
        matrix = head.matrix
        d_pooled = to_channels(d_embedding, matrix)  # W^T dS/dz'
        if d_pooled.shape[1] != activations.shape[1]:
            raise ValueError(
                f"the embedding has {d_embedding.shape[1]} dimensions but layer "
                f"{self.target_layer!r} has {activations.shape[1]} channels and no linear "
                "head maps one onto the other"
            )
        sums = pooling_gradient_sums(head.pooling, activations)
        assert sums is not None  # guaranteed by _head_allows_closed_form
        return d_pooled * sums / hw, explained, {}  # eq. 3 by the chain rule

    def combine(self, weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        """``ReLU(sum_n a_n A^n)`` (Grad-CAM eq. 2)."""
        return rectified_sum(weights, activations.detach())

    def _head_allows_closed_form(self, head: Head, forward: ForwardPass) -> bool:
        """A linear (or identity) head with a known pooling gradient that reproduces the
        model's output. A head found from the dataflow (``head="auto"``) is checked once per
        map shape (it reproduces the outputs by construction; a traced graph cannot branch
        on the check), a head given by hand on every call."""
        if (
            head.kind == "jacobian"
            or pooling_gradient_sums(head.pooling, forward.activations[:1]) is None
        ):
            return False
        fitted = isinstance(self._head_spec, str)
        key = tuple(forward.activations.shape[1:])
        if fitted and key in self._closed_form:
            return self._closed_form[key]
        with torch.no_grad():
            predicted = head.transform(head.pool(forward.activations.detach()))
        allowed = reproduces(predicted.to(forward.outputs.dtype), forward.outputs.detach())
        if fitted:
            self._closed_form[key] = allowed
        return allowed
