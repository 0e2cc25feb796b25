"""Interpretation of relevant features by average image patches (Oramas et al. 2019, sec. 3.2).

For a feature (layer, channel), every image gives its maximum response over the layer's
positions; the top-N images (default 100) are kept, each is cropped at its maximum by the
feature's receptive field (:func:`~fam_core.explainers.relevant.receptive_field.receptive_field`,
computed analytically from the kernel sizes, strides, paddings and dilations on the path), and
the crops are averaged. Parts of a receptive field outside the image are filled with that
image's per-channel mean. A feature of a ``Linear`` layer has no position: its receptive field
is the whole image. :func:`render_interpretation` draws one row per feature: the average crop,
then the top crops.

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU())
    >>> result = interpret_features(net, torch.rand(5, 3, 8, 8), [("0", 1)], top_n=3)
    >>> result.features[0].average_crop.shape, result.features[0].image_indices.shape
    (torch.Size([3, 3, 3]), torch.Size([3]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fam_core.explainers.hooks import layer_responses
from fam_core.explainers.relevant.receptive_field import ReceptiveField, crop, receptive_field
from fam_core.render import image_grid


@dataclass(frozen=True)
class FeatureInterpretation:
    """The top-N images of one feature, best first.

    Attributes:
        layer, channel: the feature.
        receptive_field: its receptive field in input pixels.
        average_crop: ``[3, h, w]`` the mean of the top-N crops.
        image_indices: ``[n]`` indices into the interpreted images.
        responses: ``[n]`` the maximum response in each of those images.
        positions: ``[n, 2]`` (row, col) of that maximum in the layer's response map.
        boxes: ``[n, 4]`` the crops ``(x0, y0, x1, y1)`` in image pixels (end exclusive; may
            leave the image, where the crop holds the image's mean).
        top_crops: ``[min(n, shown), 3, h, w]`` the best crops themselves.
    """

    layer: str
    channel: int
    receptive_field: ReceptiveField
    average_crop: torch.Tensor
    image_indices: torch.Tensor
    responses: torch.Tensor
    positions: torch.Tensor
    boxes: torch.Tensor
    top_crops: torch.Tensor


@dataclass(frozen=True)
class Interpretation:
    """One :class:`FeatureInterpretation` per feature, in the order asked for."""

    features: list[FeatureInterpretation]
    top_n: int


def interpret_features(
    model: nn.Module,
    images: torch.Tensor,
    features: Sequence[tuple[str, int]],
    *,
    top_n: int = 100,
    shown: int = 4,
    display_images: torch.Tensor | None = None,
    batch_size: int = 64,
) -> Interpretation:
    """Average the top-``top_n`` receptive-field crops of each ``(layer, channel)`` feature.

    Args:
        model: the network (in the mode it should be interpreted in, normally ``eval()``).
        images: ``[N, C, H, W]`` model inputs.
        features: ``(layer name, channel)`` pairs.
        top_n: images per feature (fewer when ``N < top_n``).
        shown: best crops kept per feature for display.
        display_images: ``[N, 3, H, W]`` images to crop from (e.g. the de-normalised inputs in
            [0, 1]); default ``images``.
        batch_size: images per forward pass.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError("images must be a non-empty tensor [N, C, H, W]")
    display = images if display_images is None else display_images
    if not isinstance(display, torch.Tensor) or display.dim() != 4:
        raise ValueError("display_images must be a tensor [N, 3, H, W]")
    if display.shape[0] != images.shape[0] or display.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"display_images {tuple(display.shape)} must match images {tuple(images.shape)} "
            "in number and size"
        )
    for name, value in (("top_n", top_n), ("shown", shown), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    modules = dict(model.named_modules())
    pairs = []
    for feature in features:
        if not isinstance(feature, tuple | list) or len(feature) < 2:
            raise ValueError(f"features must be (layer, channel) pairs, got {feature!r}")
        layer, channel = feature[0], feature[1]
        if not isinstance(layer, str) or layer not in modules or not layer:
            raise ValueError(f"unknown feature layer {layer!r}; expected a model module name")
        if isinstance(channel, bool) or not isinstance(channel, int) or channel < 0:
            raise ValueError(f"feature channel must be a non-negative int, got {channel!r}")
        pairs.append((layer, channel))
    if not pairs:
        raise ValueError("features must name at least one (layer, channel) pair")
    layers = list(dict.fromkeys(layer for layer, _ in pairs))
    height, width = int(images.shape[-2]), int(images.shape[-1])
    fields = {
        layer: ReceptiveField(size=(height, width))
        if isinstance(modules[layer], nn.Linear)
        else receptive_field(model, layer)
        for layer in layers
    }

    values: list[list[torch.Tensor]] = [[] for _ in pairs]
    positions: list[list[torch.Tensor]] = [[] for _ in pairs]
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            responses, _ = layer_responses(model, images[start : start + batch_size], layers)
            by_layer = dict(zip(layers, responses, strict=True))
            for f, (layer, channel) in enumerate(pairs):
                response = by_layer[layer]
                if response.dim() not in (2, 4) or channel >= response.shape[1]:
                    raise ValueError(
                        f"feature ({layer!r}, {channel}): the layer's response has shape "
                        f"{tuple(response.shape)}; expected [B, C] or [B, C, h, w] with C > channel"
                    )
                maps = response[:, channel].reshape(response.shape[0], -1)
                best, flat = maps.max(dim=1)  # the maximum response per image
                map_width = response.shape[-1] if response.dim() == 4 else 1
                values[f].append(best)
                positions[f].append(torch.stack([flat // map_width, flat % map_width], dim=1))
    results = []
    for f, (layer, channel) in enumerate(pairs):
        best = torch.cat(values[f])
        responses_top, order = best.topk(min(top_n, best.shape[0]))
        where = torch.cat(positions[f])[order]
        field = fields[layer]
        boxes = field.boxes(where)
        crops = crop(display, order.to(display.device), boxes.to(display.device))
        results.append(
            FeatureInterpretation(
                layer=layer,
                channel=channel,
                receptive_field=field,
                average_crop=crops.mean(dim=0),
                image_indices=order,
                responses=responses_top,
                positions=where,
                boxes=boxes,
                top_crops=crops[:shown],
            )
        )
    return Interpretation(features=results, top_n=top_n)


def render_interpretation(
    interpretation: Interpretation,
    *,
    shown: int | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> torch.Tensor:
    """uint8 RGB ``[H', W', 3]``: per feature (row), the average crop and then its top crops.

    Crops must be in [0, 1] (crop from de-normalised ``display_images``).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU())
        >>> result = interpret_features(net, torch.rand(5, 3, 8, 8), [("0", 0), ("0", 1)])
        >>> render_interpretation(result).dtype
        torch.uint8
    """
    if not isinstance(interpretation, Interpretation) or not interpretation.features:
        raise ValueError("render_interpretation needs an Interpretation with at least one feature")
    most = max(int(item.top_crops.shape[0]) for item in interpretation.features)
    shown = most if shown is None else shown
    if isinstance(shown, bool) or not isinstance(shown, int) or shown < 0:
        raise ValueError(f"shown must be a non-negative int, got {shown!r}")
    tiles: list[torch.Tensor | None] = []
    for item in interpretation.features:
        crops = list(item.top_crops[:shown])
        tiles += [item.average_crop, *crops, *([None] * (shown - len(crops)))]
    return image_grid(
        tiles,
        len(interpretation.features),
        shown + 1,
        titles=["average", *(f"#{i + 1}" for i in range(shown))],
        row_labels=[f"{item.layer}:{item.channel}" for item in interpretation.features],
        title=title,
        dpi=dpi,
    )
