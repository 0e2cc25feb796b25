"""Helpers of the search serving tests: a tiny gallery of the embedded benchmark's flowers, an
index of it built with the default embedding model, model folders that name it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from fam_core.data.flowers import SPLITS, class_attributes, make_flowers
from fam_core.models.store import find_config
from fam_core.pipeline import ServedModel
from fam_core.pipeline.explained_search import embed, load_uri_image
from fam_core.render import to_png_bytes
from fam_core.search import IndexRow, model_card, open_index

SEARCH_MODEL = "gallery-embedding"
KNN_MODEL = "gallery-knn"
PLAIN_MODEL = "plain-embedding"
GALLERY_CLASSES = SPLITS["novel"][:3]
PER_CLASS = 3


@dataclass(frozen=True)
class Gallery:
    """The gallery's images (``label/i.png`` under ``root``) and a query of each class that
    is not in it."""

    root: Path
    ids: tuple[str, ...]
    labels: tuple[str, ...]
    queries: tuple[Path, ...]

    def path(self, image_id: str) -> Path:
        return self.root / image_id


def _png(image: torch.Tensor) -> bytes:
    return to_png_bytes((image * 255).round().byte().permute(1, 2, 0))


def make_gallery(root: Path) -> Gallery:
    """``PER_CLASS`` flowers of each of ``GALLERY_CLASSES`` as PNG files in class folders, and
    one more flower per class (seed 1) as a query outside the gallery."""
    flowers = make_flowers(list(GALLERY_CLASSES), per_class=PER_CLASS, seed=0)
    ids, labels = [], []
    for number, (image, label) in enumerate(zip(flowers.images, flowers.labels, strict=True)):
        name = "-".join(class_attributes(int(label)))
        path = root / "gallery" / name / f"{number}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(image))
        ids.append(f"{name}/{number}.png")
        labels.append(name)
    others = make_flowers(list(GALLERY_CLASSES), per_class=1, seed=1)
    queries = []
    for number, image in enumerate(others.images):
        path = root / "queries" / f"query-{number}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(image))
        queries.append(path)
    return Gallery(root / "gallery", tuple(ids), tuple(labels), tuple(queries))


def write_model(folder: Path, name: str, **keys: object) -> Path:
    """The default embedding model's files in ``folder/name`` with ``name`` and ``keys``
    written into its config."""
    source = find_config("default-embedding").parent
    target = folder / name
    shutil.copytree(source, target)
    config = json.loads((target / "config.yaml").read_text())
    config.update(name=name, **keys)
    (target / "config.yaml").write_text(json.dumps(config, indent=2))
    return target


def build_index(
    gallery: Gallery,
    model_folder: Path,
    uri: str,
    *,
    extra_rows: int = 0,
    index_type: str = "FLAT",
    index_params: dict[str, int] | None = None,
) -> None:
    """An index at ``uri`` of ``gallery`` embedded by the model in ``model_folder`` (loaded
    before its config names the index), of ``index_type`` built with ``index_params``.
    ``extra_rows``: rows whose image file does not exist, each a copy of a gallery image's
    embedding (``gone-N.png``)."""
    served = ServedModel.load(model_folder)
    uris = [str(gallery.path(image_id)) for image_id in gallery.ids]
    inputs = torch.stack([load_uri_image(served, path) for path in uris])
    embeddings = embed(served, inputs)
    rows = [
        IndexRow(image_id, path, label, embedding)
        for image_id, path, label, embedding in zip(
            gallery.ids, uris, gallery.labels, embeddings, strict=True
        )
    ]
    rows += [
        IndexRow(f"gone-{n}.png", str(gallery.root / f"gone-{n}.png"), None, embeddings[n])
        for n in range(extra_rows)
    ]
    index = open_index(uri)
    try:
        card = model_card(served)
        index.create(replace(card, index_type=index_type, index_params=index_params or {}))
        index.upsert(rows)
    finally:
        index.close()


def build_index_elsewhere(gallery: Gallery, model_folder: Path, uri: str) -> None:
    """:func:`build_index` in a subprocess: a Milvus Lite file stays locked by the process
    that opened it, and a server in another process is to open this one."""
    fields = {k: [str(v) for v in value] if isinstance(value, tuple) else str(value)
              for k, value in asdict(gallery).items()}  # fmt: skip
    code = (
        "import json, sys; from pathlib import Path; "
        "from search_helpers import Gallery, build_index; "
        "g = json.loads(sys.argv[1]); "
        "gallery = Gallery(Path(g['root']), tuple(g['ids']), tuple(g['labels']), "
        "tuple(Path(q) for q in g['queries'])); "
        "build_index(gallery, Path(sys.argv[2]), sys.argv[3])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(fields), str(model_folder), uri],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"building the index {uri} failed:\n{done.stderr}")
