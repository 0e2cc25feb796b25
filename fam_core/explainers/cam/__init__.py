"""The CAM family: class activation maps and the methods derived from them.

:mod:`~fam_core.explainers.cam.cam_common` holds what they share (the gradient-weighted
base, batched masked forward passes); each other module is one method.
"""

from fam_core.explainers.cam.ablationcam import AblationCAM
from fam_core.explainers.cam.activation import UpsampledActivation
from fam_core.explainers.cam.cam import CAM
from fam_core.explainers.cam.eigencam import EigenCAM
from fam_core.explainers.cam.gradcam import GradCAM
from fam_core.explainers.cam.gradcam_pp import GradCAMPlusPlus
from fam_core.explainers.cam.guided_gradcam import GuidedGradCAM
from fam_core.explainers.cam.layercam import LayerCAM
from fam_core.explainers.cam.liftcam import LiftCAM
from fam_core.explainers.cam.relevancecam import RelevanceCAM
from fam_core.explainers.cam.scorecam import ScoreCAM
from fam_core.explainers.cam.xgradcam import XGradCAM

__all__ = [
    "CAM",
    "AblationCAM",
    "EigenCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "GuidedGradCAM",
    "LayerCAM",
    "LiftCAM",
    "RelevanceCAM",
    "ScoreCAM",
    "UpsampledActivation",
    "XGradCAM",
]
