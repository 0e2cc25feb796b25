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
    """The report for a stored model, a config of any source, or an ``.onnx`` file.

    Torch models: :func:`fam_core.inspection.inspect_model`; ONNX graphs:
    :func:`exporters.graft.inspect_onnx` (the tensors a head can be grafted onto).
    """
    from fam_core.inspection import inspect_model
    from fam_core.models.store import ModelConfig, find_config, load_model

    if str(name_or_path).endswith(".onnx"):
        return _inspect_onnx(name_or_path, target_tensor=layer)
    config = ModelConfig.from_file(find_config(name_or_path))
    if config.onnx is not None:
        output = config.output if isinstance(config.output, str) else None
        return f"model {config.name}\n" + _inspect_onnx(
            config.directory / config.onnx,
            input_size=config.input_size,
            output_name=output,
            target_tensor=layer or config.target_tensor,
        )
    model, config = load_model(name_or_path)
    report = inspect_model(
        model,
        input_size=config.input_size,
        target_layer=layer or config.target_layer or None,
        output=config.output,
        task=config.task,
    )
    return f"model {config.name}\n{report}"


def _inspect_onnx(path: object, **options: object) -> str:
    from exporters.graft import inspect_onnx

    return str(inspect_onnx(path, **options))  # type: ignore[arg-type]
