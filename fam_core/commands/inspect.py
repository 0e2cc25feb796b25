"""``fam inspect NAME_OR_CONFIG``: the candidate target layers, the chosen one, the head after it.

For an ONNX graph (an ``onnx:`` config or an ``.onnx`` path) the candidates are the graph's
feature-map values (the config's ``target_tensor`` is the chosen one when it names one) and
the head is the one :func:`fam_core.exporters.graft.graft_onnx` would graft onto, or the reason it
cannot, followed by the methods the file serves and why not the others
(:func:`fam_core.pipeline.onnx_methods.graftable_methods`; for the config's task, or for
both tasks without a config); a graph ``fam export`` wrote reports its baked method and
target layer.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fam_core.exporters.onnx_inspect import Inspection


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inspect", help="list a model's candidate target layers and the head after the chosen one"
    )
    parser.add_argument("model", metavar="NAME_OR_CONFIG", help="model name, config path or .onnx")
    parser.add_argument(
        "--layer",
        help="target layer (ONNX: target tensor) to inspect (default: found automatically)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(inspect_source(args.model, layer=args.layer))
    return 0


def inspect_source(name_or_path: str, *, layer: str | None = None) -> str:
    """The report of :func:`fam_core.explainers.inspection.inspect_model` for a stored model or config,
    or of :func:`fam_core.exporters.graft.inspect_onnx` for an ONNX graph."""
    from fam_core.explainers.inspection import inspect_model
    from fam_core.models.store import ModelConfig, find_config, load_model

    if str(name_or_path).endswith(".onnx"):
        return inspect_onnx_source(Path(name_or_path), None, layer)
    config = ModelConfig.from_file(find_config(name_or_path))
    if config.source == "onnx":
        return inspect_onnx_source(config.directory / str(config.onnx), config, layer)
    model, config = load_model(name_or_path)
    report = inspect_model(
        model,
        input_size=config.input_size,
        target_layer=layer or config.target_layer or None,
        output=config.output,
        task=config.task,
        method=config.method,
    )
    return f"model {config.name}\n{report}"


def inspect_onnx_source(path: Path, config: object | None, layer: str | None) -> str:
    """The graft report of a plain ONNX file, or the metadata of one ``fam export`` wrote."""
    from fam_core.graphs import onnx_format as fmt
    from fam_core.models.store import ModelConfig
    from fam_core.pipeline.onnx_backend import graph_metadata

    name = config.name if isinstance(config, ModelConfig) else path.stem
    if not path.is_file():
        raise ValueError(f"onnx: file {path} is missing")
    meta = graph_metadata(path)
    if fmt.is_explanation_graph(meta):
        return (
            f"model {name}\nONNX graph written by fam export: method {meta.get(fmt.KEY_METHOD)}, "
            f"target layer {meta.get(fmt.KEY_TARGET_LAYER, '?')} (fixed in the graph)\n"
            f"methods: {meta.get(fmt.KEY_METHOD)} (the one fam export wrote; export the model "
            "again for another)"
        )
    from fam_core.exporters.graft import inspect_onnx

    target = layer or (config.target_tensor if isinstance(config, ModelConfig) else None)
    size = config.input_size if isinstance(config, ModelConfig) else None
    output = config.output if isinstance(config, ModelConfig) else None
    try:
        report = inspect_onnx(
            path,
            input_size=size,
            target_tensor=target,
            output_name=output if isinstance(output, str) else None,
            task=config.task if isinstance(config, ModelConfig) else None,
        )
    except (OSError, ValueError) as error:
        key = "target_tensor" if target is not None else "onnx"
        raise ValueError(f"model {name!r}: {key}: {str(error).splitlines()[0]}") from None
    text = str(report)
    task = config.task if isinstance(config, ModelConfig) else None
    method = config.method if isinstance(config, ModelConfig) else None
    return f"model {name}\n{text}\n{methods_report(report, task, method)}"


def methods_report(report: Inspection, task: str | None, method: str | None = None) -> str:
    """The methods the inspected file serves as a ``task`` model (both tasks for ``None``)
    and the default one (``method``: the config's), then each other method with the reason
    it is not served.

    Example:
        >>> print(methods_report(inspect_onnx("resnet18.onnx"), "classifier"))  # doctest: +SKIP
        methods (classifier): cam, gradcam
        default method (classifier): cam (a classifier whose head is global average ...)
        not served:
          fam: grafted onto embedding models only (a classifier takes cam, gradcam)
        ...
    """
    from fam_core.explainers.default_method import choose_method
    from fam_core.pipeline.onnx_methods import graftable_methods, served_methods

    if report.head is not None:
        head: str | None = "identity" if report.head.is_identity else "linear"
    else:
        head = report.head_kind
    lines: list[str] = []
    refused: dict[str, list[str]] = {}
    for kind in (task,) if task is not None else ("classifier", "embedding"):
        reasons = graftable_methods(kind, head, report.head_error)
        served = served_methods(reasons)
        lines.append(f"methods ({kind}): {', '.join(served) if served else 'none'}")
        if served:
            choice = choose_method(kind, configured=method, cam_refusal=reasons.get("cam"))
            lines.append(f"default method ({kind}): {choice}")
        for method, reason in reasons.items():
            if reason is not None:
                refused.setdefault(method, []).append(reason)
    lines.append("not served:")
    for method, reasons in refused.items():
        if task is None and len(reasons) < 2:
            continue  # served as the other task
        lines.append(f"  {method}: {'; '.join(dict.fromkeys(reasons))}")
    return "\n".join(lines)
