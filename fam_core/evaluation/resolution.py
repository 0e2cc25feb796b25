"""The map resolutions ``fam eval`` compares: which models each runs, and how its settings are named.

The default models come in two resolutions (see :data:`fam_core.package_data.DEFAULT_MODEL_NAMES`):
``coarse`` (Conv4, a 5x5 target layer at 84x84) and ``fine`` (Conv4-s8, 10x10). The settings of
the first resolution evaluated keep their plain names (``few-shot``, ``kNN``, ...); those of the
others are suffixed with their map size (``few-shot 10x10``), so every table row names both the
task and the resolution.

Example:
    >>> from fam_core.models.store import load_model
    >>> map_resolution(load_model("default-embedding-fine"))
    '10x10'
    >>> setting_name("few-shot", "10x10", first=False), setting_name("kNN", "5x5", first=True)
    ('few-shot 10x10', 'kNN')
"""

from __future__ import annotations

from fam_core.anatomy.discovery import find_layers
from fam_core.models.store import LoadedModel

RESOLUTIONS: tuple[str, ...] = ("coarse", "fine")
"""The resolutions ``fam eval --resolutions`` accepts, coarse first."""


def map_resolution(loaded: LoadedModel) -> str:
    """``"HxW"``: the size of the model's target-layer map at its config's input size."""
    size = loaded.config.input_size
    search = find_layers(loaded.model, (size, size))
    for candidate in search.candidates:
        if candidate.name == loaded.config.target_layer:
            height, width = candidate.layout.grid
            return f"{height}x{width}"
    raise ValueError(
        f"model {loaded.config.name!r}: target layer {loaded.config.target_layer!r} yields no "
        f"feature map at {size}x{size}"
    )


def setting_name(task: str, resolution: str, *, first: bool) -> str:
    """The setting's name in the report: ``task`` for the first resolution evaluated, else
    ``"task HxW"``."""
    return task if first else f"{task} {resolution}"
