"""fam_core: explanations for embedding models and classifiers, served with every prediction.

Example:
    >>> import torch, fam_core
    >>> model, config = fam_core.load_model("default-embedding")
    >>> explainer = fam_core.FAM(model, target_layer=config.target_layer)
    >>> refs = explainer.embed(torch.rand(2, 3, 84, 84))
    >>> explainer(torch.rand(1, 3, 84, 84), target=refs).maps.shape
    torch.Size([1, 84, 84])
"""

from fam_core.moved_modules import install as _keep_old_module_paths
from fam_core.package_data import CHECKOUT_DIR as _CHECKOUT_DIR
from fam_core.package_data import IN_CHECKOUT as _IN_CHECKOUT

if _IN_CHECKOUT:
    # The repository keeps the ONNX exporters and the TorchServe handler in the top-level
    # folders exporters/ and handlers/, which the wheel installs as fam_core.exporters and
    # fam_core.handlers ([tool.setuptools.package-dir] in pyproject.toml). Searching the
    # checkout's root after the package's own folder gives the same import names in a checkout
    # (PYTHONPATH, pytest, or an editable install, whose finder does the same).
    __path__.append(str(_CHECKOUT_DIR))  # noqa: F821  (the package's __path__)

from fam_core import explainers as _explainers  # noqa: E402
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
_keep_old_module_paths()  # fam_core.onnx_runtime and the other moved modules' old names
