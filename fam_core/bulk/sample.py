"""Image sets on disk from the embedded benchmark, to try ``fam bulk`` (and test and time it).

Example:
    >>> import tempfile
    >>> files = write_flower_pngs(tempfile.mkdtemp(), 3)
    >>> [f.name for f in files]
    ['flower-00000.png', 'flower-00001.png', 'flower-00002.png']
"""

from __future__ import annotations

from pathlib import Path

from fam_core.bulk.atomic import write_bytes_atomically
from fam_core.data.flowers import NUM_CLASSES, make_flowers_for
from fam_core.render import to_png_bytes


def write_flower_pngs(folder: str | Path, count: int, *, seed: int = 0) -> list[Path]:
    """Write ``count`` benchmark flowers (classes in turn) as ``flower-NNNNN.png``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = [i % NUM_CLASSES for i in range(count)]
    indices = [i // NUM_CLASSES for i in range(count)]
    files = []
    for start in range(0, count, 256):  # render in chunks: bounded memory
        rows = slice(start, start + 256)
        images = make_flowers_for(labels[rows], indices[rows], seed=seed).images
        for offset, image in enumerate(images):
            pixels = (image * 255).round().byte().permute(1, 2, 0)
            path = folder / f"flower-{start + offset:05d}.png"
            files.append(write_bytes_atomically(path, to_png_bytes(pixels)))
    return files
