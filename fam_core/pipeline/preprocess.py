"""Preprocess decoded images per the model's config: resize, crop, normalise."""

from __future__ import annotations

import torch

from fam_core.imageio import resize
from fam_core.models.store import ModelConfig


def preprocess(
    images: list[torch.Tensor], config: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[3, H, W]`` images in ``[0, 1]`` to ``(pixels [B, 3, S, S] in [0, 1], model inputs)``.

    The shorter side is resized to ``config.input_size`` and the centre cropped; the model
    inputs are ``config.normalize(pixels)``.
    """
    pixels = torch.stack([resize(image, config.input_size) for image in images])
    return pixels, config.normalize(pixels)
