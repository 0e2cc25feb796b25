"""Explainers, grouped by family; one module per method over
:class:`~fam_core.explainers.base.Explainer`.

- :mod:`fam_core.explainers.fam`: FAM, Grad-FAM, Score-FAM;
- :mod:`fam_core.explainers.cam`: the CAM family (CAM, Grad-CAM, ..., Relevance-CAM, LIFT-CAM);
- :mod:`fam_core.explainers.l2caf`: L2-CAF (a paper and a family of its own);
- :mod:`fam_core.explainers.backprop`: guided backpropagation and deconvnet;
- :mod:`fam_core.explainers.relevant`: relevant features (the mu-Lasso, receptive fields,
  interpretation and ablation with them).

Methods whose map is a weighted sum of the target layer's channels (FAM eq. 13) subclass
:class:`~fam_core.explainers.base.ChannelExplainer`.

Importing this package registers every method (see :mod:`fam_core.explainers.registry`).
"""

from fam_core.explainers.backprop import Deconvnet, GuidedBackprop
from fam_core.explainers.base import ChannelExplainer, Explainer
from fam_core.explainers.cam import (
    CAM,
    AblationCAM,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    GuidedGradCAM,
    LayerCAM,
    LiftCAM,
    RelevanceCAM,
    ScoreCAM,
    UpsampledActivation,
    XGradCAM,
)
from fam_core.explainers.fam import FAM, GradFAM, ScoreFAM
from fam_core.explainers.l2caf import L2CAF
from fam_core.explainers.registry import EXPLAINERS, available_methods, get_explainer, register
from fam_core.explainers.relevant import RelevantFeatures

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
    "LiftCAM",
    "RelevanceCAM",
    "RelevantFeatures",
    "ScoreCAM",
    "ScoreFAM",
    "UpsampledActivation",
    "XGradCAM",
    "available_methods",
    "get_explainer",
    "register",
]
