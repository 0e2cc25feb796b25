"""What a bulk output adds up to: per-model means, checkpoint montages, the domain gap.

- :func:`mean_heatmaps` / :func:`write_summary`: per model, the images, errors, the mean of
  each per-image metric (``--eval``) and the mean heatmap, read shard by shard;
- :func:`write_montages`: several models (checkpoints of one model, as Wu et al. watch a
  model over its training epochs) side by side, one PNG per image;
- :func:`domain_gap` / :func:`write_domain_gap`: the mean heatmap of two data sets through one
  model and their difference (Wu et al.'s domain-gap analysis).

Example:
    >>> import torch
    >>> gap = domain_gap({"m": (torch.ones(2, 2), 3)}, {"m": (torch.zeros(2, 2), 5)})
    >>> gap["m"]["mean_abs_difference"], gap["m"]["images"]
    (1.0, [3, 5])
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from fam_core.bulk.atomic import remove_temporaries, write_bytes_atomically
from fam_core.bulk.rows import METRIC_COLUMNS, decode_heatmap
from fam_core.bulk.shards import shard_files
from fam_core.render import colorize, to_png_bytes

SUMMARY_FILE = "summary.json"
MeanMaps = dict[str, tuple[torch.Tensor, int]]
"""Per model: the mean heatmap and the number of images averaged."""


def _shards(out: Path) -> list[Path]:
    files = shard_files(Path(out))
    if not files:
        raise ValueError(f"{out} holds no fam bulk shards (shards/shard-*.parquet)")
    return files


def _write_png(rgb: np.ndarray | torch.Tensor, path: Path) -> Path:
    return write_bytes_atomically(path, to_png_bytes(rgb))


def mean_heatmaps(out: Path) -> MeanMaps:
    """The mean heatmap of each model over its explained images (one shard in memory at a time)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for file in _shards(out):
        columns = ["model", "error", "heatmap", "heatmap_shape"]
        for row in pq.read_table(file, columns=columns).to_pylist():
            if row["error"] or row["heatmap"] is None:
                continue
            heatmap = decode_heatmap(row).double()
            total = sums.setdefault(row["model"], torch.zeros_like(heatmap))
            if total.shape != heatmap.shape:
                raise ValueError(
                    f"model {row['model']!r} has heatmaps of shapes {tuple(total.shape)} and "
                    f"{tuple(heatmap.shape)}: no mean heatmap"
                )
            total += heatmap
            counts[row["model"]] = counts.get(row["model"], 0) + 1
    return {m: ((sums[m] / counts[m]).float(), counts[m]) for m in sums}


def summarise(out: Path) -> dict[str, Any]:
    """Per model: images, errors and the mean of each metric over the images that have it
    (Average Drop: eq. 21 over the images with a positive score)."""
    models: dict[str, dict[str, Any]] = {}
    for file in _shards(out):
        for row in pq.read_table(file, columns=["model", "error", *METRIC_COLUMNS]).to_pylist():
            entry = models.setdefault(
                row["model"], {"images": 0, "errors": 0, "sums": {}, "counts": {}}
            )
            entry["images"] += 1
            entry["errors"] += bool(row["error"])
            for name in METRIC_COLUMNS:
                if row[name] is not None and not math.isnan(row[name]):
                    entry["sums"][name] = entry["sums"].get(name, 0.0) + row[name]
                    entry["counts"][name] = entry["counts"].get(name, 0) + 1
    return {
        model: {
            "images": entry["images"],
            "errors": entry["errors"],
            "metrics": {n: entry["sums"][n] / entry["counts"][n] for n in entry["sums"]},
        }
        for model, entry in models.items()
    }


def write_summary(out: Path) -> Path:
    """``summary.json`` and a ``mean-<model>.png`` per model in ``out``; the summary's path."""
    summary = summarise(out)
    for model, (mean, count) in mean_heatmaps(out).items():
        image = _write_png(colorize(mean.clamp(0, 1)), out / f"mean-{_safe(model)}.png")
        summary[model].update(mean_heatmap=image.name, mean_heatmap_images=count)
    text = json.dumps(summary, indent=1, sort_keys=True)
    return write_bytes_atomically(out / SUMMARY_FILE, text.encode())


def write_montages(out: Path, models: list[str]) -> Path:
    """One PNG per image in ``out/montage``: the overlay of each of ``models`` (served names),
    in that order, side by side; an image a model could not explain is a black panel."""
    folder = out / "montage"
    folder.mkdir(exist_ok=True)
    remove_temporaries(folder)
    for file in _shards(out):
        by_id: dict[str, dict[str, bytes | None]] = {}
        for row in pq.read_table(file, columns=["id", "model", "overlay_png"]).to_pylist():
            by_id.setdefault(row["id"], {})[row["model"]] = row["overlay_png"]
        for image_id, overlays in by_id.items():
            panels = [_pixels(overlays.get(m)) for m in models]
            shape = next((p.shape for p in panels if p is not None), None)
            if shape is None:  # no model explained it
                continue
            filled = [np.zeros(shape, np.uint8) if p is None else p for p in panels]
            height = max(p.shape[0] for p in filled)
            filled = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0))) for p in filled]
            _write_png(np.concatenate(filled, axis=1), folder / f"{_safe(image_id)}.png")
    return folder


def domain_gap(first: MeanMaps, second: MeanMaps) -> dict[str, dict[str, Any]]:
    """Per model of both: the difference of the mean heatmaps, first minus second, and its size."""
    common = sorted(set(first) & set(second))
    if not common:
        raise ValueError(f"the outputs share no model: {sorted(first)} vs {sorted(second)}")
    gaps = {}
    for model in common:
        (a, count_a), (b, count_b) = first[model], second[model]
        if a.shape != b.shape:
            raise ValueError(
                f"model {model!r}: mean heatmaps of shapes {tuple(a.shape)} and "
                f"{tuple(b.shape)}; run both at the same --resolution"
            )
        difference = a - b
        gaps[model] = {
            "difference": difference,
            "images": [count_a, count_b],
            "mean_abs_difference": float(difference.abs().mean()),
            "max_abs_difference": float(difference.abs().max()),
        }
    return gaps


def write_domain_gap(first: Path, second: Path, out: Path) -> dict[str, Any]:
    """The gap of two bulk outputs: ``mean-first-<m>.png``, ``mean-second-<m>.png``,
    ``gap-<m>.png`` (blue: first lower, red: first higher) and ``gap.json``; the first
    model's numbers."""
    means = mean_heatmaps(first), mean_heatmaps(second)
    gaps = domain_gap(*means)
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out)
    for model, gap in gaps.items():
        for which, maps in zip(("first", "second"), means, strict=True):
            _write_png(
                colorize(maps[model][0].clamp(0, 1)), out / f"mean-{which}-{_safe(model)}.png"
            )
        _write_png(colorize((gap["difference"] + 1) / 2, "bwr"), out / f"gap-{_safe(model)}.png")
    numbers = {
        model: {k: v for k, v in gap.items() if k != "difference"} for model, gap in gaps.items()
    }
    text = json.dumps({"first": str(first), "second": str(second), "models": numbers}, indent=1)
    write_bytes_atomically(out / "gap.json", text.encode())
    return numbers[sorted(numbers)[0]]


def _pixels(png: bytes | None) -> np.ndarray | None:
    return None if png is None else np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _safe(name: str) -> str:
    """A file name for an id or model: path separators and odd characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"
