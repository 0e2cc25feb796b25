"""Estimate the runtime of a larger ``fam eval`` from the stage timings of a smaller one.

Usage::

    fam eval --images 50 --out out/eval-50
    python bench/eval_estimate.py out/eval-50/results.json --images 500

Each ``<method>/<setting>`` stage (explaining and scoring the setting's images) is scaled by
``images / explained`` of its setting; "tasks" (rendering and embedding the sets, which grow
with ``--images``) by ``images / asked``; the sanity checks (fixed image count) and the
statistics stage are kept as measured; "relevance" (on the classifier's test split, which
grows with ``--images``) by ``images / asked``. Fitting a method (relevant-features) is part of
its stage and does not grow, so the estimate errs long. CPU seconds estimate the wall time of a
quiet machine; on a loaded machine the wall seconds of the smaller run are inflated.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def estimate(data: dict, images: int, clock: str = "cpu") -> dict[str, float]:
    """Seconds per part of a run of ``images`` per setting, from ``results.json`` ``data``."""
    asked = data["options"]["images"]
    explained = {name: info["images"] for name, info in data["settings"].items()}
    parts = {"tasks": 0.0, "explain and metrics": 0.0, "sanity": 0.0, "relevance": 0.0}
    parts["statistics"] = 0.0
    for stage, spent in data["timings"].items():
        seconds = spent[clock]
        if stage.startswith("sanity/"):
            parts["sanity"] += seconds
        elif "/" in stage:
            setting = stage.rsplit("/", 1)[1]
            parts["explain and metrics"] += seconds * images / max(explained[setting], 1)
        elif stage in ("tasks", "relevance"):
            parts[stage] += seconds * max(images / asked, 1.0)
        else:
            parts["statistics"] += seconds * max(images / asked, 1.0)
    parts["total"] = sum(parts.values())
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.json of the smaller run")
    parser.add_argument("--images", type=int, required=True, help="images of the larger run")
    args = parser.parse_args()
    data = json.loads(args.results.read_text())
    measured = {clock: sum(t[clock] for t in data["timings"].values()) for clock in ("wall", "cpu")}
    print(
        f"measured ({data['options']['images']} images): wall {measured['wall']:.0f} s, "
        f"CPU {measured['cpu']:.0f} s, runtime {data['runtime_seconds']:.0f} s"
    )
    for clock in ("cpu", "wall"):
        parts = estimate(data, args.images, clock)
        shown = ", ".join(f"{k} {v:.0f} s" for k, v in parts.items())
        print(f"estimate for {args.images} images from {clock} seconds: {shown}")


if __name__ == "__main__":
    main()
