"""Reading images into ``[3, H, W]`` float tensors in ``[0, 1]``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 40_000_000


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
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as error:
        raise ValueError(f"cannot decode the image: {error}") from error
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255.0)


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image file into ``[3, H, W]`` float32 in ``[0, 1]``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such image file: {path}")
    try:
        return decode_image(path.read_bytes())
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[3, H, W]`` (or a batch) to ``size x size``: shorter side, then centre crop.

    The ``"crop"`` policy of :func:`fam_core.resizing.fit_image`.
    """
    from fam_core.resizing import fit_image

    return fit_image(image, size, "crop")
