"""Write an evaluation's report: results.json, a markdown table, plots and overlay grids."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fam_core.evaluation.runner import METRICS, EvalResult  # noqa: E402
from fam_core.evaluation.summary import REFERENCE_METHOD, SIGNIFICANCE  # noqa: E402
from fam_core.render import grid, save_png  # noqa: E402


def write_report(result: EvalResult, out: Path, command: str) -> list[Path]:
    """Write every file of the report into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md", out / "per_image.pt"]
    data = result.to_json()
    data["command"] = command
    written[0].write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    written[1].write_text(markdown(result, command))
    torch.save(result.per_image, written[2])  # plain tensors: torch.load(weights_only=True)
    written += bar_charts(result, out)
    written += curve_plots(result, out)
    written += overlay_grids(result, out)
    return written


def _cell(value: float | None, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if metric in ("average_drop", "increase_confidence"):
        return f"{round(value, 1) + 0.0:.1f}"  # + 0.0: no "-0.0" for a rounded-off -1e-9
    return f"{round(value, 3) + 0.0:.3f}"


def _interval_cell(result: EvalResult, name: str, method: str, metric: str) -> str:
    """``mean [low, high]``, with a dagger when it differs significantly from FAM."""
    interval = result.intervals.get(name, {}).get(method, {}).get(metric)
    if interval is None:
        return _cell(result.metrics[name][method].get(metric), metric)
    text = _cell(interval["mean"], metric)
    if not math.isnan(interval["low"]):
        text += f" [{_cell(interval['low'], metric)}, {_cell(interval['high'], metric)}]"
    if result.comparisons.get(name, {}).get(method, {}).get(metric, {}).get("significant"):
        text += " †"
    return text


def _metric_names(per_method: dict[str, dict[str, float]]) -> list[str]:
    """The table's columns: the known metrics in their order, then any others a setting adds."""
    present = list(dict.fromkeys(k for values in per_method.values() for k in values))
    return [m for m in METRICS if m in present] + [m for m in present if m not in METRICS]


def _model_label(info: dict) -> str:
    """The model of a setting with its target layer's map size, e.g. ``default-embedding, 5x5``."""
    resolution = info.get("resolution")
    return f"{info['model']}, {resolution}" if resolution else str(info["model"])


def _explained(info: dict) -> str:
    """What a setting explained: images, or (scene, reference) pairs from its scenes."""
    count = info.get("images", "?")
    if info.get("unit") == "pairs":
        return f"{count} (scene, reference) pairs from {info.get('asked', '?')} scenes"
    asked = f" of {info['asked']} asked" if "asked" in info else ""
    return f"{count} correctly handled images explained{asked}"


HEADLINE: tuple[tuple[str, str, str], ...] = (
    ("few-shot", "proportion", "few-shot proportion"),
    ("kNN", "proportion", "kNN proportion"),
    ("retrieval", "proportion", "retrieval proportion"),
    ("retrieval", "explanation_map_ap", "retrieval expl.-map AP"),
    ("scene", "proportion_matched", "scene: matched flower"),
    ("scene", "sensitivity_gap", "scene: sensitivity gap"),
    ("scene-retrieval", "sensitivity_gap", "scene-retrieval: sensitivity gap"),
    ("classifier", "proportion", "classifier proportion"),
)
"""The headline table's columns ``(setting, metric, label)``: what the evaluation's goals read
the methods against, one column per setting that ran (the README shows this table)."""


def headline(result: EvalResult) -> list[str]:
    """One table over the settings: the headline metric of each, per method (markdown lines).

    Example:
        >>> from types import SimpleNamespace
        >>> interval = {"mean": 0.5, "low": 0.4, "high": 0.6, "images": 9}
        >>> result = SimpleNamespace(metrics={"kNN": {"fam": {"proportion": 0.5}}},
        ...     intervals={"kNN": {"fam": {"proportion": interval}}}, comparisons={})
        >>> headline(result)[-1]
        '| fam | 0.500 [0.400, 0.600] |'
    """
    columns = [
        (name, metric, label)
        for name, metric, label in HEADLINE
        if any(metric in values for values in result.metrics.get(name, {}).values())
    ]
    if not columns:
        return []
    methods = list(dict.fromkeys(m for name, _, _ in columns for m in result.metrics[name]))
    lines = ["| method | " + " | ".join(label for _, _, label in columns) + " |"]
    lines.append("|---|" + "---|" * len(columns))
    for method in methods:
        cells = [
            _interval_cell(result, name, method, metric)
            if metric in result.metrics[name].get(method, {})
            else "–"
            for name, metric, _ in columns
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def markdown(result: EvalResult, command: str) -> str:
    """The tables of the report as markdown."""
    lines = [f"Command: `{command}` — runtime {result.runtime_seconds:.0f} s", ""]
    lines += ["| task | model | result |", "|---|---|---|"]
    for name, task in result.tasks.items():
        model = _model_label(result.settings[name])
        shown = ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in task.items()
        )
        lines.append(f"| {name} | {model} | {shown} |")
    if result.metrics:
        lines += [
            "",
            "Each cell: mean over the explained images [95 % percentile-bootstrap interval]. "
            f"† marks a mean that differs from `{REFERENCE_METHOD}`'s on the same images: "
            "paired bootstrap of the mean difference, two-sided p Holm-adjusted over the "
            f"methods compared on that metric, below {SIGNIFICANCE} (`comparisons` in "
            "`results.json` holds every difference, interval and p-value).",
        ]
        lines += ["", "**Headline** (one metric per setting; the tables below have them all)", ""]
        lines += headline(result)
    for name, per_method in result.metrics.items():
        metrics = _metric_names(per_method)
        info = result.settings.get(name, {})
        lines += [
            "",
            f"**{name}** ({_model_label(info)}, {_explained(info)})",
            "",
        ]
        lines.append("| method | " + " | ".join(metrics) + " |")
        lines.append("|---|" + "---|" * len(metrics))
        for method in per_method:
            cells = " | ".join(_interval_cell(result, name, method, m) for m in metrics)
            lines.append(f"| {method} | {cells} |")
    if result.sanity:
        lines += [
            "",
            "**Cascading randomisation** (mean Spearman ρ after each layer, top first)",
            "",
        ]
        lines += ["| method | model | layers | ρ | passes |", "|---|---|---|---|---|"]
        for method, per_setting in result.sanity.items():
            for name, check in per_setting.items():
                rho = ", ".join(f"{c:.2f}" for c in check["correlations"])
                verdict = "yes" if check["passed"] else "no"
                lines.append(
                    f"| {method} | {result.settings[name]['model']} | "
                    f"{' > '.join(check['layers'])} | {rho} | {verdict} |"
                )
    for name, values in result.relevance.items():
        lines += [
            "",
            f"**Feature relevance** (relevant-features on {result.settings[name]['model']}, "
            f"mu = {values['mu']:g}, {values['images']} held-out test images; "
            "Oramas et al. sec. 4.1 and supp. 8)",
            "",
            "| ablation | features | accuracy | relevant ablated | random ablated "
            "| relevant drop | random drop |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, prefix in (
            ("all classes' features", ""),
            ("own class's features", "per_class_"),
        ):
            lines.append(
                f"| {label} | {values[prefix + 'features']:.0f} | {values['accuracy']:.3f} | "
                f"{values[prefix + 'relevant_accuracy']:.3f} | "
                f"{values[prefix + 'random_accuracy']:.3f} | "
                f"{values[prefix + 'relevant_drop']:.3f} | {values[prefix + 'random_drop']:.3f} |"
            )
        curve = ", ".join(f"mu {mu}: {auc:.3f}" for mu, auc in values["reconstruction_auc"].items())
        lines += ["", f"Class reconstruction mean-AUC (supp. sec. 8): {curve}"]
    if result.skipped:
        lines += ["", "**Skipped**", ""]
        for method, reasons in result.skipped.items():
            for name, reason in reasons.items():
                lines.append(f"- {method} on {name}: {reason}")
    lines += ["", "Metrics: " + "; ".join(f"`{k}` {v}" for k, v in METRICS.items()), ""]
    return "\n".join(lines)


def bar_charts(result: EvalResult, out: Path) -> list[Path]:
    """One bar chart per metric: settings on the x axis, one bar per method, with its 95 %
    bootstrap interval as the error bar."""
    paths = []
    for metric, description in METRICS.items():
        settings = [
            s for s, per in result.metrics.items() if any(metric in v for v in per.values())
        ]
        if not settings:
            continue
        methods = [m for m in result.methods if any(m in result.metrics[s] for s in settings)]
        fig, ax = plt.subplots(figsize=(1.6 + 1.6 * len(settings), 3.2), dpi=100)
        width = 0.8 / max(len(methods), 1)
        for i, method in enumerate(methods):
            heights = [
                result.metrics[s].get(method, {}).get(metric, float("nan")) for s in settings
            ]
            bounds = [result.intervals.get(s, {}).get(method, {}).get(metric, {}) for s in settings]
            errors = [
                [h - b.get("low", h) for h, b in zip(heights, bounds, strict=True)],
                [b.get("high", h) - h for h, b in zip(heights, bounds, strict=True)],
            ]
            ax.bar(
                [j + i * width for j in range(len(settings))],
                heights,
                width,
                yerr=errors,
                capsize=1,
                error_kw={"linewidth": 0.6},
                label=method,
            )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))], settings)
        ax.set_title(description, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"metric_{metric}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def curve_plots(result: EvalResult, out: Path) -> list[Path]:
    """Mean deletion and insertion curves: one row per setting, one line per method."""
    if not result.curves:
        return []
    names = list(result.curves)
    fig, axes = plt.subplots(len(names), 2, figsize=(8, 2.6 * len(names)), dpi=100, squeeze=False)
    for row, name in enumerate(names):
        for col, kind in enumerate(("deletion", "insertion")):
            ax = axes[row][col]
            for method, curves in result.curves[name].items():
                points = curves[kind]
                ax.plot([k / (len(points) - 1) for k in range(len(points))], points, label=method)
            ax.set_title(f"{name}: {kind}", fontsize=9)
            ax.set_xlabel("fraction of pixels", fontsize=8)
            ax.set_ylabel("score", fontsize=8)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "deletion_insertion.png"
    fig.savefig(path)
    plt.close(fig)
    return [path]


def overlay_grids(result: EvalResult, out: Path) -> list[Path]:
    """For each setting, example images (rows) with each method's overlay (columns)."""
    paths = []
    for name, per_method in result.examples.items():
        images = result.example_images[name]
        path = save_png(grid(images, per_method, title=name), out / f"overlays_{name}.png")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Print the headline table of a finished run: ``python -m fam_core.evaluation.report
    OUT/results.json`` (how the README's table is regenerated from a run's results)."""
    import argparse
    from types import SimpleNamespace

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", type=Path, help="results.json written by fam eval")
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text())
    run = SimpleNamespace(
        **{key: data.get(key, {}) for key in ("metrics", "intervals", "comparisons")}
    )
    print(f"Command: `{data.get('command', '?')}` — runtime {data.get('runtime_seconds', 0):.0f} s")
    print()
    print("\n".join(headline(run)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
