"""Explainers: one module per method over :class:`~fam_core.explainers.base.Explainer`.

Methods whose map is a weighted sum of the target layer's channels (FAM eq. 13) subclass
:class:`~fam_core.explainers.base.ChannelExplainer`.

Importing this package registers every method (see :mod:`fam_core.explainers.registry`).
"""

from fam_core.explainers.ablationcam import AblationCAM
from fam_core.explainers.activation import UpsampledActivation
from fam_core.explainers.base import ChannelExplainer, Explainer
from fam_core.explainers.cam import CAM
from fam_core.explainers.deconvnet import Deconvnet, GuidedBackprop
from fam_core.explainers.eigencam import EigenCAM
from fam_core.explainers.fam import FAM
from fam_core.explainers.gradcam import GradCAM
from fam_core.explainers.gradcam_pp import GradCAMPlusPlus
from fam_core.explainers.gradfam import GradFAM
from fam_core.explainers.guided_gradcam import GuidedGradCAM
from fam_core.explainers.l2caf import L2CAF
from fam_core.explainers.layercam import LayerCAM
from fam_core.explainers.registry import EXPLAINERS, available_methods, get_explainer, register
from fam_core.explainers.relevant import RelevantFeatures
from fam_core.explainers.scorecam import ScoreCAM
from fam_core.explainers.scorefam import ScoreFAM
from fam_core.explainers.xgradcam import XGradCAM

__all__ = [
    "CAM",
    "EXPLAINERS",
    "FAM",
    "L2CAF",
    "AblationCAM",
    "ChannelExplainer",
    "Deconvnet",
    "EigenCAM",
    "Explainer",
    "GradCAM",
    "GradCAMPlusPlus",
    "GradFAM",
    "GuidedBackprop",
    "GuidedGradCAM",
    "LayerCAM",
    "RelevantFeatures",
    "ScoreCAM",
    "ScoreFAM",
    "UpsampledActivation",
    "XGradCAM",
    "available_methods",
    "get_explainer",
    "register",
]
