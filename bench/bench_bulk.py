"""fam bulk on Ray: images/s with 1 and 2 actors over the in-process explainer loop, and
Ray's fixed start-up cost.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_bulk.py [--images 384] [--batch-size 16]
     [--rounds 2] [--model default-classifier]

Benchmark flowers are written as PNG files. The baseline explains them in this process with
the bulk worker (the shared request pipeline: read, decode, explain, encode rows) in batches of
``--batch-size``, on one thread (each Ray actor gets one CPU, so one thread too). Each round
runs, in turn, the baseline, then ``run_bulk`` with 1 and with 2 actors (same batch size, a
Ray session started once, a fresh output folder each time) on all the images and on one
image. A job's time includes its fixed cost (planning, loading the model in the driver to
check it, starting the actors, loading the model in each): the job of one image measures it.
Reported, as medians over rounds: images/s of whole jobs, and the steady rate
``(N - 1) / (t_N - t_1)`` that the fixed cost does not blur; each over the baseline's images/s
of the same round. ``ray.init`` (once per session) is timed apart.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fam_core.bulk import BulkOptions, run_bulk
from fam_core.bulk.sample import write_flower_pngs
from fam_core.bulk.worker import BulkWorker, WorkerSpec
from fam_core.pipeline import EncodedImage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import time_once  # noqa: E402


def in_process(files: list[Path], model: str, batch_size: int) -> float:
    """Seconds to explain ``files`` in this process, batch by batch (model loaded before)."""
    keys = [str(f) for f in files]
    worker = BulkWorker(WorkerSpec(models=(model,), shards=dict.fromkeys(keys, 0)))

    def run() -> None:
        for start in range(0, len(keys), batch_size):
            batch = keys[start : start + batch_size]
            worker.rows(batch, tuple(EncodedImage(Path(k).read_bytes()) for k in batch))

    return time_once(run)


def bulk(folder: Path, out: Path, model: str, batch_size: int, actors: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    options = BulkOptions(
        models=(model,), images=str(folder), out=str(out), batch_size=batch_size, actors=actors
    )
    return time_once(lambda: run_bulk(options, progress=lambda message: None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="default-classifier")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-bulk-"))
    files = write_flower_pngs(work / "images", args.images)
    write_flower_pngs(work / "one", 1)
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    init_seconds = time.perf_counter() - started
    one_image_local = in_process(sorted((work / "one").iterdir()), args.model, args.batch_size)
    rates: dict[str, list[float]] = {"in-process": []}
    ratios: dict[str, list[float]] = {}
    fixed: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.rounds):
        baseline = args.images / in_process(files, args.model, args.batch_size)
        rates["in-process"].append(baseline)
        for actors in (1, 2):
            whole = bulk(work / "images", work / "out", args.model, args.batch_size, actors)
            one = bulk(work / "one", work / "out-one", args.model, args.batch_size, actors)
            fixed[actors].append(one)
            for kind, rate in (
                ("whole job", args.images / whole),
                ("steady", (args.images - 1) / max(whole - one, 1e-9)),
            ):
                name = f"{actors} actor{'s' if actors > 1 else ''}, {kind}"
                rates.setdefault(name, []).append(rate)
                ratios.setdefault(name, []).append(rate / baseline)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"{args.images} images, batch size {args.batch_size}, model {args.model}, {args.rounds} rounds"
    )
    for name, values in rates.items():
        ratio = f"  x{statistics.median(ratios[name]):.2f} in-process" if name in ratios else ""
        print(f"  {name:>22}: {statistics.median(values):7.1f} images/s{ratio}")
    for kind in ("whole job", "steady"):
        two, one = ratios[f"2 actors, {kind}"], ratios[f"1 actor, {kind}"]
        print(
            f"  2 actors / 1 actor ({kind}): {statistics.median(two) / statistics.median(one):.2f}"
        )
    print(f"  ray.init (per session): {init_seconds:.1f} s")
    for actors, values in fixed.items():
        print(
            f"  job of 1 image, {actors} actor(s) (fixed cost per job): {statistics.median(values):.1f} s"
        )
    print(f"  1 image in process: {one_image_local:.2f} s")


if __name__ == "__main__":
    main()
