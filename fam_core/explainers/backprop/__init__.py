"""Input-space backpropagation: guided backpropagation and deconvnet, with the stride fix.

:mod:`~fam_core.explainers.backprop.guided` holds the guided-ReLU hooks (shared with Guided
Grad-CAM); :mod:`~fam_core.explainers.backprop.deconvnet` the explainers.
"""

from fam_core.explainers.backprop.deconvnet import Deconvnet, GuidedBackprop, InputBackprop

__all__ = ["Deconvnet", "GuidedBackprop", "InputBackprop"]
