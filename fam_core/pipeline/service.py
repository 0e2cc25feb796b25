"""The request pipeline every front door shares: decode, preprocess, run, explain, encode.

A front door (gRPC, the Open Inference Protocol, a TorchServe handler) turns its wire format
into :class:`~fam_core.pipeline.request.ExplainRequest`, calls :meth:`Pipeline.explain` (or
:meth:`Pipeline.explain_batch` when its framework already batched requests) and maps
:class:`~fam_core.pipeline.errors.PipelineError` subclasses to its own statuses.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from fam_core.pipeline.batching import (
    CANCELLED_MESSAGE,
    BatchingConfig,
    BatchObserver,
    MicroBatcher,
    StepObserver,
)
from fam_core.pipeline.decode import (
    DecodeBudget,
    Header,
    check_decoded_bytes,
    check_sizes,
    decode_input,
    decoded_bytes,
    open_header,
)
from fam_core.pipeline.encode import encode_result
from fam_core.pipeline.engine import run_jobs
from fam_core.pipeline.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    PipelineError,
    Unavailable,
)
from fam_core.pipeline.jobs import Computed, Job, SearchJob
from fam_core.pipeline.limits import Limits
from fam_core.pipeline.models import ModelRegistry, ServedModel
from fam_core.pipeline.preprocess import preprocess
from fam_core.pipeline.request import (
    RESOLUTIONS,
    EncodedImage,
    ExplainRequest,
    ExplainResponse,
    ImageInput,
    ModelDescription,
    SearchRequest,
    SearchResponse,
)
from fam_core.pipeline.search import encode_search_result, search_job
from fam_core.pipeline.steps import StepControl, stepping, watch_steps

DEFAULT_LIMITS = Limits()
DEFAULT_BATCHING = BatchingConfig()


@dataclass(frozen=True)
class _Prepared:
    served: ServedModel
    request: ExplainRequest
    job: Job
    pixels: torch.Tensor  # [B, 3, H, W] in [0, 1]


class Pipeline:
    """Predict and explain requests against the models of a registry.

    Args:
        registry: the served models.
        limits: request limits.
        batching: micro-batching and cost-lane settings (:mod:`.batching`); ``None`` runs each
            call directly in the caller's thread (for front doors that batch themselves, e.g.
            TorchServe).
        batch_observer: called with ``(model, images)`` after each pass (metrics).
        step_observer: called with ``(model, seconds)`` at each step of an expensive batch.

    Draining (a server's stop): :meth:`start_drain` makes :attr:`ready` false at once while
    work goes on; :meth:`cancel` ends the grace period: queued requests and running ones (at
    their next model pass, :mod:`.steps`) fail with
    :class:`~fam_core.pipeline.errors.Cancelled`, and new ones are refused.

    Example:
        >>> from fam_core.data.flowers import make_flowers
        >>> from fam_core.pipeline import EncodedImage
        >>> from fam_core.render import to_png_bytes
        >>> flower = make_flowers([9], per_class=1).images[0]  # class 9: centre-yellow
        >>> png = to_png_bytes((flower * 255).round().byte().permute(1, 2, 0))
        >>> pipeline = Pipeline(ModelRegistry.from_names(["default-classifier"]), batching=None)
        >>> response = pipeline.explain(ExplainRequest("default-classifier", (EncodedImage(png),)))
        >>> response.results[0].prediction.label, response.results[0].heatmap.shape
        ('centre-yellow', (84, 84))
        >>> pipeline.close()
    """

    def __init__(
        self,
        registry: ModelRegistry,
        limits: Limits = DEFAULT_LIMITS,
        batching: BatchingConfig | None = DEFAULT_BATCHING,
        batch_observer: BatchObserver | None = None,
        step_observer: StepObserver | None = None,
    ) -> None:
        self.registry = registry
        self.limits = limits
        self.batching = batching
        self._batch_observer = batch_observer
        self._batchers: dict[str, MicroBatcher] = {}
        self._direct_lock = threading.Lock()
        self.decode_budget = DecodeBudget(limits.max_inflight_decoded_bytes)
        self._draining = threading.Event()
        self._cancelled = threading.Event()
        if batching is not None:
            slots = threading.BoundedSemaphore(batching.expensive_concurrency)
            self._batchers = {
                served.name: MicroBatcher(
                    served,
                    batching,
                    batch_observer,
                    expensive_slots=slots,
                    step_observer=step_observer,
                )
                for served in registry
            }
        else:
            for served in registry:
                if served.model is not None:
                    watch_steps(served.model)

    # -- readiness and drain
    @property
    def ready(self) -> bool:
        """Whether this pipeline takes new work: a model is loaded and no drain has begun."""
        return len(self.registry) > 0 and not self._draining.is_set()

    @property
    def draining(self) -> bool:
        """Whether :meth:`start_drain` was called."""
        return self._draining.is_set()

    def lanes(self, name: str) -> dict[str, dict[str, int]]:
        """Model ``name``'s lanes: ``{"queued": {lane: jobs}, "running": {lane: images}}``
        (all zero without batching)."""
        batcher = self._batchers.get(name)
        if batcher is None:
            idle = {"cheap": 0, "expensive": 0}
            return {"queued": dict(idle), "running": dict(idle)}
        return {"queued": dict(batcher.queued()), "running": dict(batcher.running())}

    def start_drain(self) -> None:
        """Not :attr:`ready` from now on; work in flight goes on until :meth:`cancel`."""
        self._draining.set()

    def cancel(self) -> None:
        """End the drain's grace: queued and running work fails with ``Cancelled`` (running
        work at its next model pass); new work is refused with ``Unavailable``."""
        self._draining.set()
        self._cancelled.set()
        for batcher in self._batchers.values():
            batcher.cancel()

    # -- front-door API
    def explain(self, request: ExplainRequest, *, deadline: float | None = None) -> ExplainResponse:
        """Predict and explain one request. ``deadline`` is a ``time.monotonic()`` instant."""
        self._check_open()
        _check_deadline(deadline)
        prepared = self._prepare(request, deadline)
        return self._finish(prepared, self._run(prepared.served, prepared.job, deadline))

    def explain_batch(
        self, requests: list[ExplainRequest]
    ) -> list[ExplainResponse | PipelineError]:
        """Several requests at once, compatible ones in one pass; errors are returned in place.

        For front doors whose framework batches requests itself (TorchServe's ``batchSize``).
        """
        prepared: list[_Prepared | PipelineError] = []
        for request in requests:
            try:
                prepared.append(self._prepare(request, None))
            except PipelineError as error:
                prepared.append(error)
        groups: dict[tuple[str, tuple[str, bool, int]], list[int]] = {}
        for index, item in enumerate(prepared):
            if isinstance(item, _Prepared):
                groups.setdefault((item.served.name, item.job.batch_key()), []).append(index)
        answers: list[ExplainResponse | PipelineError] = list(prepared)  # type: ignore[arg-type]
        for (name, _key), members in groups.items():
            items = [prepared[i] for i in members]
            try:
                self._check_open()
                with self._direct_lock, stepping(self._direct_control(None)):
                    computed = run_jobs(self.registry.get(name), [p.job for p in items])  # type: ignore[union-attr]
            except PipelineError as error:
                for i in members:
                    answers[i] = error
                continue
            for i, item, result in zip(members, items, computed, strict=True):
                answers[i] = self._finish(item, result)  # type: ignore[arg-type]
        return answers

    def search(self, request: SearchRequest, *, deadline: float | None = None) -> SearchResponse:
        """The nearest gallery images of each image in the model's index, each match explained
        (:func:`fam_core.pipeline.explained_search`). Images are decoded and preprocessed as
        :meth:`explain` does; options and limits are checked before anything is decoded
        (:func:`~fam_core.pipeline.search.search_job`). ``deadline`` as in :meth:`explain`."""
        self._check_open()
        _check_deadline(deadline)
        served = self.registry.get(request.model)
        checked = search_job(served, request, self.limits)
        headers = self._headers(request.images, "image")
        check_decoded_bytes(
            sum(decoded_bytes(i, h) for i, h in zip(request.images, headers, strict=True)),
            self.limits,
        )
        _, inputs = self._decode(request.images, served, headers=headers, deadline=deadline)
        job = replace(checked, inputs=inputs)
        found = self._run(served, job, deadline)
        method = "" if job.explain == "none" else job.method
        layer = served.config.target_layer or ""
        return SearchResponse(
            model=served.name,
            results=tuple(encode_search_result(query, method, layer) for query in found),
            explain=job.explain,
            method=method,
            request_id=request.request_id,
        )

    def describe(self, name: str) -> ModelDescription:
        """What ``ModelInfo`` reports about model ``name``."""
        served = self.registry.get(name)
        config = served.config
        return ModelDescription(
            name=served.name,
            task=served.task,
            backbone=config.architecture,
            input_size=config.image_size[0],
            input_shape=config.image_size,
            resize=config.resize,
            mean=tuple(config.mean),
            std=tuple(config.std),
            methods=served.methods,
            default_method=served.default_method,
            target_layer=config.target_layer or "",
            feature_shape=served.feature_shape,
            output_dim=served.output_dim,
            class_names=served.labels,
            num_prototypes=served.num_prototypes,
            index="" if config.index is None else str(config.index),
            top_k=config.top_k,
            explain=config.explain,
            **_index_search(served),
        )

    def pixels(self, model: str, images: tuple[ImageInput, ...]) -> torch.Tensor:
        """``images`` as model ``model`` sees them, before normalisation: decoded within the
        limits and fitted to its input, ``[B, 3, H, W]`` in ``[0, 1]`` (what the heatmaps of
        :meth:`explain` at input resolution cover; the metrics of ``fam bulk --eval`` read it).
        """
        return self._decode(tuple(images), self.registry.get(model))[0]

    def close(self, timeout: float | None = None) -> None:
        """Finish queued work and stop the batching threads, waiting up to ``timeout``
        seconds for each (``None``: as long as it takes); work still unanswered then fails
        with ``Cancelled``."""
        for batcher in self._batchers.values():
            batcher.close(timeout)

    def _check_open(self) -> None:
        if self._cancelled.is_set():
            raise Unavailable("the server is shutting down")

    def _direct_control(self, deadline: float | None) -> StepControl:
        """Stops a call run in the caller's thread at its next model pass after
        :meth:`cancel` or past ``deadline``."""

        def stop_reason() -> PipelineError | None:
            if self._cancelled.is_set():
                return Cancelled(CANCELLED_MESSAGE)
            if deadline is not None and time.monotonic() >= deadline:
                return DeadlineExceeded("the deadline passed while the request was running")
            return None

        return StepControl(stop_reason)

    # -- steps
    def _prepare(self, request: ExplainRequest, deadline: float | None) -> _Prepared:
        served = self.registry.get(request.model)
        if not request.images:
            raise InvalidArgument("the request has no images: expected at least one")
        check_sizes(tuple(request.images) + tuple(request.references), self.limits)
        method = served.method_name(request.method)
        if request.heatmap:
            served.check_method(method)
        if request.resolution not in RESOLUTIONS:
            raise InvalidArgument(
                f"resolution must be one of {list(RESOLUTIONS)}, got {request.resolution!r}"
            )
        if request.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {request.top_k}")
        if request.target_class is not None:
            if served.task not in ("classifier", "knn"):
                raise InvalidArgument(
                    f"target_class needs a classifier; model {served.name!r} is an embedding "
                    "model: send references instead"
                )
            classes = len(served.labels) if served.task == "knn" else served.output_dim
            if not 0 <= request.target_class < classes:
                raise InvalidArgument(
                    f"target_class must be in [0, {classes}), got {request.target_class}"
                )
        if request.references and served.task != "embedding":
            raise InvalidArgument(
                f"references need an embedding model; model {served.name!r} is a classifier"
            )
        headers = self._headers(request.images, "image")
        reference_headers = self._headers(request.references, "reference")
        check_decoded_bytes(
            sum(decoded_bytes(i, h) for i, h in zip(request.images, headers, strict=True))
            + sum(
                decoded_bytes(i, h)
                for i, h in zip(request.references, reference_headers, strict=True)
            ),
            self.limits,
        )
        pixels, inputs = self._decode(request.images, served, headers=headers, deadline=deadline)
        references = None
        if request.references:
            _, reference_inputs = self._decode(
                request.references,
                served,
                "reference",
                headers=reference_headers,
                deadline=deadline,
            )
            references = self._run(
                served, Job(reference_inputs, "", heatmap=False), deadline
            ).outputs.detach()
        job = Job(
            inputs, method, request.heatmap, request.target_class, references, request.resolution
        )
        return _Prepared(served, request, job, pixels)

    def _headers(self, images: tuple[ImageInput, ...], what: str) -> list[Header | None]:
        """Each encoded image opened and checked against the limits, nothing decoded yet."""
        return [
            open_header(image.data, self.limits, f"{what} {index}")
            if isinstance(image, EncodedImage)
            else None
            for index, image in enumerate(images)
        ]

    def _decode(
        self,
        images: tuple[ImageInput, ...],
        served: ServedModel,
        what: str = "image",
        *,
        headers: list[Header | None] | None = None,
        deadline: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one image at a time inside the in-flight budget, fit it to the model's input
        at once (only ``[3, H, W]`` at the input size is kept), checking the deadline between
        images."""
        fitted = []
        size = served.config.image_size
        if headers is None:
            headers = self._headers(images, what)
        for index, (image, header) in enumerate(zip(images, headers, strict=True)):
            _check_deadline(deadline)
            with self.decode_budget.reserve(
                decoded_bytes(image, header), deadline, self.limits.queue_timeout_s
            ):
                try:
                    decoded = decode_input(
                        image, self.limits, index=index, header=header, size=size
                    )
                except InvalidArgument as error:
                    raise type(error)(str(error).replace("image", what, 1)) from None
                fitted.append(served.config.fit(decoded))
                del decoded
        _check_deadline(deadline)
        return preprocess(fitted, served.config)

    def _run(self, served: ServedModel, job: Job | SearchJob, deadline: float | None) -> Any:
        _check_deadline(deadline)
        if not self._batchers:
            with self._direct_lock, stepping(self._direct_control(deadline)):
                (computed,) = run_jobs(served, [job])
            if self._batch_observer is not None:
                self._batch_observer(served.name, len(job))
            return computed
        future = self._batchers[served.name].submit(job, deadline)
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DeadlineExceeded("the deadline passed before the result was ready") from None

    def _finish(self, prepared: _Prepared, computed: Computed) -> ExplainResponse:
        results = tuple(
            encode_result(prepared.served, prepared.request, computed, i, prepared.pixels[i])
            for i in range(len(prepared.job))
        )
        return ExplainResponse(prepared.served.name, results, prepared.request.request_id)


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("the deadline passed before the request was processed")


def _index_search(served: ServedModel) -> dict[str, Any]:
    """The ``index_type`` and default ``search_params`` of ``served``'s gallery index, for
    :meth:`Pipeline.describe` (none without an index, or while its engine does not answer)."""
    from fam_core.search.engine import IndexUnavailable

    if served.index is None:
        return {}
    try:
        index_type = served.index.card.index_type
        params = served.index.check_search_params()
    except (IndexUnavailable, ValueError):
        return {}
    return {"index_type": index_type, "search_params": tuple(sorted(params.items()))}
