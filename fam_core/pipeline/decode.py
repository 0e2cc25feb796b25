"""Decode and validate request images into ``[3, H, W]`` float32 tensors in ``[0, 1]``."""

from __future__ import annotations

import math

import torch

from fam_core.imageio import decode_image
from fam_core.pipeline.errors import InvalidArgument, ResourceExhausted
from fam_core.pipeline.limits import Limits
from fam_core.pipeline.request import TENSOR_DTYPES, EncodedImage, ImageInput, RawTensor

_TORCH_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}


def check_sizes(images: tuple[ImageInput, ...], limits: Limits, what: str = "images") -> int:
    """Raise :class:`ResourceExhausted` when ``images`` exceed the batch or byte limit.

    Returns the number of bytes.
    """
    if len(images) > limits.max_batch:
        raise ResourceExhausted(
            f"{what}: {len(images)} images, more than the limit of {limits.max_batch} per request"
        )
    total = sum(len(image.data) for image in images)
    if total > limits.max_request_bytes:
        raise ResourceExhausted(
            f"{what}: {total} bytes of image data, more than the limit of "
            f"{limits.max_request_bytes} bytes per request"
        )
    return total


def decode_input(image: ImageInput, limits: Limits, *, index: int = 0) -> torch.Tensor:
    """One request image as ``[3, H, W]`` float32 in ``[0, 1]``.

    Example:
        >>> decode_input(RawTensor(bytes(12), "uint8", (3, 2, 2)), Limits()).shape
        torch.Size([3, 2, 2])
    """
    if isinstance(image, EncodedImage):
        if not image.data:
            raise InvalidArgument(f"image {index}: empty bytes; expected PNG or JPEG data")
        try:
            return decode_image(bytes(image.data), max_pixels=limits.max_pixels)
        except (ValueError, TypeError) as error:
            raise InvalidArgument(f"image {index}: {error}") from None
    if isinstance(image, RawTensor):
        return _decode_tensor(image, limits, index)
    raise InvalidArgument(f"image {index}: expected encoded bytes or a tensor")


def _decode_tensor(tensor: RawTensor, limits: Limits, index: int) -> torch.Tensor:
    where = f"image {index}"
    if tensor.dtype not in TENSOR_DTYPES:
        raise InvalidArgument(
            f"{where}: tensor dtype {tensor.dtype!r} is not supported; expected one of "
            f"{sorted(TENSOR_DTYPES)}"
        )
    shape = tuple(int(s) for s in tensor.shape)
    if len(shape) != 3 or shape[0] != 3:
        raise InvalidArgument(f"{where}: tensor shape {list(shape)} must be [3, H, W]")
    if shape[1] <= 0 or shape[2] <= 0:
        raise InvalidArgument(f"{where}: tensor shape {list(shape)} has zero size")
    if shape[1] * shape[2] > limits.max_pixels:
        raise InvalidArgument(
            f"{where}: {shape[2]}x{shape[1]} pixels, more than the limit of {limits.max_pixels}"
        )
    expected = math.prod(shape) * TENSOR_DTYPES[tensor.dtype]
    if len(tensor.data) != expected:
        raise InvalidArgument(
            f"{where}: tensor data has {len(tensor.data)} bytes, shape {list(shape)} of "
            f"{tensor.dtype} needs {expected}"
        )
    dtype = _TORCH_DTYPES[tensor.dtype]
    values = torch.frombuffer(bytearray(tensor.data), dtype=dtype).reshape(shape)
    if dtype == torch.uint8:
        return values.float().div_(255.0)
    values = values.float()
    if not torch.isfinite(values).all():
        raise InvalidArgument(f"{where}: tensor contains NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise InvalidArgument(
            f"{where}: float tensor values must lie in [0, 1], got [{low:.4g}, {high:.4g}]"
        )
    return values
