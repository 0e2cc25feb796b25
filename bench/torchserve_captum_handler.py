"""TorchServe's own Captum explain path for a ``fam_core`` classifier (benchmark baseline).

TorchServe's ``image_classifier`` handler needs torchvision (not installed), so this subclasses
its base, ``ts.torch_handler.vision_handler.VisionHandler``, and replaces only what loads the
model and what turns a PIL image into a tensor (the model's own 84x84 normalisation). Requests,
batching, ``/explanations`` (``VisionHandler.get_insights``: Captum ``IntegratedGradients``
with ``n_steps=15`` on the whole batch, target from the request or 0, ``.tolist()``) and
``/predictions`` (``BaseHandler.postprocess``: the logits ``.tolist()``) are TorchServe's code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from captum.attr import IntegratedGradients
from PIL import Image
from ts.torch_handler.vision_handler import VisionHandler

from fam_core.models.store import load_model


class CaptumClassifierHandler(VisionHandler):
    """``VisionHandler`` with a ``fam_core`` model (``config.yaml`` + weights in the ``.mar``)."""

    def initialize(self, context: Any) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        self.model, self.config = load_model(model_dir / "config.yaml")
        self.model.eval()
        self.device = torch.device("cpu")
        self.ig = IntegratedGradients(self.model)
        self.context = context
        self.initialized = True

    def image_processing(self, image: Image.Image) -> torch.Tensor:
        """``[3, H, W]`` normalised pixels (torchvision's transforms in the stock handler)."""
        pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
        return self.config.normalize(pixels.permute(2, 0, 1)[None].float() / 255.0)[0]
