"""``fam index build``: embed an image set into a vector index on Ray; ``fam index info``:
what an index holds (:mod:`fam_core.search`)."""

from __future__ import annotations

import argparse
import json
import sys


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add the ``index`` subcommand and its ``build`` and ``info`` actions."""
    parser = commands.add_parser(
        "index", help="build or describe the vector index of an embedding model's gallery"
    )
    actions = parser.add_subparsers(dest="action", metavar="{build,info}", required=True)
    build = actions.add_parser(
        "build",
        help="embed every image of a folder, glob or Parquet set into an index (resumable)",
    )
    build.add_argument("--model", default="default-embedding", help="model name or config path")
    build.add_argument(
        "--images", required=True, help="a folder, a glob, or Parquet files (id, image columns)"
    )
    build.add_argument(
        "--index",
        required=True,
        help="PATH.db (Milvus Lite, embedded) or http(s)://HOST:PORT (a Milvus server); "
        "#NAME picks the collection",
    )
    build.add_argument(
        "--labels",
        help="'folder' (each image's parent folder) or a CSV file with columns id,label",
    )
    build.add_argument(
        "--index-type",
        help="the vector index of a new index: FLAT (exact, the default), IVF_FLAT or HNSW",
    )
    build.add_argument(
        "--index-params",
        help='its parameters as JSON: IVF_FLAT {"nlist": 128, "nprobe": 32}, '
        'HNSW {"M": 16, "efConstruction": 200, "ef": 64} (the defaults)',
    )
    build.add_argument("--batch-size", type=int, default=16)
    build.add_argument("--actors", type=int, default=1, help="actors (model copies)")
    build.add_argument("--cpus-per-actor", type=float, default=1.0)
    build.add_argument("--gpus-per-actor", type=float, help="default: 1 with CUDA, else 0")
    build.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    build.add_argument("--address", help="an existing Ray cluster (default: start one here)")
    build.set_defaults(run=run_build)
    info = actions.add_parser("info", help="print an index's model, image count and labels")
    info.add_argument("index", help="PATH.db or http(s)://HOST:PORT[#NAME]")
    info.set_defaults(run=run_info)


def run_build(args: argparse.Namespace) -> int:
    """Build (or resume) the index; list the images that were skipped, with their reason."""
    from fam_core.bulk.index_build import build_index

    params = json_object(args.index_params, "--index-params")
    report = build_index(
        args.model,
        args.images,
        args.index,
        labels=args.labels,
        batch_size=args.batch_size,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        address=args.address,
        num_cpus=args.num_cpus,
        index_type=args.index_type,
        index_params=params,
    )
    for image_id, reason in report.failed:
        print(f"skipped {image_id}: {reason}", file=sys.stderr)
    print(
        f"{report.written} images indexed, {report.indexed_before} indexed before, "
        f"{len(report.failed)} skipped (not decodable); {report.count} in {args.index}; "
        f"{report.seconds:.1f} s"
    )
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Print the card, the count and the label counts."""
    from fam_core.search import open_index

    with open_index(args.index) as index:
        card = index.card
        count = index.count()
        labels = index.labels()
    print(f"index: {args.index}")
    print(f"model: {card.model}")
    print(f"dimension: {card.dimension}")
    print(f"similarity: {card.similarity}")
    print(f"weights sha256: {card.model_hash}")
    params = ", ".join(f"{name}={value}" for name, value in card.index_params.items())
    print(f"index type: {card.index_type}" + (f" ({params})" if params else ""))
    print(f"images: {count}")
    unlabelled = count - sum(labels.values())
    shown = ", ".join(f"{label} ({n})" for label, n in labels.items()) or "none"
    print(f"labels: {len(labels)}: {shown}" + (f"; {unlabelled} unlabelled" if unlabelled else ""))
    return 0


def json_object(text: str | None, option: str) -> dict | None:
    """The JSON object an option's ``text`` gives (``None`` when the option is absent); a
    one-line ``ValueError`` naming ``option`` for anything else.

    Example:
        >>> json_object('{"ef": 128}', "--search-params")
        {'ef': 128}
        >>> json_object("[1]", "--search-params")
        Traceback (most recent call last):
        ...
        ValueError: --search-params must be a JSON object, got '[1]'
    """
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{option} must be a JSON object: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object, got {text!r}")
    return value
