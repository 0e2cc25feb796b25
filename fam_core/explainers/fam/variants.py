"""Variants of FAM aimed at target sensitivity. Beyond the paper: not in Liao et al.

FAM's eq. 15 weights channel ``n`` by ``z_n r_n / (|Z| |R|)``: the query's own activation
``z_n`` times the reference's. A channel active on every object of a query scene gets a
large weight whichever reference is explained, so the map changes little with the target.
Each variant below is one small override of :class:`~fam_core.explainers.fam.fam.FAM`
(same eq. 14, 11, 16-18 and 13, same :mod:`fam_core.maths.fam`); its docstring says exactly
where it departs from the paper. The paper's FAM (``"fam"``) stays the default method.

==================  =====================================  ====================  ==========
method              eq. 15 contribution ``c_kn``            eq. 12 normalisation  eq. 13 map
==================  =====================================  ====================  ==========
``fam`` (paper)     ``z_n r_kn / (|Z||R_k|)``               min-max               ``sum``
``fam-signed``      same                                   none (signed)         ``ReLU(sum)``
``fam-centred``     same                                   ``c - mean_n c``      ``ReLU(sum)``
``fam-orthogonal``  ``z_n ds(Z, R_k)/dz_n``                 none (signed)         ``ReLU(sum)``
==================  =====================================  ====================  ==========

(every ``c_kn`` is divided by ``|s(Z, R_k)|`` and averaged over ``k``, as eq. 15 and 11 do.)
Paper: https://doi.org/10.1109/TCSVT.2023.3307330 (FAM, section IV).
"""

from __future__ import annotations

import torch

from fam_core.explainers.fam.fam import FAM
from fam_core.explainers.registry import register
from fam_core.explainers.targets import ResolvedTarget
from fam_core.maths.fam import gradient_contributions, rectified_sum
from fam_core.maths.similarity import similarity

__all__ = ["CentredFAM", "OrthogonalFAM", "SignedFAM"]


@register
class SignedFAM(FAM):
    """FAM without eq. 12: signed channel weights, ``L = ReLU(sum_n c_n A^n)``.

    Departs from the paper in two steps only: the channel weights ``C`` of eq. 18 are used
    as they are (no min-max, eq. 12), and the map of eq. 13 is rectified as Grad-CAM's
    eq. 2 is, so channels that speak against the match subtract from the map instead of
    being lifted to weight ``>= 0``.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> explainer = SignedFAM(conv4().eval(), target_layer="block4")
        >>> refs = explainer.embed(torch.rand(1, 3, 84, 84))
        >>> bool((explainer(torch.rand(2, 3, 84, 84), target=refs).raw >= 0).all())
        True
    """

    method = "fam-signed"

    def normalise(self, channel: torch.Tensor) -> torch.Tensor:
        return channel  # no eq. 12

    def combine(self, weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        return rectified_sum(weights, activations)  # eq. 13 with Grad-CAM's ReLU (eq. 2)


@register
class CentredFAM(SignedFAM):
    """FAM with centred weights: ``c_n - mean_n c_n`` replaces eq. 12's min-max, and the map
    is ``ReLU(sum_n (c_n - mean c) A^n)``.

    Departs from the paper in eq. 12 (centring instead of min-max: a channel with an
    average contribution gets weight 0, not a positive one) and eq. 13 (ReLU).

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> explainer = CentredFAM(conv4().eval(), target_layer="block4")
        >>> refs = explainer.embed(torch.rand(1, 3, 84, 84))
        >>> weights = explainer(torch.rand(2, 3, 84, 84), target=refs).weights
        >>> bool(weights.mean(dim=1).abs().max() < 1e-6)
        True
    """

    method = "fam-centred"

    def normalise(self, channel: torch.Tensor) -> torch.Tensor:
        return channel - channel.mean(dim=1, keepdim=True)


@register
class OrthogonalFAM(SignedFAM):
    """FAM whose eq. 15 contributions are activation times the similarity's gradient.

    ``c_kn = z_n * d s(Z, R_k) / d z_n`` (:func:`~fam_core.maths.fam.gradient_contributions`)
    replaces eq. 15's ``z_n r_kn / (|Z| |R_k|)``. For the cosine, ``c_kn = z_n r⊥_kn /
    (|Z| |R_k|)`` with ``r⊥_k = R_k - (R_k . Ẑ) Ẑ``: only the reference's part orthogonal to
    the query embedding counts, so a channel that the query holds in proportion to the
    reference scores 0, and one the query holds more of than the reference (another
    object's) scores negative. These contributions sum to 0, so eq. 15 divides them by the
    pair's similarity ``|s(Z, R_k)|`` itself; as in ``fam-signed``, eq. 12 is dropped and
    the map is ``ReLU(sum_n c_n A^n)``. For the dot product (class targets) ``c_kn`` equals
    the paper's.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> explainer = OrthogonalFAM(conv4().eval(), target_layer="block4")
        >>> refs = explainer.embed(torch.rand(1, 3, 84, 84))
        >>> explainer(torch.rand(2, 3, 84, 84), target=refs).maps.shape
        torch.Size([2, 84, 84])
    """

    method = "fam-orthogonal"

    def pair_contributions(
        self, outputs: torch.Tensor, target: ResolvedTarget
    ) -> tuple[torch.Tensor, torch.Tensor]:
        contributions = gradient_contributions(outputs, target.references, target.similarity)
        return contributions, similarity(outputs, target.references, target.similarity)
