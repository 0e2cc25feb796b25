"""Figures of image panels drawn with Pillow: a title, column titles, row labels, a grid of
equally tall panels and an optional "relevance" colour bar.

Sizes follow a figure's conventions: ``dpi`` pixels per inch, text sized in points. Drawing
touches no global state, so figures are safe in servers and threads.

Example:
    >>> import numpy as np
    >>> from fam_core.render.colormaps import lut
    >>> cell = np.zeros((8, 8, 3), dtype=np.uint8)
    >>> figure = panel_figure([[cell, cell]], col_titles=["a", "b"], colorbar=lut("jet"))
    >>> figure.dtype, figure.shape[-1]
    (torch.uint8, 3)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

_CELL_INCHES = 2.0
_TEXT_POINTS = 10.0
_TITLE_POINTS = 11.0
_PAD_INCHES = 0.08
_BAR_INCHES = 0.18  # width of the colour bar
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)


@functools.lru_cache(maxsize=16)
def _font(pixels: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(pixels, 6))


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, _, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, spacing=2)
    return right - left, bottom  # from the text's origin: the ascent above the glyphs counts


def _rotated_label(text: str, font, height: int) -> Image.Image:
    """A label written bottom-to-top (as a y-axis label), centred on ``height`` pixels."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width, tall = _text_size(probe, text, font)
    strip = Image.new("RGB", (max(width, 1), max(tall, 1) + 4), _WHITE)
    ImageDraw.Draw(strip).text((0, 0), text, fill=_BLACK, font=font, anchor="la")
    strip = strip.rotate(90, expand=True)
    column = Image.new("RGB", (strip.width, height), _WHITE)
    column.paste(strip, (0, max((height - strip.height) // 2, 0)))
    return column


def _colour_bar(lut: torch.Tensor, height: int, dpi: int, font) -> Image.Image:
    """A vertical bar from 0 (bottom) to 1 (top), ticks 0, 0.5, 1 and the label "relevance"."""
    bar_width = max(round(_BAR_INCHES * dpi), 4)
    rows = torch.linspace(1.0, 0.0, max(height, 2))
    index = rows.mul(lut.shape[0] - 1).round().long()
    strip = lut[index][:, None, :].expand(-1, bar_width, -1).contiguous().numpy()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tick_width = max(_text_size(probe, tick, font)[0] for tick in ("0.0", "0.5", "1.0"))
    label = _rotated_label("relevance", font, height)
    gap = max(round(0.04 * dpi), 2)
    out = Image.new("RGB", (bar_width + 2 * gap + tick_width + gap + label.width, height), _WHITE)
    out.paste(Image.fromarray(strip, mode="RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, 0, bar_width - 1, height - 1), outline=_BLACK)
    for value in (0.0, 0.5, 1.0):
        y = round((1.0 - value) * (height - 1))
        draw.line((bar_width, y, bar_width + gap, y), fill=_BLACK)
        anchor = "lt" if value == 1.0 else "lb" if value == 0.0 else "lm"
        draw.text((bar_width + 2 * gap, y), f"{value:.1f}", fill=_BLACK, font=font, anchor=anchor)
    out.paste(label, (bar_width + 2 * gap + tick_width + gap, 0))
    return out


def panel_figure(
    rows: Sequence[Sequence[np.ndarray]],
    *,
    col_titles: Sequence[str],
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    colorbar: torch.Tensor | None = None,
    dpi: int = 100,
    cell_inches: float = _CELL_INCHES,
) -> torch.Tensor:
    """Lay out RGB panels (``[h, w, 3]`` arrays, uint8 or float in [0, 1]) row by row.

    Every panel is ``cell_inches * dpi`` pixels tall, as wide as its aspect ratio asks (within
    1:4 and 4:1) as the first panel; every panel is shown whole in its cell. ``colorbar`` is the look-up
    table ``[256, 3]`` of the colour bar drawn on the right (``None``: no bar).

    Returns:
        uint8 RGB tensor ``[H', W', 3]`` of the figure.
    """
    pad = max(round(_PAD_INCHES * dpi), 2)
    text_font = _font(round(_TEXT_POINTS * dpi / 72))
    title_font = _font(round(_TITLE_POINTS * dpi / 72))
    cell_h = max(round(cell_inches * dpi), 8)
    first = rows[0][0]
    aspect = min(max(first.shape[1] / first.shape[0], 0.25), 4.0)
    cell_w = max(round(cell_h * aspect), 8)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_h = _text_size(probe, title or "", title_font)[1]
    col_title_h = max(_text_size(probe, str(t), text_font)[1] for t in col_titles)
    labels = [_rotated_label(str(label), text_font, cell_h) for label in row_labels or ()]
    label_w = max((label.width for label in labels), default=0)
    grid_left = pad + (label_w + pad if labels else 0)
    grid_top = pad + (title_h + pad if title else 0) + (col_title_h + pad if col_title_h else 0)
    ncols = len(rows[0])
    grid_w = ncols * cell_w + (ncols - 1) * pad
    grid_h = len(rows) * cell_h + (len(rows) - 1) * pad
    bar = None if colorbar is None else _colour_bar(colorbar, grid_h, dpi, text_font)
    width = grid_left + grid_w + pad + (bar.width + pad if bar else 0)
    figure = Image.new("RGB", (width, grid_top + grid_h + pad), _WHITE)
    draw = ImageDraw.Draw(figure)
    if title:
        draw.multiline_text(
            (width // 2, pad), title, fill=_BLACK, font=title_font, anchor="ma", align="center",
            spacing=2,
        )  # fmt: skip
    for c, text in enumerate(col_titles):
        x = grid_left + c * (cell_w + pad) + cell_w // 2
        draw.text((x, grid_top - pad), str(text), fill=_BLACK, font=text_font, anchor="md")
    for r, row in enumerate(rows):
        y = grid_top + r * (cell_h + pad)
        if labels:
            figure.paste(labels[r], (pad, y))
        for c, pixels in enumerate(row):
            figure.paste(_panel(pixels, (cell_w, cell_h)), (grid_left + c * (cell_w + pad), y))
    if bar:
        figure.paste(bar, (grid_left + grid_w + pad, grid_top))
    return torch.from_numpy(np.asarray(figure).copy())


def _panel(pixels: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The pixels scaled to fit ``size`` whole (aspect kept), centred on white."""
    if pixels.dtype != np.uint8:
        pixels = np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    if image.size == size:
        return image
    scale = min(size[0] / image.width, size[1] / image.height)
    fitted = (max(round(image.width * scale), 1), max(round(image.height * scale), 1))
    panel = Image.new("RGB", size, _WHITE)
    panel.paste(
        image.resize(fitted, Image.Resampling.LANCZOS),
        ((size[0] - fitted[0]) // 2, (size[1] - fitted[1]) // 2),
    )
    return panel
