"""The actor of a bulk job: loads the models once, then explains batches of encoded images.

It runs the request pipeline every front door shares (:class:`fam_core.pipeline.Pipeline`):
decoding, limits, preprocessing, the explainer registry and the encoding of heatmaps are the
ones ``fam explain`` and the servers use. Each image is decoded here, inside the actor, so a
corrupt file or an image of the wrong size becomes an error row with the pipeline's reason
instead of failing the Ray job: a batch goes through the pipeline as one request and, if the
pipeline refuses it, again image by image.

Example:
    >>> worker = BulkWorker(WorkerSpec(models=("default-classifier",), shards={"a.png": 0}))
    >>> worker.rows(["a.png"], (EncodedImage(b"junk"),))[0]["error"]  # doctest: +ELLIPSIS
    'InvalidArgument: image 0: cannot decode the image: ...'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch

from fam_core.bulk.evaluate import DEFAULT_STEPS, check_evaluable, image_metrics
from fam_core.bulk.rows import Row, error_row, result_row, to_table
from fam_core.messages import typed_first_line
from fam_core.pipeline import (
    EncodedImage,
    ExplainRequest,
    ExplainResponse,
    ExplainResult,
    Limits,
    ModelRegistry,
    Pipeline,
    PipelineError,
    ServedModel,
    heatmap_from_bytes,
)
from fam_core.pipeline.limits import IMAGE_FORMATS
from fam_core.pipeline.request import RESOLUTIONS, Resolution


@dataclass(frozen=True)
class ExplainSettings:
    """What every image gets.

    Attributes:
        method: the explainer (``None``: each model's default).
        layer: target layer override.
        resolution: heatmaps at ``"input"`` or ``"feature"`` resolution.
        embedding: write the model's output vector.
        overlay: write a PNG overlay of the heatmap on the model's input.
        evaluate: compute the per-image faithfulness metrics (:mod:`fam_core.bulk.evaluate`).
        eval_steps: deletion / insertion points.
    """

    method: str | None = None
    layer: str | None = None
    resolution: Resolution = "input"
    embedding: bool = False
    overlay: bool = False
    evaluate: bool = False
    eval_steps: int = DEFAULT_STEPS

    def __post_init__(self) -> None:
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"--resolution must be one of {list(RESOLUTIONS)}")
        steps = self.eval_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"--eval-steps must be an int >= 1, got {steps!r}")
        if self.evaluate and self.resolution != "input":
            raise ValueError("--eval needs --resolution input")


@dataclass(frozen=True)
class WorkerSpec:
    """What every actor of a job needs (sent to each actor once).

    Attributes:
        models: model names, config paths or ``.onnx`` paths (several: checkpoints side by side).
        settings: what every image gets.
        references: encoded reference images (embedding models).
        shards: the shard of each image key (file path or Parquet id); other keys are skipped.
        ids: the id of each file path (Parquet sets: empty, the key is the id).
        device: ``"cpu"`` or ``"cuda"``.
        batch_size: images per batch (the request limit allows it).
        heatmap: explain each image (``False``: predict and embed only, as ``fam index build``).
    """

    models: tuple[str, ...]
    settings: ExplainSettings = ExplainSettings()
    references: tuple[bytes, ...] = ()
    shards: dict[str, int] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    batch_size: int = 16
    heatmap: bool = True

    def load(self) -> tuple[Pipeline, list[ServedModel]]:
        """The models loaded and a pipeline over them; ``ValueError`` for what cannot run."""
        layer = self.settings.layer
        served = [ServedModel.load(m, self.device, target_layer=layer) for m in self.models]
        limits = Limits(
            max_batch=max(64, self.batch_size + len(self.references)), formats=IMAGE_FORMATS
        )
        pipeline = Pipeline(ModelRegistry(served), limits=limits, batching=None)
        for model in served:
            if self.settings.method is not None:
                model.check_method(model.method_name(self.settings.method))
            if self.references and model.task != "embedding":
                raise ValueError(
                    f"--references need embedding models; {model.name!r} is a classifier"
                )
        return pipeline, served


class BulkWorker:
    """The callable class of ``map_batches``: a batch of ``{key, bytes}`` in, rows out.

    Args:
        spec: the job's settings.
        key_column: the column naming each image (``"path"`` for files, ``"id"`` for Parquet).
        bytes_column: the column of encoded bytes (``"bytes"``, or ``"image"`` for Parquet).
    """

    def __init__(self, spec: WorkerSpec, key_column: str = "path", bytes_column: str = "bytes"):
        self.spec = spec
        self.key_column, self.bytes_column = key_column, bytes_column
        self.pipeline, self.served = spec.load()
        references = tuple(EncodedImage(data) for data in spec.references)
        self.references = references
        self.reference_embeddings: dict[str, torch.Tensor | None] = {}
        for model in self.served:
            embeddings = self._reference_embeddings(model) if references else None
            self.reference_embeddings[model.name] = embeddings
            if spec.settings.evaluate:
                check_evaluable(model, embeddings)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        keys = [str(key) for key in batch[self.key_column]]
        keep = [i for i, key in enumerate(keys) if key in self.spec.shards]  # pending shards
        data = batch[self.bytes_column]
        images = tuple(EncodedImage(bytes(data[i])) for i in keep)
        return to_table(self.rows([keys[i] for i in keep], images) if keep else [])

    def rows(self, keys: list[str], images: tuple[EncodedImage, ...]) -> list[Row]:
        """One row per image and model, in the order of ``keys`` then models."""
        ids = [self.spec.ids.get(key, key) for key in keys]
        shards = [self.spec.shards[key] for key in keys]
        per_model = [self._explain(model, images) for model in self.served]
        rows = []
        for index, (image_id, shard) in enumerate(zip(ids, shards, strict=True)):
            for model, (answers, metrics) in zip(self.served, per_model, strict=True):
                answer = answers[index]
                if isinstance(answer, PipelineError):
                    rows.append(error_row(image_id, model.name, shard, typed_first_line(answer)))
                else:
                    rows.append(
                        result_row(image_id, model.name, shard, answer, metrics.get(index, {}))
                    )
        return rows

    def _request(self, model: ServedModel, images: tuple[EncodedImage, ...]) -> ExplainRequest:
        settings = self.spec.settings
        return ExplainRequest(
            model=model.name,
            images=images,
            method=settings.method,
            heatmap=self.spec.heatmap,
            resolution=settings.resolution,
            embedding=settings.embedding,
            overlay=settings.overlay,
            references=self.references,
        )

    def _explain(
        self, model: ServedModel, images: tuple[EncodedImage, ...]
    ) -> tuple[list[ExplainResult | PipelineError], dict[int, dict[str, float]]]:
        """Each image's result or error, and the metrics of the explained ones."""
        answers: list[ExplainResult | PipelineError]
        try:
            answers = list(self.pipeline.explain(self._request(model, images)).results)
        except PipelineError:  # one bad image: again one by one, to keep the others
            answers = [
                a.results[0] if isinstance(a, ExplainResponse) else a
                for a in self.pipeline.explain_batch([self._request(model, (i,)) for i in images])
            ]
        metrics: dict[int, dict[str, float]] = {}
        if self.spec.settings.evaluate:
            done = [i for i, a in enumerate(answers) if isinstance(a, ExplainResult)]
            if done:
                values = self._metrics(model, [images[i] for i in done], [answers[i] for i in done])  # type: ignore[misc]
                metrics = dict(zip(done, values, strict=True))
        return answers, metrics

    def _metrics(
        self, model: ServedModel, images: list[EncodedImage], results: list[ExplainResult]
    ) -> list[dict[str, float]]:
        pixels = self.pipeline.pixels(model.name, tuple(images))
        maps = torch.stack(
            [heatmap_from_bytes(r.heatmap.data, r.heatmap.shape) for r in results]  # type: ignore[union-attr]
        )
        explained = torch.tensor([r.prediction.index for r in results])
        return image_metrics(
            model,
            pixels,
            maps,
            explained,
            self.reference_embeddings[model.name],
            steps=self.spec.settings.eval_steps,
        )

    def _reference_embeddings(self, model: ServedModel) -> torch.Tensor:
        request = ExplainRequest(
            model=model.name, images=self.references, heatmap=False, embedding=True
        )
        results = self.pipeline.explain(request).results
        return torch.stack(
            [torch.frombuffer(bytearray(r.embedding or b""), dtype=torch.float32) for r in results]
        )
