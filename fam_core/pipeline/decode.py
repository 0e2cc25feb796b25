"""Decode and validate request images into ``[3, H, W]`` float32 tensors in ``[0, 1]``.

Every limit is checked before the work it bounds: the number of images and bytes from the
request, each image's format, sides, aspect ratio and pixels from its header (nothing is
decoded yet), the decoded bytes of the whole request, then room in the server-wide budget
of decoded bytes (:class:`DecodeBudget`) while each image is decoded. Large images are decoded
straight to about twice the model's input size (JPEG DCT scaling with ``draft``, then
``reduce``), so a 16-megapixel photo never becomes a 16-megapixel float tensor.
"""

from __future__ import annotations

import io
import math
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fam_core.images.read import to_rgb8
from fam_core.pipeline.errors import (
    DeadlineExceeded,
    InvalidArgument,
    Overloaded,
    ResourceExhausted,
    UnsupportedFormat,
)
from fam_core.pipeline.limits import Limits
from fam_core.pipeline.request import TENSOR_DTYPES, EncodedImage, ImageInput, RawTensor

_TORCH_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}
DECODED_BYTES_PER_PIXEL = 4
"""What the budget charges per pixel of an encoded image (PIL's RGBA/CMYK/I;16 buffers are
at most 4 bytes a pixel; conversions hold one more copy for a moment)."""
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (b"qoif", "QOI"),
)


def check_sizes(images: tuple[ImageInput, ...], limits: Limits, what: str = "images") -> int:
    """Raise :class:`ResourceExhausted` when ``images`` exceed the batch or byte limit.

    Returns the number of bytes.
    """
    check_count(len(images), limits, what)
    total = sum(len(image.data) for image in images)
    if total > limits.max_request_bytes:
        raise ResourceExhausted(
            f"{what}: {total} bytes of image data, more than the limit of "
            f"{limits.max_request_bytes} bytes per request"
        )
    return total


def check_count(count: int, limits: Limits, what: str = "images") -> None:
    """:class:`ResourceExhausted` when a request holds more than ``max_batch`` images.

    Front doors call it with the count their wire format declares, before building anything
    per image.
    """
    if count > limits.max_batch:
        raise ResourceExhausted(
            f"{what}: {count} images, more than the limit of {limits.max_batch} per request"
        )


def sniff_format(data: bytes) -> str:
    """The format named by the first bytes of ``data`` (``""`` when unknown)."""
    head = bytes(data[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    return ""


@dataclass
class Header:
    """An encoded image, opened (its header read, nothing decoded)."""

    image: Image.Image
    width: int
    height: int

    @property
    def decoded_bytes(self) -> int:
        return self.width * self.height * DECODED_BYTES_PER_PIXEL


_BUFFER_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def open_header(data: bytes, limits: Limits, where: str = "image 0") -> Header:
    """Open an encoded image and check its format, sides, aspect ratio and pixels.

    Only the parsers of ``limits.formats`` ever see the bytes.
    """
    if not data:
        raise InvalidArgument(f"{where}: empty bytes; expected {_names(limits)} data")
    sniffed = sniff_format(data)
    if sniffed and sniffed not in limits.formats:
        raise UnsupportedFormat(
            f"{where}: {sniffed} images are not accepted; this server accepts {_names(limits)}"
        )
    try:
        image = Image.open(io.BytesIO(bytes(data)), formats=list(limits.formats))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InvalidArgument(
            f"{where}: cannot decode the image: not {_names(limits)} ({_first_line(error)})"
        ) from None
    except Image.DecompressionBombError as error:
        raise InvalidArgument(f"{where}: {_first_line(error)}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidArgument(f"{where}: cannot decode the image: the image has zero size")
    check_extent(width, height, limits, f"{where}: the image is {width}x{height} pixels")
    return Header(image, width, height)


def decoded_bytes(image: ImageInput, header: Header | None) -> int:
    """What decoding ``image`` charges to the budgets."""
    if header is not None:
        return header.decoded_bytes
    return len(image.data) * 4 // max(TENSOR_DTYPES.get(getattr(image, "dtype", ""), 4), 1)


def check_decoded_bytes(total: int, limits: Limits, what: str = "images") -> None:
    """:class:`ResourceExhausted` when a request would decode more than its limit."""
    if total > limits.max_decoded_bytes:
        raise ResourceExhausted(
            f"{what}: {total} bytes once decoded, more than the limit of "
            f"{limits.max_decoded_bytes} bytes per request"
        )


class DecodeBudget:
    """Decoded bytes of all requests being decoded at once, bounded by ``capacity``.

    Example:
        >>> budget = DecodeBudget(100)
        >>> with budget.reserve(60, None, 0.0):
        ...     budget.in_use
        60
        >>> budget.in_use
        0
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._condition = threading.Condition()

    @contextmanager
    def reserve(self, amount: int, deadline: float | None, wait_s: float) -> Iterator[None]:
        """Hold ``amount`` bytes; wait up to ``wait_s`` (and the deadline) for room."""
        amount = min(amount, self.capacity)
        end = time.monotonic() + wait_s
        if deadline is not None:
            end = min(end, deadline)
        with self._condition:
            while self.in_use + amount > self.capacity:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise DeadlineExceeded("the deadline passed while waiting to decode")
                    raise Overloaded(
                        f"the server is decoding {self.in_use} bytes of images, near its limit "
                        f"of {self.capacity}; retry later"
                    )
                self._condition.wait(remaining)
            self.in_use += amount
        try:
            yield
        finally:
            with self._condition:
                self.in_use -= amount
                self._condition.notify_all()


def decode_input(
    image: ImageInput,
    limits: Limits,
    *,
    index: int = 0,
    header: Header | None = None,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One request image as ``[3, H, W]`` float32 in ``[0, 1]``.

    ``size``: the model's input ``(H, W)``; an encoded image more than four times larger is
    decoded at a reduced scale, still at least twice ``size``.

    Example:
        >>> decode_input(RawTensor(bytes(12), "uint8", (3, 2, 2)), Limits()).shape
        torch.Size([3, 2, 2])
    """
    if isinstance(image, EncodedImage):
        where = f"image {index}"
        if header is None:
            header = open_header(image.data, limits, where)
        try:
            return _decode_encoded(header, size)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise InvalidArgument(
                f"{where}: cannot decode the image: {_first_line(error)}"
            ) from None
    if isinstance(image, RawTensor):
        return _decode_tensor(image, limits, index)
    raise InvalidArgument(f"image {index}: expected encoded bytes or a tensor")


def _decode_encoded(header: Header, size: tuple[int, int] | None) -> torch.Tensor:
    image = header.image
    if size is not None:
        target = 2 * max(size)  # orientation-proof: EXIF may swap the sides
        if image.format == "JPEG":
            image.draft(image.mode, (target, target))  # DCT scaling: decodes fewer pixels
        image.load()
        factor = min(image.size) // target
        if factor >= 2 and image.mode in ("L", "RGB", "RGBA", "LA", "CMYK", "I", "F"):
            image = image.reduce(factor)
    try:
        rgb = to_rgb8(image)
    finally:
        header.image.close()
    if not rgb.flags.writeable or not rgb.flags.c_contiguous:
        rgb = np.array(rgb)  # a small copy: the image is at about the model's input size
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)


def _decode_tensor(tensor: RawTensor, limits: Limits, index: int) -> torch.Tensor:
    where = f"image {index}"
    if tensor.dtype not in TENSOR_DTYPES:
        raise InvalidArgument(
            f"{where}: tensor dtype {tensor.dtype!r} is not supported; expected one of "
            f"{sorted(TENSOR_DTYPES)}"
        )
    shape = tuple(int(s) for s in tensor.shape)
    check_tensor_shape(shape, limits, where)
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


def check_tensor_shape(shape: tuple[int, ...], limits: Limits, where: str) -> None:
    """A ``[3, H, W]`` image tensor's shape against the limits (sides, aspect, pixels)."""
    if len(shape) != 3 or shape[0] != 3:
        raise InvalidArgument(f"{where}: tensor shape {list(shape)} must be [3, H, W]")
    height, width = shape[1], shape[2]
    if height <= 0 or width <= 0:
        raise InvalidArgument(f"{where}: tensor shape {list(shape)} has zero size")
    check_extent(
        width, height, limits, f"{where}: tensor shape {list(shape)} is {width}x{height} pixels"
    )


def check_extent(width: int, height: int, limits: Limits, subject: str) -> None:
    """An image's sides, aspect ratio and pixel count against the limits, read before any
    pixel is decoded; ``subject`` starts the message (``"image 0: the image is 1x20000
    pixels"``)."""
    if width > limits.max_side or height > limits.max_side:
        raise InvalidArgument(f"{subject}, a side over the limit of {limits.max_side}")
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise InvalidArgument(
            f"{subject}, an aspect ratio over the limit of {limits.max_aspect_ratio:g}"
        )
    if width * height > limits.max_pixels:
        raise InvalidArgument(f"{subject}, more than the limit of {limits.max_pixels}")


def _names(limits: Limits) -> str:
    return "/".join(limits.formats)


def _first_line(error: BaseException) -> str:
    """The error's first line, without the ``<_io.BytesIO object at 0x...>`` PIL names."""
    text = _BUFFER_REPR.sub("", str(error)).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
