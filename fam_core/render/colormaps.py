"""Colour look-up tables for heatmaps.

``"jet"`` (the default everywhere) and ``"gray"`` are built in, so the base install renders
without matplotlib. Any other name is one of ``matplotlib.colormaps`` and needs matplotlib
(the ``eval`` extra installs it). The built-in ``"jet"`` is matplotlib's own: the same
piecewise-linear segments, sampled at the same 256 points.

Example:
    >>> lut("jet")[[0, 255]].tolist()
    [[0, 0, 128], [128, 0, 0]]
    >>> lut("gray")[128].tolist()
    [128, 128, 128]
"""

from __future__ import annotations

import functools

import numpy as np
import torch

LUT_SIZE = 256

# (x, value) knots of each channel, as matplotlib defines 'jet' (matplotlib/_cm.py)
_JET = (
    ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
)
BUILT_IN: tuple[str, ...] = ("jet", "gray")


def _segments(knots: tuple[tuple[tuple[float, float], ...], ...]) -> np.ndarray:
    """Linear interpolation between the knots at 256 points, in matplotlib's arithmetic (its
    rounding, so the table is the same to the last bit)."""
    x = (LUT_SIZE - 1) * np.linspace(0.0, 1.0, LUT_SIZE)
    channels = []
    for channel in knots:
        xk, yk = np.array(channel).T
        xk = xk * (LUT_SIZE - 1)
        right = np.searchsorted(xk, x[1:-1])
        distance = (x[1:-1] - xk[right - 1]) / (xk[right] - xk[right - 1])
        inner = distance * (yk[right] - yk[right - 1]) + yk[right - 1]
        channels.append(np.concatenate([[yk[0]], inner, [yk[-1]]]))
    return np.stack(channels, axis=1)


def _matplotlib_rgb(name: str) -> np.ndarray:
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            f"colormap {name!r} needs matplotlib, which is not installed "
            f"(pip install 'fam-core[eval]'); built in: {list(BUILT_IN)}"
        ) from None
    if name not in matplotlib.colormaps:
        raise ValueError(
            f"unknown colormap {name!r}; expected {list(BUILT_IN)} or a name from "
            "matplotlib.colormaps, e.g. 'viridis'"
        )
    return matplotlib.colormaps[name](np.linspace(0.0, 1.0, LUT_SIZE))[:, :3]


def check_cmap(name: object) -> str:
    """Return ``name`` if it names a colour map; raise ``TypeError``/``ValueError`` if not."""
    if not isinstance(name, str):
        raise TypeError(f"cmap must be a colormap name (str), got {type(name).__name__}")
    lut(name)
    return name


@functools.lru_cache(maxsize=32)
def lut(name: str) -> torch.Tensor:
    """The uint8 look-up table ``[256, 3]`` of a colour map (cached)."""
    if name == "jet":
        rgb = _segments(_JET)
    elif name == "gray":
        rgb = np.repeat(np.linspace(0.0, 1.0, LUT_SIZE)[:, None], 3, axis=1)
    else:
        rgb = _matplotlib_rgb(name)
    return torch.from_numpy(np.rint(rgb * 255.0).astype(np.uint8))
