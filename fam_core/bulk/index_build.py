"""``fam index build``: embed an image set on the ``fam bulk`` Ray Data engine into an index.

The images are listed as ``fam bulk`` lists them (a folder, a glob, or Parquet files with
``id`` and ``image`` columns: :func:`fam_core.bulk.plan.list_images`) and embedded by its
actor pool, each actor running the request pipeline (decoding, preprocessing, the model's
output as it is explained: :class:`fam_core.bulk.worker.BulkWorker`, without heatmaps). Each
batch that comes back is upserted by id at once, so a build killed at any point keeps what
it wrote, and a rerun embeds only the images not yet indexed: every image ends with exactly
one row. Images that cannot be decoded are listed with their reason and skipped.

Labels: ``"folder"`` (the parent folder's name), a CSV file of ``id,label`` rows, or none.

Example:
    >>> read_labels_csv  # doctest: +ELLIPSIS
    <function read_labels_csv at ...>
"""

from __future__ import annotations

import csv
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fam_core.bulk.pause import pause_at
from fam_core.bulk.plan import Item, Plan, list_images
from fam_core.search.index import GalleryIndex, model_card, open_index
from fam_core.search.records import IndexRow
from fam_core.search.sources import parquet_uri

LABELS_FROM_FOLDER = "folder"


@dataclass
class BuildReport:
    """What a build did.

    Attributes:
        index: the index URI.
        images: the images of the set.
        indexed_before: those already in the index (skipped).
        written: the rows upserted now.
        failed: ``(id, reason)`` of each image that could not be embedded.
        count: the rows of the index at the end.
        seconds: the build's time.
    """

    index: str
    images: int = 0
    indexed_before: int = 0
    written: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    count: int = 0
    seconds: float = 0.0


def build_index(
    model: str,
    images_source: str,
    index_uri: str,
    *,
    labels: str | None = None,
    batch_size: int = 16,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    progress: Callable[[str], None] | None = None,
    index_type: str | None = None,
    index_params: dict[str, int] | None = None,
) -> BuildReport:
    """Embed every image of ``images_source`` with ``model`` (a name, config or ``.onnx``
    path) into the index at ``index_uri``, resuming what an earlier build wrote.

    ``labels``: ``"folder"``, a CSV file of ``id,label``, or ``None``. Ray runs locally
    (``num_cpus``) unless ``address`` names a cluster. ``index_type`` (``FLAT``, the default
    for a new index, ``IVF_FLAT`` or ``HNSW``) and ``index_params`` (its build and search
    parameters, :mod:`fam_core.search.index_types`) choose the vector index; ``None`` resumes
    an existing index with its own. Raises a one-line ``ValueError`` for a bad source, labels
    file, index or index type, when the index was built by another model, and when it was
    built with another index type or parameters.
    """
    from fam_core.bulk import BulkOptions, ExplainSettings
    from fam_core.bulk.job import explain_dataset, worker_spec
    from fam_core.bulk.session import ray_session
    from fam_core.bulk.stream import RowStream
    from fam_core.extras import require
    from fam_core.pipeline import ServedModel

    require("bulk", "pyarrow", "ray.data")
    import ray

    say = progress or (lambda message: print(message, file=sys.stderr))
    start = time.perf_counter()
    items, parquet = list_images(images_source)
    label_of = _labeller(labels, items)
    uri_of = _uris(items, parquet)
    options = BulkOptions(
        models=(model,),
        images=images_source,
        settings=ExplainSettings(embedding=True),
        batch_size=batch_size,
        actors=actors,
        cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor,
        address=address,
        num_cpus=num_cpus,
    )
    served = ServedModel.load(model, open_index=False)  # one-line errors before Ray starts
    if served.task != "embedding":
        raise ValueError(f"an index needs an embedding model; {served.name!r} is a {served.task}")
    card = model_card(served)
    if index_type is not None:
        card = dataclasses.replace(card, index_type=index_type, index_params=index_params or {})
    elif index_params:
        raise ValueError("index parameters need an index type (FLAT, IVF_FLAT or HNSW)")
    report = BuildReport(index_uri, images=len(items))
    with open_index(index_uri) as index:
        if index.exists() and index_type is not None:
            index.check_model(card)
            index.check_index(card)
        index.create(card)
        done = index.engine.existing([item.id for item in items])
        todo = [item for item in items if item.id not in done]
        report.indexed_before = len(items) - len(todo)
        if report.indexed_before:
            say(f"{report.indexed_before} of {len(items)} images already indexed: skipped")
        if todo:
            plan = Plan.of(todo, shard_size=len(todo), parquet=parquet)
            spec = dataclasses.replace(worker_spec(options, plan, [0], ()), heatmap=False)
            if not ray.is_initialized():  # Ray's start forks: no gRPC server may poll here
                index.close()  # stops Milvus Lite's server; the first upsert reopens it
            with ray_session(address, num_cpus, say) as session:
                stream = RowStream(explain_dataset(plan, todo, options, spec))
                session.join_at_shutdown(stream.thread)
                with stream:
                    _upsert_stream(stream, index, label_of, uri_of, report)
        report.count = index.count()
    report.seconds = time.perf_counter() - start
    return report


def read_labels_csv(path: str | Path) -> dict[str, str]:
    """``id -> label`` from a CSV file with a header row ``id,label``.

    Example:
        >>> import tempfile
        >>> file = Path(tempfile.mkdtemp()) / "labels.csv"
        >>> _ = file.write_text("id,label\\na/1.png,rose\\n")
        >>> read_labels_csv(file)
        {'a/1.png': 'rose'}
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--labels {path}: no such file (expected 'folder' or a CSV file)")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"id", "label"} <= set(reader.fieldnames):
            raise ValueError(f"--labels {path}: expected a header row with columns id,label")
        labels: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            image_id, label = row["id"], row["label"]
            if not image_id or label is None:
                raise ValueError(f"--labels {path}: line {line} lacks an id or a label")
            if image_id in labels:
                raise ValueError(f"--labels {path}: line {line}: id {image_id!r} repeated")
            labels[image_id] = label
    return labels


def _labeller(labels: str | None, items: list[Item]) -> Callable[[str], str | None]:
    if labels is None:
        return lambda image_id: None
    if labels == LABELS_FROM_FOLDER:
        return lambda image_id: Path(image_id).parent.name or None
    table = read_labels_csv(labels)
    return lambda image_id: table.get(image_id) or None


def _uris(items: list[Item], parquet: tuple[str, ...]) -> Callable[[str], str]:
    """Each image id's URI: its file, or its Parquet file and id."""
    if not parquet:
        paths = {item.id: item.path for item in items}
        return lambda image_id: paths[image_id]
    import pyarrow.parquet as pq

    files = {}
    for file in parquet:
        for image_id in pq.read_table(file, columns=["id"]).column("id").to_pylist():
            files[image_id] = file
    return lambda image_id: parquet_uri(files[image_id], image_id)


def _upsert_stream(
    stream: object,
    index: GalleryIndex,
    label_of: Callable[[str], str | None],
    uri_of: Callable[[str], str],
    report: BuildReport,
) -> None:
    """Upsert each batch of embedded rows as it comes back; list the failed images."""
    batches = 0
    while (rows := stream.get(timeout=None)) is not None:  # type: ignore[attr-defined]
        good = []
        for row in rows:
            if row["error"]:
                report.failed.append((row["id"], row["error"]))
                continue
            embedding = torch.frombuffer(bytearray(row["embedding"]), dtype=torch.float32)
            good.append(IndexRow(row["id"], uri_of(row["id"]), label_of(row["id"]), embedding))
        report.written += index.upsert(good)
        batches += 1
        pause_at(f"index-batch-{batches}")
