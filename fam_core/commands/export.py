"""``fam export NAME_OR_CONFIG --method {fam,gradfam,cam,gradcam} --out FILE.onnx``.

Writes the model and its explanation head as one ONNX file (see :mod:`fam_core.exporters`). Every
torch source works (``backbone``, ``factory``, ``exported_program``): the config's module is
loaded and handed to the exporter with the config's task.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import TYPE_CHECKING

from torch import nn

from fam_core.explainers.default_method import RULE
from fam_core.graphs.onnx_format import METHODS

if TYPE_CHECKING:
    from fam_core.models.store import ModelConfig


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export", help="write a model and its explanation head as one ONNX graph"
    )
    parser.add_argument("model", metavar="NAME_OR_CONFIG", help="model name or config path")
    parser.add_argument(
        "--method",
        choices=METHODS,
        help=f"default: the model's ({RULE})",
    )
    parser.add_argument("--out", required=True, metavar="FILE.onnx")
    parser.add_argument("--layer", help="target layer (default: the config's, else found)")
    parser.add_argument(
        "--task",
        choices=("embedding", "classifier"),
        help="what the model's output is (default: the config's task)",
    )
    parser.add_argument(
        "--explain",
        choices=("mean", "best"),
        default="mean",
        help="fam: explain the mean over the references or only the best-scoring one",
    )
    parser.add_argument(
        "--bake-prototypes",
        action="store_true",
        help="fam/gradfam: bake the model's class prototypes into the graph",
    )
    parser.add_argument(
        "--class-input",
        action="store_true",
        help="cam/gradcam: take a class_index input instead of explaining the top-1 class",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fam_core.exporters import export_model
    from fam_core.models.store import load_model

    if not args.out.endswith(".onnx"):
        raise ValueError(f"--out must name a .onnx file, got {args.out!r}")
    model, config = load_model(args.model)
    if args.method is None:
        args.method = model_default_method(model, config, args.task, args.layer)
    try:
        path = export_model(
            model,
            config,
            task=args.task or config.task,
            method=args.method,
            path=args.out,
            target_layer=args.layer,
            references="prototypes" if args.bake_prototypes else None,
            explain=args.explain,
            class_input=args.class_input,
        )
    except (RuntimeError, AssertionError, NotImplementedError) as error:
        # the tracers' own failures, one line for the command line
        if config.source != "exported_program":
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else "RuntimeError"
        raise ValueError(
            f"exported_program: the ONNX exporter cannot trace {config.exported_program} "
            f"({first}); export from a factory: config of the same model instead"
        ) from None
    from fam_core.graphs.onnx_runtime import OnnxExplainer

    written = OnnxExplainer(path)
    print(f"wrote {path} ({args.method}, layer {written.target_layer})")
    return 0


def model_default_method(
    model: nn.Module, config: ModelConfig, task: str | None, layer: str | None
) -> str:
    """The method the model explains with by default (:mod:`fam_core.explainers.default_method`'s rule,
    as served), refused in one line when it has no ONNX head."""
    from fam_core.pipeline.torch_backend import TorchBackend

    config = replace(config, task=task or config.task, target_layer=layer or config.target_layer)
    method = TorchBackend(model, config).default_method
    if method not in METHODS:
        raise ValueError(
            f"the model's default method {method!r} has no ONNX head; pass --method, one of "
            f"{list(METHODS)}"
        )
    return method
