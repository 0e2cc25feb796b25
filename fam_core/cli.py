"""The ``fam`` command line. Errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NoReturn

EXIT_USAGE = 2
DEMO_MODEL_NOTE = (
    "{model} is a demo model trained on 84x84 synthetic flowers (the embedded benchmark): "
    "on other images its labels and maps show how fam works, not what is in them"
)
LAYER_ERROR = "unknown target layer"
# Feature modules that add a subcommand: each defines ``add_command(commands)``, which adds a
# parser whose ``run`` default takes the parsed arguments and returns the exit code.
COMMAND_MODULES: tuple[str, ...] = (
    "fam_core.commands.archive",
    "fam_core.commands.bulk",
    "fam_core.commands.eval",
    "fam_core.commands.export",
    "fam_core.commands.index",
    "fam_core.commands.inspect",
    "fam_core.commands.search",
    "fam_core.commands.serve",
    "fam_core.commands.ui",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"fam: error: {message}\n")


def _progress(items: list[str], **options: object) -> Iterable[str]:
    """tqdm's progress bar where tqdm is installed (the ``eval`` extra), else the items."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, **options)


def _explain(args: argparse.Namespace) -> int:
    from fam_core.explainers.registry import check_runnable
    from fam_core.images.read import read_image
    from fam_core.images.resize import map_to_original
    from fam_core.pipeline import (
        DEFAULT_MODELS,
        EncodedImage,
        ExplainRequest,
        ModelRegistry,
        Pipeline,
        ServedModel,
        heatmap_from_bytes,
    )
    from fam_core.render import explanation_title, overlay_figure, save_png, score_names

    if args.method is not None:
        check_runnable(args.method)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: expected a folder for the overlays")
    served = ServedModel.load(args.model, target_layer=args.layer)
    config = served.config
    target_class = _target_class(args.target_class, config.class_names)
    pipeline = Pipeline(ModelRegistry([served]), batching=None)
    references = tuple(EncodedImage(_read_bytes(p)) for p in args.reference or ())
    out.mkdir(parents=True, exist_ok=True)
    progress = _progress(
        args.images, desc="explaining", unit="image", disable=len(args.images) < 8, file=sys.stderr
    )
    first, second = score_names(config.task, config.similarity)
    for index, path in enumerate(progress):
        original = read_image(path)  # one-line errors that name the file
        request = ExplainRequest(
            model=served.name,
            images=(EncodedImage(_read_bytes(path)),),
            method=args.method,
            references=references,
            target_class=target_class,
        )
        (result,) = pipeline.explain(request).results
        if index == 0:  # after the first image explained: an error stays the only line
            if served.name in DEFAULT_MODELS:
                print(f"fam: note: {DEMO_MODEL_NOTE.format(model=served.name)}", file=sys.stderr)
            print(f"# image\tlabel\t{first}\t{second}\toverlay")
        heatmap = heatmap_from_bytes(result.heatmap.data, result.heatmap.shape).float()
        mapped, seen = map_to_original(
            heatmap, tuple(original.shape[-2:]), config.image_size, config.resize
        )
        label, method = result.prediction.label, result.heatmap.method
        score, explained = result.prediction.score, result.explained_score
        title = explanation_title(
            Path(path).name,
            label,
            method,
            score,
            explained,
            task=config.task,
            similarity=config.similarity,
        )
        written = save_png(
            overlay_figure(original, mapped, title=title, seen=None if seen.all() else seen),
            out / f"{Path(path).stem}_{method}.png",
        )
        print(f"{path}\t{label}\t{score:.4f}\t{explained:.3f}\t{written}")
        if result.heatmap.warning:
            print(f"fam: warning: {path}: {result.heatmap.warning}", file=sys.stderr)
    return 0


def _target_class(value: str | None, class_names: Sequence[str]) -> int | None:
    """``--target-class``: a class index, or a name of the model's ``class_names``.

    Example:
        >>> _target_class("2", ()), _target_class("tulip", ("rose", "tulip")), _target_class(None, ())
        (2, 1, None)
    """
    if value is None:
        return None
    if value.lstrip("-").isdigit():
        return int(value)
    if value in class_names:
        return list(class_names).index(value)
    names = f"one of {list(class_names)}" if class_names else "none: the model has no class_names"
    raise ValueError(f"--target-class {value!r}: expected a class index or a class name ({names})")


def _read_bytes(path: str) -> bytes:
    if not Path(path).is_file():
        raise ValueError(f"no such image file: {path}")
    return Path(path).read_bytes()


def _demo(args: argparse.Namespace) -> int:
    from fam_core.commands.demo import run_demo

    run_demo(Path(args.out), count=args.count, seed=args.seed)
    return 0


def _train(args: argparse.Namespace) -> int:
    from fam_core.models import training
    from fam_core.package_data import OUTPUT_MODEL_STORE

    out = Path(args.out) if args.out else OUTPUT_MODEL_STORE / args.name
    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    config = training.build_default_model(args.name, out, print, **overrides)
    print(f"wrote {out} {config.metrics}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fam_core import __version__
    from fam_core.explainers.registry import method_help
    from fam_core.package_data import DEFAULT_MODEL_NAMES

    parser = _Parser(
        prog="fam", description="Feature Activation Maps for embedding models and classifiers."
    )
    parser.add_argument("--version", action="version", version=f"fam-core {__version__}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_Parser, title="commands"
    )

    demo = commands.add_parser("demo", help="explain benchmark images with the default models")
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--count", type=int, default=5, help="images to explain (1-16, default 5)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    explain = commands.add_parser("explain", help="write heatmap overlays for image files")
    explain.add_argument("images", nargs="+", metavar="IMAGE")
    explain.add_argument(
        "--reference", nargs="+", metavar="IMAGE", help="reference images (embedding models)"
    )
    explain.add_argument("--model", default="default-embedding", help="model name or config path")
    explain.add_argument("--layer", help="target layer (default: the model's)")
    explain.add_argument(
        "--method",
        metavar="METHOD",
        help=method_help("per model, see fam inspect"),
    )
    explain.add_argument(
        "--target-class",
        metavar="CLASS",
        help="classifiers: explain this class (an index, or a name of the model's class_names) "
        "instead of the predicted one",
    )
    explain.add_argument(
        "--out", default="out/explain", help="output folder (default: out/explain)"
    )
    explain.set_defaults(run=_explain)

    train = commands.add_parser("train", help="train a default model on the embedded benchmark")
    train.add_argument("name", choices=list(DEFAULT_MODEL_NAMES))
    train.add_argument("--out", help="output folder (default: model-store/NAME)")
    train.add_argument("--steps", type=int)
    train.add_argument("--seed", type=int)
    train.set_defaults(run=_train)

    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fam`` command line; return the exit code (2 for every error)."""
    from fam_core.extras import MissingExtraError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # ``fam`` alone: the usage and the commands
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError, MissingExtraError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if LAYER_ERROR in message and getattr(args, "model", None):
            message += f" (run `fam inspect {args.model}` to list the layers)"
        print(f"fam: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
