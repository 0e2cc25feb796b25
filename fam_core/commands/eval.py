"""``fam eval``: every registered explainer x metric on the embedded benchmark, with a report."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from fam_core.evaluation import SETTING_NAMES


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand."""
    from fam_core.commands import NamesIntactFormatter
    from fam_core.evaluation.resolution import RESOLUTIONS
    from fam_core.explainers.registry import available_methods

    parser = commands.add_parser(
        "eval",
        help="evaluate every registered explainer on the embedded benchmark",
        formatter_class=NamesIntactFormatter,
    )
    parser.add_argument(
        "--images", type=int, default=16, help="explained images per setting (default 16)"
    )
    parser.add_argument(
        "--scenes",
        type=int,
        default=6,
        help="scenes per scene setting, each explained against each of its 2-4 flowers (default 6)",
    )
    parser.add_argument(
        "--episodes", type=int, default=600, help="few-shot episodes for the accuracy (default 600)"
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="deletion/insertion steps (default 10)"
    )
    parser.add_argument(
        "--sanity-images",
        type=int,
        default=4,
        help="images of the randomisation test, 0 to skip (default 4)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help="methods to run (default: every registered one; those that need fitting are "
        "fitted on the benchmark's labelled images): " + ", ".join(available_methods()),
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        metavar="SETTING",
        choices=SETTING_NAMES,
        help="settings to evaluate (default: all): " + ", ".join(SETTING_NAMES),
    )
    parser.add_argument(
        "--resolutions",
        nargs="+",
        choices=RESOLUTIONS,
        default=["coarse"],
        help="model pairs that run every setting (default: coarse; `coarse fine` reports both): "
        "coarse = --embedding-model "
        "and --classifier-model (5x5 maps), fine = --fine-embedding-model and "
        "--fine-classifier-model (10x10 maps)",
    )
    parser.add_argument("--embedding-model", default="default-embedding")
    parser.add_argument("--classifier-model", default="default-classifier")
    parser.add_argument("--fine-embedding-model", default="default-embedding-fine")
    parser.add_argument("--fine-classifier-model", default="default-classifier-fine")
    parser.add_argument("--out", default="out/eval", help="output folder (default out/eval)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the evaluation and write the report; print the table and the runtime."""
    from fam_core.extras import require

    require("eval", "matplotlib", "tqdm")  # the report's charts and the progress bar
    from fam_core.evaluation.report import write_report
    from fam_core.evaluation.runner import EvalOptions, run_evaluation

    for name in ("images", "scenes", "episodes", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.sanity_images < 0:
        raise ValueError(f"--sanity-images must be >= 0, got {args.sanity_images}")
    options = EvalOptions(
        images=args.images,
        scenes=args.scenes,
        episodes=args.episodes,
        seed=args.seed,
        methods=tuple(args.methods) if args.methods else None,
        settings=tuple(args.settings) if args.settings else None,
        steps=args.steps,
        sanity_images=args.sanity_images,
        embedding_model=args.embedding_model,
        classifier_model=args.classifier_model,
        fine_embedding_model=args.fine_embedding_model,
        fine_classifier_model=args.fine_classifier_model,
        resolutions=tuple(args.resolutions),
    )
    result = run_evaluation(options, progress=lambda m: print(m, file=sys.stderr))
    command = " ".join(
        [
            "fam eval",
            f"--images {args.images} --scenes {args.scenes} --episodes {args.episodes}",
            f"--steps {args.steps}",
            f"--sanity-images {args.sanity_images} --seed {args.seed}",
            *([f"--methods {' '.join(args.methods)}"] if args.methods else []),
            *([f"--settings {' '.join(args.settings)}"] if args.settings else []),
            f"--resolutions {' '.join(args.resolutions)}",
            f"--embedding-model {shlex.quote(args.embedding_model)}",
            f"--classifier-model {shlex.quote(args.classifier_model)}",
            f"--fine-embedding-model {shlex.quote(args.fine_embedding_model)}",
            f"--fine-classifier-model {shlex.quote(args.fine_classifier_model)}",
            f"--out {shlex.quote(args.out)}",
        ]
    )
    out = Path(args.out)
    written = write_report(result, out, command)
    print((out / "results.md").read_text())
    print(f"wrote {len(written)} files to {out}; runtime {result.runtime_seconds:.1f} s")
    return 0
