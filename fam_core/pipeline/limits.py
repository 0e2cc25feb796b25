"""Limits every request must respect, checked before any work is done."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Request limits.

    Attributes:
        max_batch: images (plus references) in one request.
        max_pixels: pixels of one image (checked from the header, before decoding).
        max_request_bytes: image bytes in one request, all images together.

    Example:
        >>> Limits().max_batch
        64
    """

    max_batch: int = 64
    max_pixels: int = 16_000_000
    max_request_bytes: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_pixels", "max_request_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")
