"""Limits every request must respect, checked before any work is done."""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "ICO")
"""Image formats a server can be configured to accept (PIL format names)."""
DEFAULT_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class Limits:
    """Request limits; every one is checked from the request's shape or the image headers,
    before the pixels are decoded or any object per element is built.

    Attributes:
        max_batch: images (plus references) in one request.
        max_pixels: pixels of one image.
        max_side: pixels along either side of one image.
        max_aspect_ratio: longer side over shorter side of one image.
        max_request_bytes: image bytes in one request, all images together.
        max_decoded_bytes: decoded bytes of one request, all images together: width x height
            x 4 per encoded image (the pixels PIL decodes into), the tensor bytes of raw
            tensors.
        max_inflight_decoded_bytes: decoded bytes of all requests being decoded at once; an
            image that does not fit waits (up to ``queue_timeout_s`` and its deadline), then
            is refused with RESOURCE_EXHAUSTED.
        queue_timeout_s: how long an image may wait for room in the in-flight budget.
        formats: encoded image formats accepted (PIL names, see :data:`IMAGE_FORMATS`);
            others are refused (INVALID_ARGUMENT, HTTP 415) without running their parser.
        max_top_k: neighbours per query a search may ask for.
        max_filter_chars: characters of a search's filter expression.
        max_search_ef: the ``ef`` a search may ask of an ``HNSW`` index (the candidates its
            graph walk keeps; an ``ef`` under ``top_k`` searches with ``top_k``).

    Example:
        >>> Limits().max_batch, Limits().formats
        (64, ('PNG', 'JPEG', 'WEBP'))
    """

    max_batch: int = 64
    max_pixels: int = 16_000_000
    max_side: int = 16_384
    max_aspect_ratio: float = 32.0
    max_request_bytes: int = 32 * 1024 * 1024
    max_decoded_bytes: int = 512 * 1024 * 1024
    max_inflight_decoded_bytes: int = 1024 * 1024 * 1024
    queue_timeout_s: float = 5.0
    formats: tuple[str, ...] = DEFAULT_FORMATS
    max_top_k: int = 100
    max_filter_chars: int = 4096
    max_search_ef: int = 4096

    def __post_init__(self) -> None:
        for name in (
            "max_batch",
            "max_pixels",
            "max_side",
            "max_request_bytes",
            "max_decoded_bytes",
            "max_inflight_decoded_bytes",
            "max_top_k",
            "max_filter_chars",
            "max_search_ef",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")
        for name in ("max_aspect_ratio", "queue_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"Limits.{name} must be a number >= 0, got {value!r}")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"Limits.max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        formats = tuple(str(f).upper() for f in self.formats)
        unknown = sorted(set(formats) - set(IMAGE_FORMATS))
        if not formats or unknown:
            raise ValueError(
                f"Limits.formats must name some of {list(IMAGE_FORMATS)}, got {list(self.formats)}"
            )
        object.__setattr__(self, "formats", formats)
