"""The driver of a bulk job: plan, start Ray, stream the images through the actors, write shards.

Ray does the parallelism (an actor pool of ``map_batches``, one model load per actor, GPUs
per actor when CUDA is present), retries of failed tasks and actors, back-pressure and
spilling. The driver collects the rows of each shard as they stream back, saves the rows of
unfinished shards every ``checkpoint_seconds`` (:mod:`fam_core.bulk.checkpoints`) and writes
each shard once it is whole (:mod:`fam_core.bulk.shards`). A killed job keeps every shard it
finished and every checkpoint; a restart with the same ``--out`` reads only the images that
neither holds. Ray is started for the job and shut down when it ends (:mod:`.session`).

Example:
    >>> options = BulkOptions(models=("default-classifier",), images="pics/", actors=2)
    >>> options.batch_size, options.actors, options.checkpoint_seconds
    (16, 2, 60.0)
"""

from __future__ import annotations

import dataclasses
import math
import queue
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fam_core.bulk.checkpoints import (
    DEFAULT_CHECKPOINT_SECONDS,
    ShardCollector,
    remove_checkpoints,
    saved_rows,
)
from fam_core.bulk.plan import Item, Plan, list_images
from fam_core.bulk.session import ray_session
from fam_core.bulk.shards import check_job, done_shards, prepare_output, write_shard
from fam_core.bulk.stream import RowStream
from fam_core.bulk.worker import BulkWorker, ExplainSettings, WorkerSpec

DEFAULT_SHARD_SIZE = 256


@dataclass(frozen=True)
class BulkOptions:
    """A bulk job.

    Attributes:
        models: model names, config paths or ``.onnx`` paths; several (checkpoints of one
            model) are run on every image and written side by side.
        images: a folder, a glob or Parquet files with ``id`` and ``image`` columns.
        out: the output folder (``shards/`` with one Parquet file per shard, ``job.json``,
            ``summary.json``).
        settings: what every image gets (method, resolution, embedding, overlay, metrics).
        references: reference image files (embedding models).
        batch_size: images per ``map_batches`` call (and per pipeline pass).
        actors: actors in the pool (each loads the models once).
        cpus_per_actor: CPUs Ray reserves for each actor.
        gpus_per_actor: GPUs per actor; ``None``: 1 when CUDA is present, else 0.
        shard_size: images per output shard.
        address: an existing Ray cluster (``None``: start Ray on this machine).
        num_cpus: CPUs of the local Ray session (``None``: every core).
        checkpoint_seconds: the longest a row that came back stays unsaved.
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
    checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS

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
        seconds = self.checkpoint_seconds
        if isinstance(seconds, bool) or not (isinstance(seconds, (int, float)) and seconds > 0):
            raise ValueError(f"--checkpoint-seconds must be a number > 0, got {seconds!r}")
        if not math.isfinite(seconds):
            raise ValueError(f"--checkpoint-seconds must be finite, got {seconds!r}")


@dataclass
class BulkReport:
    """What a job did.

    Attributes:
        out: the output folder.
        shards: the shards of the plan.
        models: the served names, in ``--model`` order.
        written: the shards written now.
        skipped: the shards written before (by a killed or finished job).
        images: the images of the plan.
        images_skipped: the images not explained now: in skipped shards or in checkpoints.
        rows: the rows of the shards written now (with those read back from checkpoints).
        errors: the error rows among them.
        checkpoints: the part files written now.
        seconds: the job's time.
    """

    out: Path
    shards: int
    models: list[str] = field(default_factory=list)
    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    images: int = 0
    images_skipped: int = 0
    rows: int = 0
    errors: int = 0
    checkpoints: int = 0
    seconds: float = 0.0


def run_bulk(options: BulkOptions, progress: Callable[[str], None] | None = None) -> BulkReport:
    """Explain every image of ``options.images`` into ``options.out`` on Ray.

    Starts a local Ray session unless one is running (or ``address`` names a cluster), and
    shuts it down at the end, on an error, on Ctrl-C and on SIGTERM
    (:class:`fam_core.bulk.session.Stopped`); the rows that came back are saved first.
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
    check = dataclasses.replace(worker_spec(options, plan, [], references), device="cpu")
    served = [m.name for m in BulkWorker(check).served]
    check_job(out, _settings(options, plan))
    prepare_output(out)
    done = done_shards(out, names)
    for shard in done:  # a job killed between writing a shard and removing its checkpoints
        remove_checkpoints(out, shard)
    pending = [k for k in range(len(plan.shards)) if k not in done]
    models = len(options.models)
    collector = ShardCollector(
        out, {k: len(plan.shards[k]) * models for k in pending}, options.checkpoint_seconds
    )
    for shard in pending:
        collector.restore(shard, saved_rows(out, shard, models))
    report = BulkReport(out, len(plan.shards), served, skipped=sorted(done), images=len(plan))
    restored = {key[0] for shard in pending for key in collector.rows[shard]}
    report.images_skipped = sum(len(plan.shards[k]) for k in done) + len(restored)
    if report.images_skipped:
        say(
            f"{report.images_skipped} of {len(plan)} images already written in {out} "
            f"({len(done)} whole shards, {len(restored)} images in checkpoints): skipped"
        )

    def finish(shard: int) -> None:
        rows = collector.take(shard)
        write_shard(out, names[shard], rows)
        remove_checkpoints(out, shard)
        report.written.append(shard)
        report.rows += len(rows)
        report.errors += sum(1 for r in rows if r["error"])

    for shard in pending:  # complete in its checkpoints: killed before the shard was written
        if len(collector.rows[shard]) == collector.expected[shard]:
            finish(shard)
    todo = [item for k in pending if k in collector.rows for item in plan.shards[k]]
    todo = [item for item in todo if item.id not in restored]
    if todo:
        spec = worker_spec(options, plan, pending, references, todo)
        with ray_session(options.address, options.num_cpus, say) as session:
            stream = RowStream(explain_dataset(plan, todo, options, spec))
            session.join_at_shutdown(stream.thread)
            try:
                with stream:
                    _collect(stream, collector, finish)
            finally:  # stopped or failed: what came back is saved for the restart
                for rows in stream.drain():
                    for row in rows:
                        collector.add(row)  # a shard whole now is written by the restart
                collector.checkpoint()
                report.checkpoints = collector.parts_written
    if collector.rows:  # a row of every image comes back, or Ray raised: never reached
        raise RuntimeError(f"shards {sorted(collector.rows)} came back incomplete")
    report.seconds = time.perf_counter() - start
    return report


def _collect(stream: RowStream, collector: ShardCollector, finish: Callable[[int], None]) -> None:
    """Feed the rows of ``stream`` to ``collector``, ``finish`` each whole shard, checkpoint
    on time (also while no row comes back)."""
    while True:
        try:
            rows = stream.get(timeout=collector.seconds_to_checkpoint())
        except queue.Empty:
            collector.checkpoint()
            continue
        if rows is None:
            return
        for row in rows:
            shard = collector.add(row)
            if shard is not None:
                finish(shard)
        if collector.seconds_to_checkpoint() == 0.0:
            collector.checkpoint()


def _settings(options: BulkOptions, plan: Plan) -> dict[str, object]:
    """What must be equal for a restart to add to an output folder."""
    return {
        "plan": plan.fingerprint(),
        "shard_size": options.shard_size,
        "models": list(options.models),
        **dataclasses.asdict(options.settings),
        "references": [Path(p).name for p in options.references],
    }


def worker_spec(
    options: BulkOptions,
    plan: Plan,
    pending: list[int],
    references: tuple[bytes, ...],
    todo: list[Item] | None = None,
) -> WorkerSpec:
    """What the actors need; they explain the ``todo`` items of the ``pending`` shards (all
    of their items by default) and skip every other image they are given."""
    wanted = None if todo is None else {item.id for item in todo}
    chosen = [
        (item, k) for k in pending for item in plan.shards[k] if wanted is None or item.id in wanted
    ]
    return WorkerSpec(
        models=tuple(options.models),
        settings=options.settings,
        references=references,
        shards={(item.path or item.id): k for item, k in chosen},
        ids={item.path: item.id for item, _ in chosen if item.path},
        device="cuda" if _gpus(options) > 0 else "cpu",
        batch_size=options.batch_size,
    )


def _gpus(options: BulkOptions) -> float:
    if options.gpus_per_actor is not None:
        return options.gpus_per_actor
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def explain_dataset(plan: Plan, todo: list[Item], options: BulkOptions, spec: WorkerSpec):  # type: ignore[no-untyped-def]
    """The ``todo`` images read by Ray Data, explained by the actor pool.

    Files are read in blocks of about one batch, so each actor task is one pipeline pass and
    its rows come back (to be checkpointed) as soon as the pass is done. Reading is I/O and
    asks for no CPU: with actors holding every CPU a read task that asks for one would wait
    for ever.
    """
    import ray.data

    count = len(todo)
    blocks = min(count, max(2 * options.actors, math.ceil(count / options.batch_size)))
    # at most two reads per actor at once (a read asking for no CPU could otherwise start a
    # Python worker per block)
    reads = 2 * options.actors
    if plan.parquet:
        dataset = ray.data.read_parquet(  # the actors drop the rows of other images
            list(plan.parquet), columns=["id", "image"], num_cpus=0, concurrency=reads
        )
        columns = ("id", "image")
    else:
        paths = [item.path for item in todo]
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
