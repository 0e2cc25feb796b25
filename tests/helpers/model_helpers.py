"""Small models and model configs the tests build."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from fam_core.anatomy.pooling import GlobalPool
from fam_core.models.store import ModelConfig


def toy_model(channels: int = 3, head: nn.Module | None = None) -> nn.Sequential:
    """The image itself is the feature map: A^n = x[:, n], Z = mean over space; ``head``
    after the pooling, if given (the identity takes any number of ``channels``)."""
    layers = [("features", nn.Identity()), ("pool", GlobalPool("avg"))]
    if head is not None:
        layers.append(("head", head))
    return nn.Sequential(OrderedDict(layers)).eval()


def plain_classifier() -> nn.Sequential:
    """A plain 4-class classifier, as users write one (no ``is_classifier``, an unnamed
    output): a 3x3 convolution to 6 channels, ReLU, global average pooling, a linear layer.
    Random init: seed torch first.

    >>> import torch
    >>> plain_classifier()(torch.rand(2, 3, 16, 16)).shape
    torch.Size([2, 4])
    """
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    ).eval()


def conv4_config(name: str, task: str, **keys: object) -> ModelConfig:
    """The config of a Conv4 model explained at ``block4``, its weights in ``weights.pt``;
    ``keys`` add to these or replace them.

    >>> conv4_config("tiny", "embedding", input_size=48).target_layer
    'block4'
    """
    fields = {"backbone": "conv4", "weights": "weights.pt", "target_layer": "block4", **keys}
    return ModelConfig(name=name, task=task, **fields)  # type: ignore[arg-type]
