"""Rendering of explanation heatmaps: colour maps, overlays, PNG encoding and figures.

The heatmap functions live in :mod:`fam_core.render.heatmaps`, the figures' layout in
:mod:`fam_core.render.panels` and the colour tables in :mod:`fam_core.render.colormaps`;
``from fam_core.render import overlay`` keeps working.
"""

from fam_core.render import heatmaps
from fam_core.render.heatmaps import *  # noqa: F403  (the public functions: heatmaps.__all__)

__all__ = list(heatmaps.__all__)
