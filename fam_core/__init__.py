"""fam_core: explanations for embedding models and classifiers, served with every prediction.

Example:
    >>> import torch, fam_core
    >>> model, config = fam_core.load_model("default-embedding")
    >>> explainer = fam_core.FAM(model, target_layer=config.target_layer)
    >>> refs = explainer.embed(torch.rand(2, 3, 84, 84))
    >>> explainer(torch.rand(1, 3, 84, 84), target=refs).maps.shape
    torch.Size([1, 84, 84])
"""

from fam_core import explainers as _explainers
from fam_core.explainers import *  # noqa: F403  (every explainer, one list: explainers.__all__)
from fam_core.explanation import Explanation
from fam_core.models.store import LoadedModel, ModelConfig, available_models, load_model

__all__ = [
    *(name for name in _explainers.__all__ if name not in ("EXPLAINERS", "register")),
    "Explanation",
    "LoadedModel",
    "ModelConfig",
    "available_models",
    "load_model",
]
__version__ = "0.1.0"
