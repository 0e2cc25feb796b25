"""Screenshots of the browser viewer (``fam ui``) for the documentation, in Debian's chromium.

Run from the repository root (a few seconds):

    python scripts/ui_screenshots.py [--out docs/images]

The embedded default models on the embedded benchmark (``fam_core.data.flowers``): the
classifier's page for one novel-class flower (``ui_classes.png``), and the embedding model's
page for the same flower searched in an index of benchmark flowers built by ``fam index
build``'s engine (``ui_neighbours.png``; about half a minute, most of it Ray's start). The
page is driven as a user drives it: an image is chosen in its file input and the answer
awaited.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from fam_core.bulk.index_build import LABELS_FROM_FOLDER, build_index
from fam_core.data.flowers import CLASS_NAMES, SPLITS, make_flowers
from fam_core.models.store import find_config
from fam_core.render import to_png_bytes
from fam_core.ui.app import ViewerServer
from fam_core.ui.backends import LocalBackend

SEED = 700
GALLERY_CLASSES = 6  # novel classes in the gallery
PER_CLASS = 3
TOP_K = 6
VIEWPORT = {"width": 1200, "height": 900}


def _png(image) -> bytes:  # type: ignore[no-untyped-def]
    return to_png_bytes((image * 255).round().byte().permute(1, 2, 0))


def _write_gallery(root: Path) -> Path:
    """Novel-class flowers in one folder per class; returns a query of the first class that
    is not in the gallery."""
    classes = list(SPLITS["novel"][:GALLERY_CLASSES])
    flowers = make_flowers(classes, PER_CLASS + 1, seed=SEED)
    for position, (image, label) in enumerate(zip(flowers.images, flowers.labels, strict=True)):
        index = position % (PER_CLASS + 1)
        folder = root / "gallery" / CLASS_NAMES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        target = root / "query.png" if position == 0 else folder / f"{index}.png"
        if position == 0 or index > 0:
            target.write_bytes(_png(image))
    return root / "query.png"


def _indexed_model(root: Path) -> Path:
    """The default embedding model's folder, copied with ``index:`` naming an index of the
    gallery under ``root`` (the same name: an index is searched by the model that built it);
    returns its config."""
    build_index("default-embedding", str(root / "gallery"), str(root / "gallery.db"),
                labels=LABELS_FROM_FOLDER, num_cpus=2)  # fmt: skip
    folder = root / "indexed"
    shutil.copytree(find_config("default-embedding").parent, folder)
    config = json.loads((folder / "config.yaml").read_text())
    config.update(index="../gallery.db", top_k=TOP_K)
    (folder / "config.yaml").write_text(json.dumps(config, indent=2))
    return folder / "config.yaml"


def _shoot(browser, viewer: ViewerServer, query: Path, cards: int, out: Path) -> Path:  # type: ignore[no-untyped-def]
    viewer.start()
    try:
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(viewer.url)
        page.wait_for_selector("body[data-ready=true]")
        page.set_input_files("#file", str(query))
        page.wait_for_function(
            f"document.querySelectorAll('.card').length === {cards} || "
            "document.querySelector('#status.error') !== null",
            timeout=120_000,
        )
        if page.query_selector("#status.error") is not None:
            raise SystemExit(f"{viewer.url}: {page.inner_text('#status')}")
        page.screenshot(path=str(out), full_page=True)
        page.close()
    finally:
        viewer.stop()
    return out


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as folder, sync_playwright() as playwright:
        query = _write_gallery(Path(folder))
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        classes = ViewerServer(LocalBackend.load("default-classifier"), port=0)
        print(_shoot(browser, classes, query, 5, args.out / "ui_classes.png"))
        search = ViewerServer(LocalBackend.load(str(_indexed_model(Path(folder)))), port=0)
        print(_shoot(browser, search, query, TOP_K, args.out / "ui_neighbours.png"))
        browser.close()


if __name__ == "__main__":
    main()
