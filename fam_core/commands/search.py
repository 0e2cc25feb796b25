"""``fam search``: each query image's top-k neighbours in an index, with their heatmaps
(:func:`fam_core.pipeline.explained_search`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

QUERY_BATCH = 16


def add_command(commands: argparse._SubParsersAction) -> None:
    from fam_core.explainers.registry import method_help

    """Add the ``search`` subcommand."""
    parser = commands.add_parser(
        "search",
        help="top-k neighbours of query images in an index, with heatmaps on both sides",
        description="Prints (or, with --out, writes to DIR/results.jsonl) one JSON object per "
        'query: {"query": PATH, "results": [{"id", "uri", "label", "score", "query_map", '
        '"reference_map"}]}. The map fields name .npy files of float maps under --out; '
        "without --out they are null (the maps are only written with --out).",
    )
    parser.add_argument("queries", nargs="+", metavar="QUERY", help="query image files")
    parser.add_argument("--model", default="default-embedding", help="model name or config path")
    parser.add_argument(
        "--index", help="PATH.db or http(s)://HOST:PORT[#NAME] (default: the model config's index)"
    )
    parser.add_argument(
        "--top-k", type=int, help="neighbours per query (default: the config's top_k, 10)"
    )
    parser.add_argument("--method", help=method_help("the model's, see fam inspect"))
    parser.add_argument(
        "--explain",
        choices=["none", "query", "both"],
        help="query: the query's map for each neighbour (the default unless the config's "
        "explain says otherwise); both: also each neighbour's map for the query (its image "
        "read from its URI)",
    )
    parser.add_argument(
        "--filter", help="a condition on the rows, e.g. 'label == \"rose\"' (Milvus syntax)"
    )
    parser.add_argument(
        "--search-params",
        metavar="JSON",
        help="the index's search parameters, replacing the config's index_search: "
        '{"ef": 128} for an HNSW index, {"nprobe": 64} for IVF_FLAT (recall for latency)',
    )
    parser.add_argument(
        "--out",
        help="folder for results.jsonl, the maps (maps/*.npy) and one PNG montage per query; "
        "without it the JSON Lines go to stdout with null maps",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Search each query; print or write the results."""
    import torch

    from fam_core.commands.index import json_object
    from fam_core.commands.search_output import search_montage, search_record, write_maps
    from fam_core.pipeline import ServedModel
    from fam_core.pipeline.explained_search import explained_search, load_uri_pixels
    from fam_core.render import save_png
    from fam_core.search import open_index

    served = ServedModel.load(args.model)
    config = served.config
    uri = args.index or config.index_uri
    if uri is None:
        raise ValueError(f"--index: give an index URI (model {served.name!r} names none)")
    top_k = config.top_k if args.top_k is None else args.top_k
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    explain = args.explain or config.explain
    pixels = [load_uri_pixels(served, path) for path in args.queries]  # one-line errors
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    lines = []
    search_params = None if args.index else config.index_search  # the config's own index
    asked = json_object(args.search_params, "--search-params")
    with open_index(uri, search_params={**(search_params or {}), **(asked or {})}) as index:
        index.check_search_params()  # one line naming what the index takes
        for start in range(0, len(pixels), QUERY_BATCH):
            chunk = torch.stack(pixels[start : start + QUERY_BATCH])
            found = explained_search(
                served,
                index,
                served.config.normalize(chunk),
                top_k=top_k,
                method=args.method,
                explain=explain,
                filter=args.filter,
            )
            for offset, results in enumerate(found):
                number = start + offset
                query = args.queries[number]
                if out is None:
                    print(json.dumps(search_record(query, results)), flush=True)
                    continue
                stem = f"{number:04d}-{Path(query).stem}"
                record = search_record(query, results, write_maps(out, stem, results))
                lines.append(json.dumps(record))
                neighbours = [_pixels_or_none(served, hit.neighbour.uri) for hit in results]
                montage = search_montage(
                    pixels[number], results, neighbours, title=Path(query).name
                )
                save_png(montage, out / f"{stem}.png")
    if out is not None:
        (out / "results.jsonl").write_text("".join(f"{line}\n" for line in lines))
        print(f"{len(lines)} queries searched; results {out / 'results.jsonl'}, montages in {out}")
    return 0


def _pixels_or_none(served: object, uri: str):  # type: ignore[no-untyped-def]
    from fam_core.pipeline.explained_search import load_uri_pixels

    try:
        return load_uri_pixels(served, uri)
    except (ValueError, OSError):
        return None
