"""Explained search over plain search, and index build over `fam bulk --embedding`.

Run: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_search_explained.py [--images 1024]
     [--batches 1 8] [--repeats 15] [--build-rounds 2] [--threads 1] [--model default-embedding]

(``OMP_WAIT_POLICY=PASSIVE``: on a machine shared with other work, OpenMP threads that spin
while they wait turn a 7 ms forward pass into hundreds of ms.)

Benchmark flowers are written as PNG files (the gallery). Two measurements:

- Index build: ``build_index`` (what ``fam index build`` runs) over ``run_bulk`` with
  ``--embedding`` (what ``fam bulk --embedding`` runs) on the same images, same batch size, one
  Ray actor, one Ray session (after a warm-up job of each: the session's first job starts
  Ray's worker processes); rounds alternate the two, each into a fresh index / output folder.
  Reported: images/s of whole jobs, and the steady rate ``(N - 1) / (t_N - t_1)`` that the
  fixed cost of a job (starting the actor, loading the model) does not blur (the job of one
  image measures it), both ways, and their ratio (target >= 0.9).
- Search: ``explained_search`` of a batch of preprocessed query images (novel-class flowers,
  never in the gallery), top 10, FAM: ``explain="query"`` (the query's map for each neighbour)
  and ``explain="both"`` (also each neighbour's map, its image read back from its file), each
  over ``explain="none"`` (the query's embedding and the index search): medians of per-round
  ratios, rounds alternating (``bench/common.py``). Target for ``query``: <= 1.3.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from itertools import count
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ratio, time_once  # noqa: E402

from fam_core.bulk import BulkOptions, run_bulk  # noqa: E402
from fam_core.bulk.index_build import build_index  # noqa: E402
from fam_core.bulk.sample import write_flower_pngs  # noqa: E402
from fam_core.bulk.worker import ExplainSettings  # noqa: E402
from fam_core.data.flowers import SPLITS, make_flowers  # noqa: E402
from fam_core.pipeline import ServedModel  # noqa: E402
from fam_core.pipeline.explained_search import explained_search  # noqa: E402
from fam_core.search import open_index  # noqa: E402

TOP_K = 10


def quiet(message: str) -> None:
    del message


def build_seconds(model: str, folder: Path, index_uri: Path, batch_size: int) -> float:
    """Seconds to build a new index at ``index_uri`` (a path not used before in this process:
    Milvus Lite keeps the files it opened in memory, a deleted folder's rows included)."""
    if index_uri.exists():
        raise ValueError(f"{index_uri} exists: each build writes a new index")
    return time_once(
        lambda: build_index(
            model, str(folder), str(index_uri), batch_size=batch_size, progress=quiet
        )
    )


def bulk_seconds(model: str, folder: Path, out: Path, batch_size: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    options = BulkOptions(
        models=(model,),
        images=str(folder),
        out=str(out),
        settings=ExplainSettings(embedding=True),
        batch_size=batch_size,
    )
    return time_once(lambda: run_bulk(options, progress=quiet))


def measure_build(args: argparse.Namespace, work: Path) -> None:
    """Whole jobs of all the images and of one image, both ways, rounds alternating, after
    one warm-up job of one image each."""
    builds = count()
    jobs = {
        "build": lambda folder: build_seconds(
            args.model, folder, work / f"build-{next(builds)}.db", args.batch_size
        ),
        "bulk": lambda folder: bulk_seconds(args.model, folder, work / "bulk", args.batch_size),
    }
    rates: dict[str, dict[str, list[float]]] = {
        name: {"whole job": [], "steady": []} for name in jobs
    }
    for name in jobs:  # warm-up: the session's first jobs start Ray's workers, import Milvus
        jobs[name](work / "one")
    for round_number in range(args.build_rounds):
        order = list(jobs) if round_number % 2 == 0 else list(reversed(jobs))
        for name in order:
            whole = jobs[name](work / "gallery")
            one = jobs[name](work / "one")
            rates[name]["whole job"].append(args.images / whole)
            rates[name]["steady"].append((args.images - 1) / max(whole - one, 1e-9))
    for kind in ("whole job", "steady"):
        build, bulk = rates["build"][kind], rates["bulk"][kind]
        ratios = [b / u for b, u in zip(build, bulk, strict=True)]
        print(
            f"{kind}: index build {statistics.median(build):.1f} images/s, fam bulk --embedding "
            f"{statistics.median(bulk):.1f} images/s, build / bulk "
            f"{statistics.median(ratios):.2f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)})",
            flush=True,
        )


def measure_search(args: argparse.Namespace, index_uri: Path) -> None:
    model = ServedModel.load(args.model)
    classes = list(SPLITS["novel"])
    flowers = make_flowers(classes, per_class=max(args.batches), seed=1)
    queries = model.config.normalize(flowers.images)
    print(
        "| queries per call | plain search (ms) | query maps (ms) | query / plain "
        "| both maps (ms) | both / plain |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    with open_index(str(index_uri)) as index:
        for batch in args.batches:
            images = queries[:batch]

            def run(explain: str, images: torch.Tensor = images) -> None:
                explained_search(model, index, images, top_k=TOP_K, method="fam", explain=explain)

            query, query_ms, plain_ms = ratio(
                lambda: run("query"), lambda: run("none"), repeats=args.repeats
            )
            both, both_ms, _ = ratio(lambda: run("both"), lambda: run("none"), repeats=args.repeats)
            print(
                f"| {batch} | {1000 * plain_ms:.1f} | {1000 * query_ms:.1f} | {query:.2f} "
                f"| {1000 * both_ms:.1f} | {both:.2f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--build-rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the search")
    parser.add_argument("--model", default="default-embedding")
    parser.add_argument("--skip-build", action="store_true", help="only the search ratios")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-search-explained-"))
    try:
        write_flower_pngs(work / "gallery", args.images)
        write_flower_pngs(work / "one", 1)
        print(
            f"{args.images} gallery images, model {args.model}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), top {TOP_K}, FAM",
            flush=True,
        )
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        if not args.skip_build:
            measure_build(args, work)
        build_seconds(args.model, work / "gallery", work / "search.db", args.batch_size)
        ray.shutdown()
        measure_search(args, work / "search.db")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
