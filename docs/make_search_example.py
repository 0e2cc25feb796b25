"""Write the "Explained search" page's example folder and render its montage with the real commands.

Run from the repository root (about a minute on two CPU cores):

    python docs/make_search_example.py [--folder out/search-example] [--montage docs/images/search_montage.png]

Writes ``FOLDER/gallery/<class>/flower-NN.png`` (novel-class images of the embedded benchmark,
``fam_core.data.flowers``, that the default embedding model never saw in training; one folder
per class, so ``--labels folder`` labels them) and ``FOLDER/queries/<class>.png`` (one more
image of each class, not in the gallery). With ``--montage``, it then runs the page's commands
(``fam index build`` and ``fam search --out``) and copies the first query's montage there. The
montage is committed; run the script again after a change to the default models or the
montage's drawing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

from fam_core.data.flowers import CLASS_NAMES, SPLITS, make_flowers
from fam_core.render import to_png_bytes

CLASSES = SPLITS["novel"][:6]
PER_CLASS = 16
SEED = 0


def write_example(folder: Path) -> list[Path]:
    """Write the gallery and the queries; return the query files."""
    for part in ("gallery", "queries"):  # what an earlier run wrote; nothing else of FOLDER
        shutil.rmtree(folder / part, ignore_errors=True)
    flowers = make_flowers(list(CLASSES), per_class=PER_CLASS + 1, seed=SEED)
    queries = []
    for number, (image, label) in enumerate(zip(flowers.images, flowers.labels, strict=True)):
        name = CLASS_NAMES[int(label)]
        index_in_class = number % (PER_CLASS + 1)
        if index_in_class == PER_CLASS:
            path = folder / "queries" / f"{name}.png"
            queries.append(path)
        else:
            path = folder / "gallery" / name / f"flower-{index_in_class:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(to_png_bytes((image * 255).round().byte().permute(1, 2, 0)))
    return queries


def fam(*arguments: str) -> None:
    """Run ``fam`` as the page does; stop on failure."""
    command = [sys.executable, "-m", "fam_core.cli", *arguments]
    print("$ fam " + " ".join(arguments), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("out/search-example"))
    parser.add_argument("--montage", type=Path, help="copy the first query's montage here")
    args = parser.parse_args()
    queries = write_example(args.folder)
    print(
        f"wrote {args.folder}/gallery ({len(CLASSES)} classes x {PER_CLASS}) and {len(queries)} queries"
    )
    if args.montage is None:
        return
    index, out = args.folder / "gallery.db", args.folder / "results"
    fam(
        "index",
        "build",
        "--model",
        "default-embedding",
        "--images",
        str(args.folder / "gallery"),
        "--index",
        str(index),
        "--labels",
        "folder",
        "--num-cpus",
        "2",
    )
    fam(
        "search",
        "--model",
        "default-embedding",
        "--index",
        str(index),
        "--top-k",
        "5",
        "--explain",
        "both",
        "--out",
        str(out),
        str(queries[0]),
    )
    montage = sorted(out.glob("*.png"))[0]
    args.montage.parent.mkdir(parents=True, exist_ok=True)
    Image.open(montage).quantize(256).save(args.montage, optimize=True)
    print(f"wrote {args.montage}")


if __name__ == "__main__":
    main()
