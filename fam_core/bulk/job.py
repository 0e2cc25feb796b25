"""The driver of a bulk job: plan, start Ray, stream the images through the actors, write shards.

Ray does the parallelism (an actor pool of ``map_batches``, one model load per actor, GPUs
per actor when CUDA is present), retries of failed tasks and actors, back-pressure and
spilling. The driver only collects the rows of each shard as they stream back and writes the
shard once it is whole (:mod:`fam_core.bulk.shards`), so a killed job keeps every shard it
finished and a restart with the same ``--out`` reads only the images of the missing shards.

Example:
    >>> options = BulkOptions(models=("default-classifier",), images="pics/", actors=2)
    >>> options.batch_size, options.actors
    (16, 2)
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fam_core.bulk.plan import Plan, list_images
from fam_core.bulk.rows import Row
from fam_core.bulk.shards import check_job, done_shards, write_shard
from fam_core.bulk.worker import BulkWorker, ExplainSettings, WorkerSpec

DEFAULT_SHARD_SIZE = 256
READ_BLOCK = 64
"""Images per block Ray Data reads (each a task)."""
OBJECT_STORE_BYTES = 256 * 1024 * 1024
"""Object store of a local Ray session (Ray spills to disk beyond it)."""


@dataclass(frozen=True)
class BulkOptions:
    """A bulk job.

    Attributes:
        models: model names, config paths or ``.onnx`` paths; several (checkpoints of one
            model) are run on every image and written side by side.
        images: a folder, a glob or Parquet files with ``id`` and ``image`` columns.
        out: the output folder (one Parquet file per shard, ``job.json``, ``summary.json``).
        settings: what every image gets (method, resolution, embedding, overlay, metrics).
        references: reference image files (embedding models).
        batch_size: images per ``map_batches`` call (and per pipeline pass).
        actors: actors in the pool (each loads the models once).
        cpus_per_actor: CPUs Ray reserves for each actor.
        gpus_per_actor: GPUs per actor; ``None``: 1 when CUDA is present, else 0.
        shard_size: images per output shard.
        address: an existing Ray cluster (``None``: start Ray on this machine).
        num_cpus: CPUs of the local Ray session (``None``: every core).
    """

    models: tuple[str, ...]
    images: str
    out: str = "out/bulk"
    settings: ExplainSettings = ExplainSettings()
    references: tuple[str, ...] = ()
    batch_size: int = 16
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    address: str | None = None
    num_cpus: int | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("give at least one model")
        for name in ("batch_size", "actors", "shard_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {value!r}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"--num-cpus must be >= 1, got {self.num_cpus}")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"--cpus-per-actor must be > 0, got {self.cpus_per_actor}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError(f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor}")


@dataclass
class BulkReport:
    """What a job did: shards written now and skipped (written before), rows and error rows."""

    out: Path
    shards: int
    models: list[str] = field(default_factory=list)  # served names, in --model order
    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    rows: int = 0
    errors: int = 0
    seconds: float = 0.0


def run_bulk(options: BulkOptions, progress: Callable[[str], None] | None = None) -> BulkReport:
    """Explain every image of ``options.images`` into ``options.out`` on Ray.

    Starts a local Ray session unless one is running (or ``address`` names a cluster).
    """
    from fam_core.extras import require

    require("bulk", "pyarrow", "ray.data")
    say = progress or (lambda message: print(message, file=sys.stderr))
    start = time.perf_counter()
    items, parquet = list_images(options.images)
    plan = Plan.of(items, options.shard_size, parquet)
    names = [plan.shard_name(k) for k in range(len(plan.shards))]
    out = Path(options.out)
    references = tuple(_read_reference(path) for path in options.references)
    # the models loaded here once: one-line errors before anything is written or Ray starts
    check = dataclasses.replace(_spec(options, plan, [], references), device="cpu")
    served = [m.name for m in BulkWorker(check).served]
    check_job(out, _settings(options, plan))
    done = done_shards(out, names)
    pending = [k for k in range(len(plan.shards)) if k not in done]
    report = BulkReport(out, len(plan.shards), served, skipped=sorted(done))
    if done:
        say(f"{len(done)} of {len(plan.shards)} shards already written in {out}: skipped")
    if not pending:
        report.seconds = time.perf_counter() - start
        return report
    spec = _spec(options, plan, pending, references)
    _start_ray(options)
    dataset = _dataset(plan, pending, options, spec)
    expected = {k: len(plan.shards[k]) * len(options.models) for k in pending}
    collected: dict[int, dict[tuple[str, str], Row]] = {k: {} for k in pending}
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            shard = row["shard"]
            if shard not in collected:  # a retried task's row of a shard already written
                continue
            collected[shard][row["id"], row["model"]] = row  # or of one still collecting
            if len(collected[shard]) == expected[shard]:
                rows = list(collected.pop(shard).values())
                write_shard(out, names[shard], rows)
                report.written.append(shard)
                report.rows += len(rows)
                report.errors += sum(1 for r in rows if r["error"])
    if collected:  # a row of every image comes back, or Ray raised: never reached
        raise RuntimeError(f"shards {sorted(collected)} came back incomplete")
    report.seconds = time.perf_counter() - start
    return report


def _settings(options: BulkOptions, plan: Plan) -> dict[str, object]:
    """What must be equal for a restart to add to an output folder."""
    return {
        "plan": plan.fingerprint(),
        "shard_size": options.shard_size,
        "models": list(options.models),
        **dataclasses.asdict(options.settings),
        "references": [Path(p).name for p in options.references],
    }


def _spec(
    options: BulkOptions, plan: Plan, pending: list[int], references: tuple[bytes, ...]
) -> WorkerSpec:
    keys = {(item.path or item.id): k for k in pending for item in plan.shards[k]}
    ids = {item.path: item.id for k in pending for item in plan.shards[k] if item.path}
    return WorkerSpec(
        models=tuple(options.models),
        settings=options.settings,
        references=references,
        shards=keys,
        ids=ids,
        device="cuda" if _gpus(options) > 0 else "cpu",
        batch_size=options.batch_size,
    )


def _gpus(options: BulkOptions) -> float:
    if options.gpus_per_actor is not None:
        return options.gpus_per_actor
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def _start_ray(options: BulkOptions) -> None:
    import ray

    if ray.is_initialized():
        return
    if options.address:
        ray.init(address=options.address, log_to_driver=False)
        return
    ray.init(
        num_cpus=options.num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
        log_to_driver=False,
    )


def _dataset(plan: Plan, pending: list[int], options: BulkOptions, spec: WorkerSpec):  # type: ignore[no-untyped-def]
    """Images of the pending shards read by Ray Data, explained by the actor pool.

    Reading is I/O and asks for no CPU: with actors holding every CPU a read task that asks
    for one would wait for ever.
    """
    import ray.data

    count = sum(len(plan.shards[k]) for k in pending)
    # blocks of about READ_BLOCK images, at least two per actor; at most two reads per actor
    # at once (a read asking for no CPU could otherwise start a Python worker per block)
    blocks = min(count, max(2 * options.actors, math.ceil(count / READ_BLOCK)))
    reads = 2 * options.actors
    if plan.parquet:
        dataset = ray.data.read_parquet(  # the actors drop the rows of written shards
            list(plan.parquet), columns=["id", "image"], num_cpus=0, concurrency=reads
        )
        columns = ("id", "image")
    else:
        paths = [item.path for k in pending for item in plan.shards[k]]
        dataset = ray.data.read_binary_files(
            paths, include_paths=True, override_num_blocks=blocks, num_cpus=0, concurrency=reads
        )
        columns = ("path", "bytes")
    return dataset.map_batches(
        BulkWorker,
        fn_constructor_args=(spec, *columns),
        batch_size=options.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        num_cpus=options.cpus_per_actor,
        num_gpus=_gpus(options),
    )


def _read_reference(path: str) -> bytes:
    if not Path(path).is_file():
        raise ValueError(f"no such reference image file: {path}")
    return Path(path).read_bytes()
