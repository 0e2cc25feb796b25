"""TorchServe handler: a front door over the shared ``fam_core`` request pipeline.

The ``.mar`` holds the model's ``config.yaml``, its weights (the serialized file) and, for
embedding models, ``prototypes.pt``; the ONNX variant (``fam archive --onnx``) holds
``model.onnx`` and a ``config.yaml`` naming it, which the pipeline runs with onnxruntime.
Decoding, validation, preprocessing, running, explaining
and encoding are :class:`fam_core.pipeline.Pipeline`'s; this file only maps TorchServe's
request rows to pipeline requests and results (or errors) to JSON rows.

Routes (all served by :meth:`FamHandler.handle`):

* ``POST /predictions/{model}``: prediction with heatmap (``heatmap=false`` to skip it);
* ``POST /explanations/{model}`` and KServe ``POST /v1/models/{model}:explain``: the
  explanation (heatmap always on).

The image is the raw body, a multipart part (``data``/``image``) or base64 text in a JSON
body; ``method``, ``target_class``, ``resolution``, ``embedding``, ``overlay``, ``top_k``,
``references`` come as JSON keys, multipart fields or ``X-Fam-<Field>`` headers
(``X-Fam-Method: gradcam``; TorchServe 0.12 does not pass query parameters of a request with
a body to the handler). A batch from
TorchServe (``batchSize``/``maxBatchDelay``) is explained in one pass; a bad request answers
its own 4xx row, the others in the batch succeed. A model that fails to load (a truncated or
missing weights file, a ``factory:`` package missing from TorchServe's Python, ``fam_core``
itself missing) still starts a worker that answers every request at once with 503 and the
one-line reason, logged once: an exception out of ``initialize`` would make TorchServe restart
the worker with backoff while requests wait unanswered (README, "Broken archives").

The worker must run a Python with ``fam_core`` installed: ``torchserve`` passes its own
interpreter to the workers, so start it as ``.venv/bin/torchserve``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ts.metrics.dimension import Dimension
from ts.torch_handler.base_handler import BaseHandler

try:
    from fam_core.pipeline import ModelRegistry, Pipeline, PipelineError, ServedModel
    from fam_core.pipeline.errors import InvalidArgument
    from fam_core.pipeline.json_codec import (
        error_to_json,
        kserve_fields,
        request_from_fields,
        response_to_json,
    )
except ImportError as error:  # the worker stays up and answers 503 with this reason
    FAM_IMPORT_ERROR: str | None = (
        f"fam_core cannot be imported by TorchServe's Python {sys.executable} ({error}): "
        "install it there, or start the torchserve of the environment that has it"
    )
else:
    FAM_IMPORT_ERROR = None

logger = logging.getLogger(__name__)

EXPLANATION_TIME = "FamExplanationTime"
HEATMAPS_RETURNED = "FamHeatmapsReturned"
HEADER_PREFIX = "x-fam-"
"""Request headers ``X-Fam-<Field>`` carry options (TorchServe 0.12 drops query parameters of
requests that have a body)."""
UNAVAILABLE = 503
"""The status of every request to a model that failed to load (its JSON code ``UNAVAILABLE``)."""
BATCH_HEADER = "X-Fam-Batch-Size"
"""Response header: how many requests the pass that answered this one explained together."""


class FamHandler(BaseHandler):
    """Predictions with heatmaps for one ``fam_core`` model packed in a ``.mar``."""

    def initialize(self, context: Any) -> None:
        """Load and probe the model once; on any failure keep the worker, answering 503.

        Everything that can fail is checked here, before the worker reports ready: the
        config, the weights or graph (read and matched against the architecture), the
        prototypes, the factory's import, and one probe pass for the output and feature
        shapes. A failure is logged as one line (``fam: model ... failed to load ...``) and
        every request is answered at once with 503 and that reason: raising here would make
        TorchServe restart the worker with backoff while requests wait, unanswered.
        """
        self.context = context
        self.failure: str | None = None
        self.initialized = True
        served_as = getattr(context, "model_name", None)  # TorchServe's name for the archive
        model_dir = Path(context.system_properties["model_dir"])
        name, reason = model_dir.name, FAM_IMPORT_ERROR
        try:
            if reason is None:
                registry = ModelRegistry.load([model_dir / "config.yaml"], keep_going=True)
                self.pipeline = Pipeline(registry, batching=None)
                failed = registry.failed()
                if not failed:
                    self.served: ServedModel = registry.get(registry.names()[0])
                    self.model_name = self.served.name
                    logger.info(
                        "loaded %s (%s) from %s", self.model_name, self.served.task, model_dir
                    )
                    return
                name, reason = failed[0].name, failed[0].reason
        except Exception as error:  # never let the worker die: TorchServe would restart it
            reason = (f"{type(error).__name__}: {error}".splitlines() or [""])[0]
        self.model_name = served_as or name
        self.failure = f"model {self.model_name!r} failed to load: {reason}"
        logger.error("fam: %s; every request to it is answered %d", self.failure, UNAVAILABLE)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        self.context = context
        if self.failure is not None:
            return self._unavailable(len(data), context)
        explain = [context.get_request_header(i, "explain") == "True" for i in range(len(data))]
        rows = [self._parse(row, explain[i], self._header_fields(i)) for i, row in enumerate(data)]
        requests = [item for kserve, item in rows if not isinstance(item, PipelineError)]
        start = time.perf_counter()
        answers = iter(self.pipeline.explain_batch(requests))
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        out, heatmaps = [], 0
        for idx, (kserve, item) in enumerate(rows):
            answer = item if isinstance(item, PipelineError) else next(answers)
            context.set_response_header(idx, BATCH_HEADER, str(len(requests)))
            context.set_response_content_type(idx, "application/json")
            if isinstance(answer, PipelineError):
                context.set_response_status(answer.http_status, str(answer), idx)
                out.append(json.dumps(error_to_json(answer)))
                continue
            body = response_to_json(answer)
            heatmaps += sum("heatmap" in result for result in body["results"])
            if kserve:
                body = {"explanations" if explain[idx] else "predictions": body["results"]}
            out.append(json.dumps(body))
        self._record(elapsed_ms, heatmaps)
        return out

    def _unavailable(self, rows: int, context: Any) -> list[str]:
        """Every row answered 503 with the reason the model failed to load."""
        assert self.failure is not None
        for idx in range(rows):
            context.set_response_content_type(idx, "application/json")
            context.set_response_status(UNAVAILABLE, self.failure, idx)
        return [json.dumps({"code": "UNAVAILABLE", "message": self.failure})] * rows

    def _header_fields(self, idx: int) -> dict[str, str]:
        """Options sent as ``X-Fam-<Field>`` headers (``X-Fam-Target-Class: 3``)."""
        headers = self.context.get_all_request_header(idx) or {}
        return {
            key.lower()[len(HEADER_PREFIX) :].replace("-", "_"): value
            for key, value in headers.items()
            if isinstance(value, str) and key.lower().startswith(HEADER_PREFIX)
        }

    def _parse(
        self, row: dict[str, Any], explain: bool, headers: dict[str, str]
    ) -> tuple[bool, Any]:
        """``(is KServe, ExplainRequest or the PipelineError it raised)`` for one row."""
        fields: dict[str, Any] = dict(headers)
        kserve = False
        try:
            for key, value in row.items():
                if key == "body" and isinstance(value, dict):
                    kserve = "instances" in value
                    fields.update(kserve_fields(value) if kserve else value)
                elif key == "body" and isinstance(value, list):
                    raise InvalidArgument("a JSON body must be an object, not a list")
                else:
                    fields[key] = value
            return kserve, request_from_fields(
                self.model_name, fields, force_heatmap=explain, limits=self.pipeline.limits
            )
        except PipelineError as error:
            return kserve, error

    def _record(self, elapsed_ms: float, heatmaps: int) -> None:
        metrics = self.context.metrics
        dimensions = [Dimension("ModelName", self.model_name), Dimension("Level", "Model")]
        metrics.add_time(EXPLANATION_TIME, elapsed_ms, None, "ms", list(dimensions))
        metrics.add_counter(HEATMAPS_RETURNED, heatmaps, None, list(dimensions))
