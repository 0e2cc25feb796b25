"""Feature layouts: a layer's output as the maps ``A`` ``[B, N, h, w]`` the explainers combine.

CNNs output channel-first maps ``[B, N, h, w]``. Vision transformers output token sequences
``[B, T, N]`` whose first tokens are not image patches (the class token, register tokens, a
distillation token); Swin-style models in some libraries output channel-last maps
``[B, h, w, N]``. :class:`FeatureLayout` turns any of them into ``[B, N, h, w]`` and back, so
that an explainer can read the maps and re-insert edited maps into the model's forward pass
(gradient methods, L2-CAF, the head's Jacobian).

:func:`detect_layout` infers the layout from the output's shape and the input's size: the
patch grid of a token sequence is the one whose stride is the same along both image axes
(``H / h == W / w``), after removing as few leading tokens as possible.

Example:
    >>> tokens = torch.rand(2, 1 + 4 * 4, 8)  # a class token and a 4 x 4 grid of patches
    >>> layout = detect_layout(tokens, (64, 64))
    >>> layout
    FeatureLayout(kind='tokens', prefix=1, grid=(4, 4))
    >>> maps = layout.to_map(tokens)
    >>> maps.shape
    torch.Size([2, 8, 4, 4])
    >>> torch.equal(layout.from_map(maps, tokens), tokens)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LayoutKind = Literal["channels_first", "channels_last", "tokens"]
LAYOUT_KINDS: tuple[str, ...] = ("channels_first", "channels_last", "tokens")
MAX_PREFIX_TOKENS = 16  # class + registers + distillation tokens seen in practice: at most 5


@dataclass(frozen=True)
class FeatureLayout:
    """How a layer's output tensor holds its feature maps.

    Attributes:
        kind: ``"channels_first"`` ``[B, N, h, w]``, ``"channels_last"`` ``[B, h, w, N]``
            or ``"tokens"`` ``[B, prefix + h * w, N]`` (patches in row-major order).
        prefix: leading tokens that are not patches (``"tokens"`` only).
        grid: ``(h, w)`` of the maps.
    """

    kind: LayoutKind
    prefix: int = 0
    grid: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.kind not in LAYOUT_KINDS:
            raise ValueError(f"unknown layout {self.kind!r}; expected one of {LAYOUT_KINDS}")
        if self.prefix < 0:
            raise ValueError(f"prefix must be >= 0, got {self.prefix}")

    def to_map(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, N, h, w]`` maps of a layer output in this layout."""
        if self.kind == "channels_first":
            return features
        if self.kind == "channels_last":
            return features.permute(0, 3, 1, 2)
        height, width = self.grid
        patches = features[:, self.prefix :]
        if patches.shape[1] != height * width:
            raise ValueError(
                f"a token sequence of {features.shape[1]} tokens does not hold {self.prefix} "
                f"leading tokens and a {height}x{width} grid"
            )
        return patches.transpose(1, 2).reshape(features.shape[0], -1, height, width)

    def from_map(self, maps: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """The layer output with its maps replaced by ``maps`` ``[B, N, h, w]``.

        Leading tokens are taken from ``original`` (detached): what is edited is the patches.
        ``maps`` may hold more items than ``original`` when ``original`` has one item.
        """
        if self.kind == "channels_first":
            return maps
        if self.kind == "channels_last":
            return maps.permute(0, 2, 3, 1)
        tokens = maps.flatten(2).transpose(1, 2)
        if self.prefix == 0:
            return tokens
        prefix = original[:, : self.prefix].detach()
        if prefix.shape[0] != tokens.shape[0]:
            prefix = prefix.expand(tokens.shape[0], -1, -1)
        return torch.cat([prefix.to(tokens.dtype), tokens], dim=1)


def _consistent(size: tuple[int, int], grid: tuple[int, int]) -> bool:
    """Whether a ``grid`` covers an image of ``size`` with one stride ``s`` along both axes,
    each side rounded either way (``floor(H / s) <= h <= ceil(H / s)``, likewise ``w``): a
    ResNet maps 48 x 64 to 2 x 2 with stride 32, a ViT 224 x 224 to 14 x 14 with stride 16.

    Example:
        >>> _consistent((48, 64), (2, 2)), _consistent((64, 64), (64, 2))
        (True, False)
    """
    (height, width), (rows, cols) = size, grid
    if rows <= 0 or cols <= 0 or rows > height or cols > width:
        return False
    low = max(height / (rows + 1), width / (cols + 1))  # strides s allowed by both sides
    high = min(
        height / (rows - 1) if rows > 1 else float("inf"),
        width / (cols - 1) if cols > 1 else float("inf"),
    )
    return low < high


def token_grid(tokens: int, size: tuple[int, int]) -> tuple[int, tuple[int, int]] | None:
    """``(prefix, (h, w))`` for a sequence of ``tokens`` covering an image of ``size``.

    The fewest leading tokens whose removal leaves a grid with one stride along both axes.

    Example:
        >>> token_grid(197, (224, 224)), token_grid(49, (224, 224)), token_grid(261, (224, 224))
        ((1, (14, 14)), (0, (7, 7)), (5, (16, 16)))
    """
    height, width = size
    for prefix in range(min(tokens, MAX_PREFIX_TOKENS + 1)):
        patches = tokens - prefix
        best: tuple[int, int] | None = None
        for rows in range(1, patches + 1):
            if patches % rows:
                continue
            grid = (rows, patches // rows)
            if not _consistent(size, grid):
                continue
            error = abs(height / grid[0] - width / grid[1])
            if best is None or error < abs(height / best[0] - width / best[1]):
                best = grid
        if best is not None:
            return prefix, best
    return None


def detect_layout(features: torch.Tensor, size: tuple[int, int]) -> FeatureLayout | None:
    """The layout of a layer output for inputs of ``size`` ``(H, W)``; ``None`` if not spatial.

    4-D outputs are channel-first unless only the channel-last reading has one stride along
    both axes; 3-D outputs are token sequences (:func:`token_grid`). Anything else, and maps
    whose grid does not fit the image, are not spatial.
    """
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        return None
    if features.dim() == 4:
        first = (int(features.shape[2]), int(features.shape[3]))
        last = (int(features.shape[1]), int(features.shape[2]))
        if _consistent(size, first):
            return FeatureLayout("channels_first", grid=first)
        if _consistent(size, last):
            return FeatureLayout("channels_last", grid=last)
        return None
    if features.dim() == 3 and features.shape[2] > 1:
        found = token_grid(int(features.shape[1]), size)
        if found is None:
            return None
        prefix, grid = found
        return FeatureLayout("tokens", prefix=prefix, grid=grid)
    return None


def check_layout_spec(spec: object) -> None:
    """Reject a layout option that is not ``None``, ``"auto"``, a kind or a FeatureLayout.

    Example:
        >>> check_layout_spec("tokens")
        >>> check_layout_spec("nchw")
        Traceback (most recent call last):
        ValueError: layout must be 'auto', one of ('channels_first', 'channels_last', 'tokens') or a FeatureLayout, got 'nchw'
    """  # noqa: E501
    if not isinstance(spec, FeatureLayout) and spec not in (None, "auto", *LAYOUT_KINDS):
        raise ValueError(
            f"layout must be 'auto', one of {LAYOUT_KINDS} or a FeatureLayout, got {spec!r}"
        )


def as_layout(spec: FeatureLayout | str | None, features: torch.Tensor, size: tuple[int, int]):
    """Resolve a user's layout option against an observed output (``None``/"auto": detect)."""
    if isinstance(spec, FeatureLayout):
        return spec
    check_layout_spec(spec)
    found = detect_layout(features, size)
    if spec in (None, "auto") or (found is not None and found.kind == spec):
        return found
    if spec == "channels_first" and features.dim() == 4:
        return FeatureLayout(
            "channels_first", grid=(int(features.shape[2]), int(features.shape[3]))
        )
    if spec == "channels_last" and features.dim() == 4:
        return FeatureLayout("channels_last", grid=(int(features.shape[1]), int(features.shape[2])))
    return None
