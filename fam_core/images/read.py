"""Reading images into ``[3, H, W]`` float tensors in ``[0, 1]``, and giving a model the
channels it takes (:func:`to_channels`: RGB to luminance for greyscale models)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000
LUMINANCE_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights of R, G, B: what Pillow's ``convert("L")`` computes."""
CHANNEL_COUNTS = (1, 3)
"""The input channels a model may take: greyscale (luminance) or RGB."""
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Decode PNG/JPEG bytes into ``[3, H, W]`` float32 in ``[0, 1]``.

    Raises ``ValueError`` for bytes that are not an image, empty images, and images over
    ``max_pixels`` (checked before the pixels are decoded).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"image data must be bytes, got {type(data).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height == 0:
                raise ValueError("the image has zero size")
            if width * height > max_pixels:
                raise ValueError(
                    f"the image has {width}x{height} pixels, more than the limit of {max_pixels}"
                )
            rgb = to_rgb8(image)
    except UnidentifiedImageError:
        raise ValueError("cannot identify image file") from None
    except (OSError, Image.DecompressionBombError, SyntaxError) as error:
        raise ValueError(f"cannot decode the image: {str(error).splitlines()[0]}") from error
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255.0)


def to_rgb8(image: Image.Image) -> np.ndarray:
    """An opened image as ``[H, W, 3]`` uint8 RGB, upright, whatever mode PIL decoded it in.

    - EXIF orientation is applied (the pixels turned as a viewer shows them);
    - 16-bit samples (``I;16``, ``I;16B``, ``I`` from 16-bit PNGs) are scaled by 255/65535,
      rounded, so a 16-bit picture gives the pixels of its 8-bit equivalent;
    - ``F`` (float) and ``I`` values holding 8-bit data are rounded and clipped to 0..255;
    - alpha (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour) is composited over
      black, so transparent pixels are black whatever colour they store;
    - ``CMYK``, ``YCbCr``, ``1``, ``L``, ``P`` are converted by PIL.

    Example:
        >>> sixteen = Image.fromarray(np.full((2, 2), 257 * 200, dtype=np.uint16))
        >>> sixteen.mode, to_rgb8(sixteen)[0, 0].tolist()
        ('I;16', [200, 200, 200])
    """
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(image)
        if mode == "I" and int(values.max(initial=0)) <= 255 and image.format != "PNG":
            grey = np.clip(values, 0, 255).astype(np.uint8)
        else:  # 16-bit samples: a PNG's "I" is 16-bit data too
            wide = np.clip(values.astype(np.int64, copy=False), 0, 65535)
            grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if (mode == "P" and "transparency" in image.info) or mode in ("PA", "LA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
        alpha = rgba[:, :, 3:4].astype(np.uint16)
        return ((rgba[:, :, :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image file into ``[3, H, W]`` float32 in ``[0, 1]``; errors are one-line
    ``ValueError`` starting with the path (``photo.txt: cannot identify image file``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such image file: {path}")
    try:
        return decode_image(path.read_bytes())
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[3, H, W]`` (or a batch) to ``size x size``: shorter side, then centre crop.

    The ``"crop"`` policy of :func:`fam_core.images.resize.fit_image`.
    """
    from fam_core.images.resize import fit_image

    return fit_image(image, size, "crop")


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """RGB ``[B, 3, H, W]`` (or ``[3, H, W]``) images as a model with ``channels`` input
    channels takes them: unchanged for 3, the ITU-R BT.601 luminance
    ``0.299 R + 0.587 G + 0.114 B`` (Pillow's ``convert("L")``, without its rounding to
    8 bits) for 1. Images that already have ``channels`` channels are returned as they are.

    Example:
        >>> grey = to_channels(torch.tensor([[[1.0]], [[0.5]], [[0.0]]]), 1)  # [3, 1, 1] RGB
        >>> tuple(grey.shape), round(float(grey), 4)
        ((1, 1, 1), 0.5925)
    """
    if channels not in CHANNEL_COUNTS:
        raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
    axis = images.dim() - 3
    if axis < 0:
        raise ValueError(f"images must be [3, H, W] or [B, 3, H, W], got {tuple(images.shape)}")
    if images.shape[axis] == channels:
        return images
    if images.shape[axis] != 3:
        raise ValueError(
            f"images have {images.shape[axis]} channels: expected 3 (RGB) or {channels}"
        )
    weights = torch.tensor(LUMINANCE_WEIGHTS, dtype=images.dtype, device=images.device)
    return (images * weights.view(3, 1, 1)).sum(dim=axis, keepdim=True)
