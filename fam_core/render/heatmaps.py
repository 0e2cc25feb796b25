"""Rendering of explanation heatmaps: colour maps, overlays, PNG encoding and figures.

One implementation shared by the CLI, the demo and the servers. Conventions:

- images are float tensors ``[3, H, W]`` or ``[B, 3, H, W]`` with values in ``[0, 1]`` (already
  de-normalised);
- heatmaps are float tensors ``[H, W]`` or ``[B, H, W]`` with values in ``[0, 1]``; a heatmap whose
  resolution differs from its image's (typically a coarser one) is resized bilinearly to the image
  size before it is overlaid;
- outputs are channel-last ``uint8`` RGB tensors ``[H, W, 3]`` (``[B, H, W, 3]`` when batched).

Pixel maths is done in torch; numpy only appears at the boundary, when pixels are handed to PIL.
Colour maps come from :mod:`fam_core.render.colormaps` (``"jet"`` and ``"gray"`` built in, any
matplotlib colour map when matplotlib is installed); figures are drawn with Pillow by
:mod:`fam_core.render.panels`. Rendering touches no global state and is safe in servers and threads.
"""

from __future__ import annotations

import io
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from fam_core.render.colormaps import LUT_SIZE, check_cmap, lut
from fam_core.render.panels import panel_figure

__all__ = [
    "colorize",
    "explanation_title",
    "grid",
    "image_grid",
    "overlay",
    "overlay_figure",
    "save_png",
    "score_names",
    "to_png_bytes",
]

_RANGE_TOL = 1e-3  # slack on the image range for de-normalisation round-off
_CELL_INCHES = 2.0  # height of one image panel in figures
_MAX_CELL_INCHES = 6.0  # the tallest panel of overlay_figure (at the image's own resolution)


# --------------------------------------------------------------------------- validation helpers


def _check_float_tensor(value: object, name: str, shapes: str, hint: str = "") -> None:
    """``TypeError`` unless ``value`` is a floating-point tensor (``shapes`` and ``hint`` go
    into the message)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shapes}, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor with values in [0, 1], got dtype {value.dtype}"
            + hint
        )


def _check_image(image: Tensor, name: str = "image") -> Tensor:
    """Validate an image ``[3, H, W]`` / ``[B, 3, H, W]`` in [0, 1]; return it as float32, clamped."""
    _check_float_tensor(
        image, name, "[3, H, W] or [B, 3, H, W]", " (convert uint8 images with image.float() / 255)"
    )
    shape = tuple(image.shape)
    if image.dim() not in (3, 4):
        raise ValueError(f"{name} must have shape [3, H, W] or [B, 3, H, W], got shape {shape}")
    if shape[-3] != 3:
        raise ValueError(
            f"{name} must have 3 (RGB) channels, shape [3, H, W] or [B, 3, H, W]; "
            f"got {shape[-3]} channels in shape {shape}"
        )
    if image.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {shape}")
    image = image.detach().float()
    if not torch.isfinite(image).all():
        raise ValueError(f"{name} contains NaN or infinite values; expected values in [0, 1]")
    lo, hi = (float(v) for v in image.aminmax())
    if lo < -_RANGE_TOL or hi > 1.0 + _RANGE_TOL:
        raise ValueError(
            f"{name} values must lie in [0, 1] (de-normalise it first), got range [{lo:.4g}, {hi:.4g}]"
        )
    return image.clamp(0.0, 1.0)


def _check_heatmap(heatmap: Tensor, name: str = "heatmap") -> Tensor:
    """Validate a heatmap ``[H, W]`` / ``[B, H, W]``; return it as float32 (not yet clamped)."""
    _check_float_tensor(heatmap, name, "[H, W] or [B, H, W]")
    shape = tuple(heatmap.shape)
    if heatmap.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape [H, W] or [B, H, W], got shape {shape}")
    if heatmap.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {shape}")
    heatmap = heatmap.detach().float()
    if torch.isnan(heatmap).any():
        raise ValueError(f"{name} contains NaN values; expected values in [0, 1]")
    return heatmap


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number in [0, 1], got {type(alpha).__name__}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return float(alpha)


def _check_dpi(dpi: int) -> int:
    if isinstance(dpi, bool) or not isinstance(dpi, numbers.Integral):
        raise TypeError(f"dpi must be a positive int, got {type(dpi).__name__}")
    if dpi <= 0:
        raise ValueError(f"dpi must be a positive int, got {dpi}")
    return int(dpi)


# --------------------------------------------------------------------------- tensor helpers


def _apply_lut(values: Tensor, cmap: str) -> Tensor:
    """Map float values (clamped to [0, 1]) to uint8 RGB ``[..., 3]`` by LUT indexing."""
    index = values.clamp(0.0, 1.0).mul(LUT_SIZE - 1).round().long()
    return lut(cmap).to(values.device)[index]


def _resize(heatmaps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize ``[B, h, w]`` heatmaps to ``size`` (no-op when already that size)."""
    if tuple(heatmaps.shape[-2:]) == size:
        return heatmaps
    return F.interpolate(heatmaps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _to_numpy(pixels: Tensor | np.ndarray) -> np.ndarray:
    """Hand pixels over to numpy (for PIL): the only tensor->numpy conversion."""
    if isinstance(pixels, Tensor):
        return pixels.detach().cpu().contiguous().numpy()
    return np.asarray(pixels)


# --------------------------------------------------------------------------- pixel API


def colorize(heatmap: Tensor, cmap: str = "jet") -> Tensor:
    """Colour a heatmap with a colour map.

    Values are clamped to [0, 1] and looked up in a 256-entry table
    (:func:`fam_core.render.colormaps.lut`).

    Args:
        heatmap: float tensor ``[H, W]`` or ``[B, H, W]``.
        cmap: ``"jet"``, ``"gray"`` or (with matplotlib installed) any matplotlib colour map.

    Returns:
        uint8 tensor ``[H, W, 3]`` (``[B, H, W, 3]`` when batched), on the heatmap's device.

    Example:
        >>> colorize(torch.tensor([[0.0, 1.0]]), "gray").tolist()
        [[[0, 0, 0], [255, 255, 255]]]
    """
    heatmap = _check_heatmap(heatmap)
    return _apply_lut(heatmap, check_cmap(cmap))


def overlay(
    image: Tensor,
    heatmap: Tensor,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    seen: Tensor | None = None,
) -> Tensor:
    """Blend a coloured heatmap over an image: ``(1 - alpha) * image + alpha * colour(heatmap)``.

    A heatmap at another resolution than the image is resized bilinearly to the image size. An
    unbatched image can be combined with a batch of heatmaps (and vice versa); two batches must have
    the same size.

    Args:
        image: float tensor ``[3, H, W]`` or ``[B, 3, H, W]`` with values in [0, 1].
        heatmap: float tensor ``[h, w]`` or ``[B, h, w]`` with values in [0, 1].
        alpha: weight of the heatmap colour, in [0, 1].
        cmap: a colour map name, as in :func:`colorize`.
        seen: optional bool mask ``[H, W]`` at the image's size: where it is ``False`` (pixels
            the model never saw, e.g. outside its centre crop) the image is shown dimmed,
            without heatmap colour.

    Returns:
        uint8 tensor ``[H, W, 3]``, or ``[B, H, W, 3]`` when either input is batched.

    Example:
        >>> overlay(torch.zeros(3, 4, 4), torch.ones(2, 2), alpha=1.0, cmap="gray").shape
        torch.Size([4, 4, 3])
    """
    alpha = _check_alpha(alpha)
    cmap = check_cmap(cmap)
    image = _check_image(image)
    heatmap = _check_heatmap(heatmap)
    if image.dim() == 4 and heatmap.dim() == 3 and image.shape[0] != heatmap.shape[0]:
        raise ValueError(
            f"image and heatmap batch sizes differ: {image.shape[0]} vs {heatmap.shape[0]}"
        )
    batched = image.dim() == 4 or heatmap.dim() == 3
    images = image if image.dim() == 4 else image[None]
    heatmaps = heatmap if heatmap.dim() == 3 else heatmap[None]
    heatmaps = _resize(heatmaps.to(images.device), tuple(images.shape[-2:]))
    pixels = images.permute(0, 2, 3, 1) * 255.0  # [B, H, W, 3] in [0, 255]
    colour = _apply_lut(heatmaps, cmap).float()
    blended = (1.0 - alpha) * pixels + alpha * colour
    if seen is not None:
        if tuple(seen.shape) != tuple(images.shape[-2:]):
            raise ValueError(
                f"seen must be [H, W] at the image size {tuple(images.shape[-2:])}, "
                f"got shape {tuple(seen.shape)}"
            )
        mask = seen.to(device=images.device, dtype=torch.bool)[None, :, :, None]
        blended = torch.where(mask, blended, pixels * 0.5)
    out = blended.round().clamp(0, 255).to(torch.uint8)
    return out if batched else out[0]


def to_png_bytes(rgb_uint8: Tensor | np.ndarray) -> bytes:
    """Encode a uint8 RGB image ``[H, W, 3]`` (tensor or array) as PNG bytes.

    Example:
        >>> to_png_bytes(torch.zeros(2, 2, 3, dtype=torch.uint8))[:4]
        b'\\x89PNG'
    """
    if not isinstance(rgb_uint8, Tensor | np.ndarray):
        raise TypeError(
            "rgb_uint8 must be a torch.Tensor or np.ndarray [H, W, 3] of dtype uint8, "
            f"got {type(rgb_uint8).__name__}"
        )
    pixels = _to_numpy(rgb_uint8)
    if pixels.dtype != np.uint8:
        raise TypeError(f"rgb_uint8 must have dtype uint8, got {pixels.dtype}")
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or 0 in pixels.shape:
        raise ValueError(f"rgb_uint8 must have shape [H, W, 3], got shape {tuple(pixels.shape)}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(rgb: Tensor | np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write a uint8 RGB image ``[H, W, 3]`` to ``path`` as PNG; return the path.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_png(torch.zeros(2, 2, 3, dtype=torch.uint8), Path(folder) / "black.png").name
        'black.png'
    """
    path = Path(path)
    path.write_bytes(to_png_bytes(rgb))
    return path


# --------------------------------------------------------------------------- scores and titles


def score_names(task: str, similarity: str = "cosine") -> tuple[str, str]:
    """The names of the two scores every front door shows for one explained image, in order:
    the prediction's score and the explained score (what the heatmap explains).

    Classifiers: the softmax ``probability`` of the predicted class and the class's ``logit``;
    embedding models: the ``cosine similarity`` to the matched prototype or reference and the
    similarity the explainer scores (the model config's ``similarity``).

    Example:
        >>> score_names("classifier")
        ('probability', 'explained score (logit)')
        >>> score_names("embedding", "dot")
        ('cosine similarity', 'explained score (dot)')
    """
    if task == "classifier":
        return "probability", "explained score (logit)"
    return "cosine similarity", f"explained score ({similarity})"


def explanation_title(
    name: str,
    label: str,
    method: str,
    score: float,
    explained_score: float,
    *,
    task: str,
    similarity: str = "cosine",
) -> str:
    """The two-line title of an overlay figure, with both scores named by :func:`score_names`.

    Example:
        >>> print(explanation_title("x.png", "rose", "cam", 0.8875, 12.3161, task="classifier"))
        x.png: rose (cam)
        probability 0.8875, explained score (logit) 12.316
    """
    first, second = score_names(task, similarity)
    return f"{name}: {label} ({method})\n{first} {score:.4f}, {second} {explained_score:.3f}"


# --------------------------------------------------------------------------- figures


def overlay_figure(
    image: Tensor,
    heatmap: Tensor,
    *,
    title: str | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    colorbar: bool = True,
    dpi: int = 100,
    seen: Tensor | None = None,
) -> Tensor:
    """Render a figure: the image, its heatmap overlay and a "relevance" colour bar (0..1).

    Panels are drawn near the image's own resolution: ``H / dpi`` inches tall, at least
    2 and at most 6 inches (a small image is scaled up, a photograph down to 600 pixels at
    the default dpi).

    Args:
        image: float tensor ``[3, H, W]`` with values in [0, 1].
        heatmap: float tensor ``[h, w]`` with values in [0, 1] (resized to the image if needed).
        title: optional figure title.
        alpha, cmap, seen: as in :func:`overlay`.
        colorbar: draw the colour bar.
        dpi: resolution of the rendered figure.

    Returns:
        uint8 RGB tensor ``[H', W', 3]`` of the rendered figure.

    Example:
        >>> fig = overlay_figure(torch.rand(3, 32, 32), torch.rand(8, 8), title="demo")
        >>> fig.dtype, fig.shape[-1]
        (torch.uint8, 3)
    """
    image = _check_image(image)
    heatmap = _check_heatmap(heatmap)
    dpi = _check_dpi(dpi)
    if image.dim() != 3 or heatmap.dim() != 2:
        raise ValueError(
            "overlay_figure takes one image [3, H, W] and one heatmap [H, W], got shapes "
            f"{tuple(image.shape)} and {tuple(heatmap.shape)}; use grid() for batches"
        )
    blended = overlay(image, heatmap, alpha=alpha, cmap=cmap, seen=seen)
    rows = [[_to_numpy(image.permute(1, 2, 0)), _to_numpy(blended)]]
    return panel_figure(
        rows,
        col_titles=("image", "overlay"),
        title=title,
        colorbar=lut(cmap) if colorbar else None,
        dpi=dpi,
        cell_inches=min(max(image.shape[-2] / dpi, _CELL_INCHES), _MAX_CELL_INCHES),
    )


def grid(
    images: Tensor,
    heatmaps: Mapping[str, Tensor] | Tensor,
    *,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    colorbar: bool = True,
    title: str | None = None,
    dpi: int = 100,
) -> Tensor:
    """Render a side-by-side grid: one row per image, then one overlay column per method.

    The first column shows the image itself; each further column shows the overlay of one
    method's heatmap; a single "relevance" colour bar sits on the right.

    Args:
        images: float tensor ``[B, 3, H, W]`` (or one image ``[3, H, W]``) in [0, 1].
        heatmaps: ``{method name: heatmaps [B, h, w]}`` (``[h, w]`` for one image); the keys are
            the column titles. A bare tensor is one method titled ``"heatmap"``.
        titles: column titles for the method columns, overriding the keys (one per method).
        row_labels: one label per image, written left of each row.
        alpha, cmap: as in :func:`overlay`.
        colorbar: draw the colour bar.
        title: optional figure title (e.g. for a one-page summary).
        dpi: resolution of the rendered figure.

    Returns:
        uint8 RGB tensor ``[H', W', 3]`` of the rendered figure.

    Example:
        >>> imgs, maps = torch.rand(2, 3, 32, 32), torch.rand(2, 8, 8)
        >>> out = grid(imgs, {"fam": maps, "gradcam": maps}, row_labels=["cat", "dog"])
        >>> out.dtype, out.shape[-1]
        (torch.uint8, 3)
    """
    images = _check_image(images, name="images")
    dpi = _check_dpi(dpi)
    batch = images if images.dim() == 4 else images[None]
    if isinstance(heatmaps, Tensor):
        methods = {"heatmap": heatmaps}
    elif isinstance(heatmaps, Mapping):
        methods = dict(heatmaps)
    else:
        raise TypeError(
            "heatmaps must be a mapping {method name: tensor} or a tensor, "
            f"got {type(heatmaps).__name__}"
        )
    if not methods:
        raise ValueError("heatmaps must contain at least one method")
    col_titles = [str(name) for name in methods] if titles is None else [str(t) for t in titles]
    if len(col_titles) != len(methods):
        raise ValueError(f"titles must give one title per method ({len(methods)}), got {titles}")
    if row_labels is not None and len(row_labels) != batch.shape[0]:
        raise ValueError(
            f"row_labels must give one label per image ({batch.shape[0]}), got {len(row_labels)}"
        )
    columns = []
    for name, maps in methods.items():
        label = f"heatmaps[{name!r}]"
        maps = _check_heatmap(maps, name=label)
        expected = f"[{batch.shape[0]}, h, w]" if images.dim() == 4 else "[h, w]"
        if maps.dim() != images.dim() - 1 or (maps.dim() == 3 and maps.shape[0] != batch.shape[0]):
            raise ValueError(
                f"{label} must have shape {expected} to match images of shape "
                f"{tuple(images.shape)}, got {tuple(maps.shape)}"
            )
        columns.append(overlay(batch, maps.reshape(-1, *maps.shape[-2:]), alpha=alpha, cmap=cmap))
    rows = [
        [_to_numpy(batch[i].permute(1, 2, 0))] + [_to_numpy(column[i]) for column in columns]
        for i in range(batch.shape[0])
    ]
    return panel_figure(
        rows,
        col_titles=["image", *col_titles],
        row_labels=None if row_labels is None else [str(label) for label in row_labels],
        title=title,
        colorbar=lut(cmap) if colorbar else None,
        dpi=dpi,
    )


def image_grid(
    tiles: Sequence[Tensor | None],
    rows: int,
    cols: int,
    *,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Tensor:
    """Render images as a ``rows x cols`` figure, filled row by row.

    Tiles may differ in size from row to row (each panel shows its tile whole); ``None`` leaves
    a blank (white) panel.

    Args:
        tiles: ``rows * cols`` float images ``[3, h, w]`` in [0, 1], or ``None``.
        rows, cols: the grid's shape.
        titles: one title per column (written above the first row).
        row_labels: one label per row, written left of it.
        title: optional figure title.
        dpi: resolution of the rendered figure.

    Returns:
        uint8 RGB tensor ``[H', W', 3]`` of the rendered figure.

    Example:
        >>> out = image_grid([torch.rand(3, 8, 8), None], 1, 2, titles=["a", "b"])
        >>> out.dtype, out.shape[-1]
        (torch.uint8, 3)
    """
    dpi = _check_dpi(dpi)
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    tiles = list(tiles)
    if len(tiles) != rows * cols:
        raise ValueError(f"tiles must hold rows * cols = {rows * cols} images, got {len(tiles)}")
    if titles is not None and len(titles) != cols:
        raise ValueError(f"titles must give one title per column ({cols}), got {len(titles)}")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"row_labels must give one label per row ({rows}), got {len(row_labels)}")
    checked = [
        None if tile is None else _check_image(tile, name=f"tiles[{i}]")
        for i, tile in enumerate(tiles)
    ]
    if any(tile is not None and tile.dim() != 3 for tile in checked):
        raise ValueError("every tile must be one image [3, h, w] (or None)")
    shapes = [tuple(tile.shape[-2:]) for tile in checked if tile is not None]
    if not shapes:
        raise ValueError("tiles must contain at least one image")
    panels = []
    for r in range(rows):
        row_shapes = [
            tuple(t.shape[-2:]) for t in checked[r * cols : (r + 1) * cols] if t is not None
        ]
        blank_shape = row_shapes[0] if row_shapes else shapes[0]
        panels.append(
            [
                np.ones((*blank_shape, 3), dtype=np.float32)
                if tile is None
                else _to_numpy(tile.permute(1, 2, 0))
                for tile in checked[r * cols : (r + 1) * cols]
            ]
        )
    return panel_figure(
        panels,
        col_titles=[""] * cols if titles is None else [str(t) for t in titles],
        row_labels=None if row_labels is None else [str(label) for label in row_labels],
        title=title,
        dpi=dpi,
    )
