"""``fam bulk``: explain a whole image set on Ray Data into Parquet shards (:mod:`fam_core.bulk`);
``fam bulk-gap``: the domain gap between two bulk outputs."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def add_command(commands: argparse._SubParsersAction) -> None:
    from fam_core.explainers.registry import method_help

    """Add the ``bulk`` and ``bulk-gap`` subcommands."""
    parser = commands.add_parser(
        "bulk", help="explain a whole image set on Ray (local by default) into Parquet shards"
    )
    parser.add_argument(
        "--model",
        nargs="+",
        default=["default-embedding"],
        metavar="MODEL",
        help="model names or config paths; several (checkpoints) run side by side",
    )
    parser.add_argument(
        "--images", required=True, help="a folder, a glob, or Parquet files (id, image columns)"
    )
    parser.add_argument("--references", nargs="+", metavar="IMAGE", default=[])
    parser.add_argument("--method", help=method_help("each model's"))
    parser.add_argument("--layer", help="target layer (default: the model's)")
    parser.add_argument("--resolution", choices=["input", "feature"], default="input")
    parser.add_argument("--embedding", action="store_true", help="write the output vectors")
    parser.add_argument("--overlay", action="store_true", help="write PNG overlays")
    parser.add_argument(
        "--montage",
        action="store_true",
        help="one PNG per image: each model's overlay side by side",
    )
    parser.add_argument(
        "--eval", action="store_true", help="per-image faithfulness metrics, aggregated"
    )
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--actors", type=int, default=1, help="actors (model copies)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--gpus-per-actor", type=float, help="default: 1 with CUDA, else 0")
    parser.add_argument("--shard-size", type=int, default=256, help="images per output shard")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--address", help="an existing Ray cluster (default: start one here)")
    parser.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=60.0,
        help="save the rows of unfinished shards this often (default 60): a killed job "
        "loses at most this much of the work that came back",
    )
    parser.add_argument("--out", default="out/bulk", help="output folder (default out/bulk)")
    parser.set_defaults(run=run)

    gap = commands.add_parser(
        "bulk-gap", help="mean heatmaps of two bulk outputs and their difference (domain gap)"
    )
    gap.add_argument("first", help="a fam bulk output folder")
    gap.add_argument("second", help="another, same model and resolution")
    gap.add_argument("--out", default="out/gap", help="output folder (default out/gap)")
    gap.set_defaults(run=run_gap)


def run(args: argparse.Namespace) -> int:
    """Run the job, then write the summary (and montages); print where."""
    from fam_core.bulk import BulkOptions, ExplainSettings, run_bulk
    from fam_core.bulk.session import Stopped, signal_name
    from fam_core.bulk.summary import write_montages, write_summary

    if args.montage and not args.overlay:
        raise ValueError("--montage needs --overlay")
    options = BulkOptions(
        models=tuple(args.model),
        images=args.images,
        out=args.out,
        settings=ExplainSettings(
            method=args.method,
            layer=args.layer,
            resolution=args.resolution,
            embedding=args.embedding,
            overlay=args.overlay,
            evaluate=args.eval,
            eval_steps=args.eval_steps,
        ),
        references=tuple(args.references),
        batch_size=args.batch_size,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        shard_size=args.shard_size,
        address=args.address,
        num_cpus=args.num_cpus,
        checkpoint_seconds=args.checkpoint_seconds,
    )
    try:
        report = run_bulk(options)
    except (Stopped, KeyboardInterrupt) as stop:
        signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
        print(
            f"fam: bulk job stopped by {signal_name(signum)}; what came back is saved in "
            f"{args.out}: run the same command to go on",
            file=sys.stderr,
        )
        return 128 + signum
    summary = write_summary(Path(args.out))
    print(
        f"{len(report.written)} shards written, {len(report.skipped)} skipped "
        f"({report.shards} in all); {report.images_skipped} of {report.images} images "
        f"skipped (written before); {report.rows} rows, {report.errors} errors; "
        f"{report.seconds:.1f} s; summary {summary}; shards in {Path(args.out) / 'shards'}"
    )
    if args.montage:
        print(f"montages in {write_montages(Path(args.out), report.models)}")
    return 0


def run_gap(args: argparse.Namespace) -> int:
    """Write both mean heatmaps and their difference; print the gap's size."""
    from fam_core.bulk.summary import write_domain_gap

    gap = write_domain_gap(Path(args.first), Path(args.second), Path(args.out))
    print(
        f"mean |first - second| = {gap['mean_abs_difference']:.4f}, "
        f"max = {gap['max_abs_difference']:.4f}; wrote {args.out}",
        file=sys.stdout,
    )
    return 0
