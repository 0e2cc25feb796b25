"""Factories of small Hugging Face ``transformers`` vision models, for ``factory:`` configs.

Each function builds a model from a small config with seeded random weights (nothing is
downloaded): convolutions re-initialised He (fan-out, ReLU) and BatchNorm set to weight 1,
bias 0, running statistics 0 / 1, since transformers' default init (std 0.02) makes deep CNN
activations collapse to a constant and every map flat. Tests copy this file next to a
``config.yaml`` (``factory: hf_factories:resnet``), so ``fam archive`` packs it too.

Example:
    >>> model = resnet()
    >>> model(torch.rand(1, 3, 64, 64)).pooler_output.shape
    torch.Size([1, 64, 1, 1])
"""

from __future__ import annotations

import torch
import transformers as t
from torch import nn

SIZE = 64
_SMALL_CNN = {"embedding_size": 16, "hidden_sizes": [16, 32, 48, 64], "depths": [1, 1, 1, 1]}
_SMALL_VIT = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": SIZE,
    "patch_size": 16,
}
SMALL_SWIN = {  # Swin and Swin V2: two stages of one block, 4x4 windows
    "image_size": SIZE,
    "patch_size": 4,
    "embed_dim": 16,
    "depths": [1, 1],
    "num_heads": [2, 2],
    "window_size": 4,
}


def reinit(model: nn.Module, seed: int = 0) -> nn.Module:
    """He-initialised convolutions, BatchNorm weight 1 / bias 0, in eval mode."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            module.running_mean.zero_()
            module.running_var.fill_(1)
    return model.eval()


def resnet(seed: int = 0) -> nn.Module:
    """A re-ID style embedding model: ``ResNetModel``, embedding ``pooler_output``."""
    torch.manual_seed(seed)
    return reinit(t.ResNetModel(t.ResNetConfig(**_SMALL_CNN)), seed)


def resnet_classifier(num_labels: int = 5, seed: int = 0) -> nn.Module:
    """``ResNetForImageClassification``: a classifier whose output has ``logits``."""
    torch.manual_seed(seed)
    config = t.ResNetConfig(**_SMALL_CNN, num_labels=num_labels)
    return reinit(t.ResNetForImageClassification(config), seed)


def convnext(seed: int = 0) -> nn.Module:
    """``ConvNextModel``: a functional mean then LayerNorm (a non-linear head)."""
    torch.manual_seed(seed)
    config = t.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
    return reinit(t.ConvNextModel(config), seed)


def mobilenetv2(seed: int = 0) -> nn.Module:
    """``MobileNetV2Model`` at width 0.35."""
    torch.manual_seed(seed)
    config = t.MobileNetV2Config(depth_multiplier=0.35, image_size=SIZE)
    return reinit(t.MobileNetV2Model(config), seed)


def vit(seed: int = 0) -> nn.Module:
    """``ViTModel``: the embedding is the pooled class token."""
    torch.manual_seed(seed)
    return reinit(t.ViTModel(t.ViTConfig(**_SMALL_VIT, intermediate_size=64)), seed)


def dinov2(seed: int = 0) -> nn.Module:
    """``Dinov2Model``: the embedding is the class token after the final LayerNorm."""
    torch.manual_seed(seed)
    return reinit(t.Dinov2Model(t.Dinov2Config(**_SMALL_VIT, mlp_ratio=2)), seed)


def clip_with_projection(seed: int = 0) -> nn.Module:
    """``CLIPVisionModelWithProjection``: the embedding is ``image_embeds``, the projected
    class token (its position embedding is an ``nn.Embedding`` lookup)."""
    torch.manual_seed(seed)
    config = t.CLIPVisionConfig(**_SMALL_VIT, intermediate_size=64, projection_dim=16)
    return reinit(t.CLIPVisionModelWithProjection(config), seed)


def swinv2_classifier(num_labels: int = 5, seed: int = 0) -> nn.Module:
    """``Swinv2ForImageClassification``: its pooler averages a permuted (channels-last)
    token tensor."""
    torch.manual_seed(seed)
    config = t.Swinv2Config(**SMALL_SWIN, num_labels=num_labels)
    return reinit(t.Swinv2ForImageClassification(config), seed)


_TINY_VIT = {**_SMALL_VIT, "num_hidden_layers": 2, "intermediate_size": 64}


def convnext_classifier(num_labels: int = 5, seed: int = 0) -> nn.Module:
    """``ConvNextForImageClassification``: mean, LayerNorm, then the classifier."""
    torch.manual_seed(seed)
    config = t.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
    config.num_labels = num_labels
    return reinit(t.ConvNextForImageClassification(config), seed)


def vit_classifier(num_labels: int = 5, seed: int = 0) -> nn.Module:
    """``ViTForImageClassification``: the class token's logits."""
    torch.manual_seed(seed)
    config = t.ViTConfig(**_TINY_VIT, num_labels=num_labels)
    return reinit(t.ViTForImageClassification(config), seed)


def deit_classifier(num_labels: int = 5, seed: int = 0) -> nn.Module:
    """``DeiTForImageClassification``: the class token's logits."""
    torch.manual_seed(seed)
    config = t.DeiTConfig(**_TINY_VIT, num_labels=num_labels)
    return reinit(t.DeiTForImageClassification(config), seed)


def beit_classifier(num_labels: int = 5, seed: int = 0) -> nn.Module:
    """``BeitForImageClassification``: mean of the patch tokens, LayerNorm, classifier."""
    torch.manual_seed(seed)
    config = t.BeitConfig(**_TINY_VIT, num_labels=num_labels)
    return reinit(t.BeitForImageClassification(config), seed)


def mobilevit_classifier(num_labels: int = 5, seed: int = 0, he_init: bool = True) -> nn.Module:
    """``MobileViTForImageClassification``: a 1x1 conv, BatchNorm and SiLU after the last
    block, then mean and the classifier. ``he_init=False`` keeps transformers' own init,
    under which the last block's maps are all zeros."""
    torch.manual_seed(seed)
    config = t.MobileViTConfig(
        image_size=SIZE,
        hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 40],
        num_labels=num_labels,
    )
    model = t.MobileViTForImageClassification(config)
    return reinit(model, seed) if he_init else model.eval()


def efficientnet_classifier(num_labels: int = 5, seed: int = 0) -> nn.Module:
    """``EfficientNetForImageClassification`` at a quarter width and depth: a 1x1 conv,
    BatchNorm and SiLU after the last block, then mean and the classifier."""
    torch.manual_seed(seed)
    config = t.EfficientNetConfig(
        image_size=SIZE,
        width_coefficient=0.25,
        depth_coefficient=0.25,
        hidden_dim=320,  # the top conv's width at this width coefficient
        num_labels=num_labels,
    )
    return reinit(t.EfficientNetForImageClassification(config), seed)


def mobilevit_collapsed(num_labels: int = 5, seed: int = 0) -> nn.Module:
    """:func:`mobilevit_classifier` with transformers' own init: its maps are all zeros."""
    return mobilevit_classifier(num_labels, seed, he_init=False)


def build(name: str) -> nn.Module:
    """The model of the factory ``name`` (``-`` read as ``_``); ``"swin"``: a Swin backbone
    of ``SMALL_SWIN``."""
    if name == "swin":
        config = t.SwinConfig(**SMALL_SWIN)
        torch.manual_seed(0)
        return reinit(t.SwinModel(config))
    return globals()[name.replace("-", "_")]()
