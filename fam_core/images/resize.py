"""Fit images to a model's input size: the resize policy of a model config.

Every path that feeds a model (the request pipeline, ``fam explain``,
:meth:`fam_core.graphs.onnx_runtime.OnnxExplainer.preprocess`) calls :func:`fit_image`, so a model
sees the same pixels whichever door an image came through.

- ``"crop"``: resize so the image covers ``H x W`` (the shorter side, relative to the target),
  then cut the centre; the default, and what the default models were trained with;
- ``"resize"``: stretch to ``H x W`` (the aspect ratio changes);
- ``"letterbox"``: resize so the image fits inside ``H x W``, then pad around it with a fill
  colour (a model config uses its ``mean``, which normalises to zero).

Example:
    >>> image = torch.zeros(3, 60, 90)
    >>> [tuple(fit_image(image, (30, 40), p).shape) for p in RESIZE_POLICIES]
    [(3, 30, 40), (3, 30, 40), (3, 30, 40)]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

ResizePolicy = Literal["crop", "resize", "letterbox"]
RESIZE_POLICIES: tuple[ResizePolicy, ...] = ("crop", "resize", "letterbox")
DEFAULT_POLICY: ResizePolicy = "crop"


def as_size(size: int | Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` from an int (a square) or ``[H, W]``; ``ValueError`` for anything else.

    Example:
        >>> as_size(84), as_size([64, 96])
        ((84, 84), (64, 96))
    """
    if isinstance(size, bool):
        raise TypeError("an input size must be an int or [H, W], not a bool")
    if isinstance(size, int):
        pair: tuple[object, ...] = (size, size)
    elif isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        pair = tuple(size)
    else:
        raise ValueError(f"an input size must be an int or [H, W], got {size!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"an input size must hold positive ints, got {size!r}")
    return int(pair[0]), int(pair[1])  # type: ignore[call-overload]


def check_policy(policy: object) -> ResizePolicy:
    """``policy`` if it is one of :data:`RESIZE_POLICIES`, else ``ValueError``."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy must be one of {list(RESIZE_POLICIES)}, got {policy!r}")
    return policy  # type: ignore[return-value]


def fit_image(
    image: torch.Tensor,
    size: int | Sequence[int],
    policy: ResizePolicy = DEFAULT_POLICY,
    fill: Sequence[float] = (0.0, 0.0, 0.0),
) -> torch.Tensor:
    """``[C, h, w]`` (or ``[B, C, h, w]``) images in ``[0, 1]`` to ``[..., H, W]`` per ``policy``.

    Resampling is bilinear with antialiasing; ``fill`` is the ``letterbox`` padding colour.

    Example:
        >>> rows = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])  # [1, 2, 2]: a dark and a light row
        >>> fit_image(rows, (4, 2), "resize")[0, :, 0].tolist()
        [0.0, 0.25, 0.75, 1.0]
        >>> fit_image(rows, (4, 2), "letterbox", fill=(0.5,))[0, :, 0].tolist()
        [0.5, 0.0, 1.0, 0.5]
    """
    height, width = as_size(size)
    check_policy(policy)
    batch = image if image.dim() == 4 else image.unsqueeze(0)
    if batch.dim() != 4:
        raise ValueError(f"images must be [C, H, W] or [B, C, H, W], got {tuple(image.shape)}")
    h, w = batch.shape[-2:]
    new_h, new_w, top, left = fit_geometry((int(h), int(w)), (height, width), policy)
    out = _resample(batch, new_h, new_w)
    if policy == "crop":
        out = out[..., top : top + height, left : left + width]
    elif policy == "letterbox":
        if len(fill) not in (1, batch.shape[1]):
            raise ValueError(f"fill needs 1 or {batch.shape[1]} values, got {len(fill)}")
        colour = torch.tensor(fill, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
        padded = colour.expand(batch.shape[0], batch.shape[1], height, width).clone()
        padded[..., top : top + new_h, left : left + new_w] = out
        out = padded
    out = out.clamp(0, 1)
    return out if image.dim() == 4 else out[0]


def fit_geometry(
    original: tuple[int, int], size: int | Sequence[int], policy: ResizePolicy = DEFAULT_POLICY
) -> tuple[int, int, int, int]:
    """``(new_h, new_w, top, left)`` of :func:`fit_image` for an ``original`` ``(h, w)`` image.

    The image is resampled to ``new_h x new_w``; ``"crop"`` then keeps the ``H x W`` window
    at ``(top, left)`` of it, ``"letterbox"`` pastes it at ``(top, left)`` of the ``H x W``
    input, ``"resize"`` is the whole input (``top = left = 0``).

    Example:
        >>> fit_geometry((60, 120), 30, "crop"), fit_geometry((60, 120), 30, "letterbox")
        ((30, 60, 0, 15), (15, 30, 7, 0))
    """
    height, width = as_size(size)
    h, w = original
    policy = check_policy(policy)
    if policy == "resize":
        return height, width, 0, 0
    if policy == "crop":
        scale = max(height / h, width / w)
        new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
        return new_h, new_w, (new_h - height) // 2, (new_w - width) // 2
    scale = min(height / h, width / w)
    new_h = min(height, max(1, round(h * scale)))
    new_w = min(width, max(1, round(w * scale)))
    return new_h, new_w, (height - new_h) // 2, (width - new_w) // 2


def map_to_original(
    heatmap: torch.Tensor,
    original: tuple[int, int],
    size: int | Sequence[int],
    policy: ResizePolicy = DEFAULT_POLICY,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A heatmap ``[h, w]`` over the model input (``size``, any resolution) mapped back onto
    the pixels of the ``original`` ``(H0, W0)`` image that :func:`fit_image` fitted.

    Returns ``(map [H0, W0], seen [H0, W0] bool)``: ``seen`` is ``False`` where the model never
    saw the pixels (outside a centre crop), and the map is 0 there; letterbox padding is cut off.

    Example:
        >>> hot = torch.zeros(4, 4); hot[:, 3] = 1.0  # the right edge of the input is relevant
        >>> mapped, seen = map_to_original(hot, (4, 8), 4, "crop")
        >>> seen[0].tolist()
        [False, False, True, True, True, True, False, False]
        >>> int(mapped[0].argmax())
        5
    """
    if heatmap.dim() != 2:
        raise ValueError(f"heatmap must be [h, w], got shape {tuple(heatmap.shape)}")
    height, width = as_size(size)
    new_h, new_w, top, left = fit_geometry(original, (height, width), policy)
    full = _resample(heatmap.float()[None, None], height, width)[0, 0]
    if policy == "letterbox":
        full = full[top : top + new_h, left : left + new_w]
    seen = torch.ones(new_h, new_w, dtype=torch.bool, device=full.device)
    if policy == "crop":
        canvas = full.new_zeros(new_h, new_w)
        canvas[top : top + height, left : left + width] = full
        full = canvas
        seen = torch.zeros_like(seen)
        seen[top : top + height, left : left + width] = True
    mapped = _resample(full[None, None], *original)[0, 0]
    seen_mask = F.interpolate(seen[None, None].float(), size=original, mode="nearest")[0, 0]
    return mapped.clamp(0.0, 1.0), seen_mask > 0.5


def _resample(batch: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(batch.shape[-2:]) == (height, width):
        return batch
    return F.interpolate(
        batch, size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )
