"""``fam inspect NAME_OR_CONFIG``: the candidate target layers, the chosen one, the head after it."""

from __future__ import annotations

import argparse


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inspect", help="list a model's candidate target layers and the head after the chosen one"
    )
    parser.add_argument("model", metavar="NAME_OR_CONFIG", help="model name, config path or .onnx")
    parser.add_argument("--layer", help="target layer to inspect (default: found automatically)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(inspect_source(args.model, layer=args.layer))
    return 0


def inspect_source(name_or_path: str, *, layer: str | None = None) -> str:
    """The report of :func:`fam_core.inspection.inspect_model` for a stored model or config."""
    from fam_core.inspection import inspect_model
    from fam_core.models.store import load_model

    model, config = load_model(name_or_path)
    report = inspect_model(
        model,
        input_size=config.input_size,
        target_layer=layer or config.target_layer or None,
        task=config.task,
    )
    return f"model {config.name}\n{report}"
