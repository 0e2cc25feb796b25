"""Preprocess decoded images per the model's config: fit to the input size, normalise."""

from __future__ import annotations

import torch

from fam_core.models.store import ModelConfig


def preprocess(
    images: list[torch.Tensor], config: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[3, h, w]`` images in ``[0, 1]`` to ``(pixels [B, 3, H, W] in [0, 1], model inputs)``.

    Each image is fitted to ``config.input_size`` by the config's ``resize`` policy
    (:meth:`~fam_core.models.store.ModelConfig.fit`: ``crop``, ``resize`` or ``letterbox``);
    the model inputs are ``config.normalize(pixels)``.

    Example:
        >>> config = ModelConfig(name="m", task="classifier", backbone="conv4", weights="w.pt",
        ...                      input_size=[4, 6], resize="resize")
        >>> pixels, inputs = preprocess([torch.rand(3, 10, 10)], config)
        >>> tuple(pixels.shape)
        (1, 3, 4, 6)
    """
    pixels = torch.stack([config.fit(image) for image in images])
    return pixels, config.normalize(pixels)
