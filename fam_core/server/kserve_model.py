"""KServe front door: fam's request pipeline as a KServe custom model server.

Each served model is a :class:`FamKServeModel` (a ``kserve.Model``) over one shared
:class:`~fam_core.pipeline.Pipeline` (the one ``fam serve`` and the TorchServe handler run),
served by ``kserve.ModelServer`` on KServe's routes:

* REST v1: ``POST /v1/models/{name}:predict`` and ``:explain`` with
  ``{"instances": [base64 image, ...], "parameters": {"method": ..., ...}}``
  (:func:`~fam_core.pipeline.json_codec.kserve_fields`); the answer is
  ``{"predictions": [result, ...]}`` or ``{"explanations": [result, ...]}``, each result the
  JSON of ``fam.v1.Result`` (the heatmap as base64 float16 with its shape).
* REST v2 (Open Inference Protocol): ``POST /v2/models/{name}/infer`` with one ``BYTES``
  ``[B]`` input whose elements are base64 text (JSON has no bytes), or ``UINT8``/``FP32``
  pixels ``[B, 3, H, W]``; parameters ``method``, ``resolution``, ``target_class``. Outputs are
  named tensors ``scores``, ``label``, ``embedding`` and ``heatmap``
  (:mod:`~fam_core.pipeline.oip_codec`); a model with an index searches it: outputs
  ``neighbour_ids``, ``neighbour_scores``, ``neighbour_labels``, ``heatmaps`` (parameters
  ``top_k``, ``method``, ``explain``, ``filter``, ``ef``, ``nprobe``). Maps are FP32 in
  JSON, FP16 with ``"binary_data_output": true`` (the binary extension).
* gRPC v2: ``inference.GRPCInferenceService/ModelInfer``, as ``fam serve``'s OIP service
  (heatmap FP16).
* health: ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}/ready``,
  ``/v1/models/{name}``; Prometheus ``/metrics`` on the HTTP port. A model that failed to
  load (a config value the model contradicts, a missing file...) is not ready: its routes
  answer 503 with the reason, ``Model with name NAME is not ready: REASON``.

A request the pipeline refuses answers the status its error names
(:mod:`~fam_core.pipeline.errors`): HTTP 400/404/413/415/429/503/504 with
``{"error": message, "code": grpc_code}``, or that gRPC status. Bodies larger than the
request limit (as base64, plus 1 MiB) are refused with 413 before they are read. A model
whose expensive lane is full answers 429 with ``Retry-After`` (seconds); the lanes are
``fam_lane_queued`` and ``fam_lane_running`` on ``/metrics``.

Drain: on SIGTERM (or SIGINT) ``/v2/health/ready``, ``/v2/models/{name}/ready`` and the gRPC
``ServerReady`` / ``ModelReady`` answer not ready at once and new requests are refused with
503; requests in flight finish within ``grace_s``; one still running then is cancelled at its
next model pass and answered 503 (``UNAVAILABLE``); ``fam serve`` exits soon after.

Run it with ``fam serve --engine kserve`` or ``python -m fam_core.server.kserve_model``.
``kserve`` is imported with this module only (``pip install 'fam-core[kserve]'``).

Example:
    >>> from fam_core.pipeline import ModelRegistry, Pipeline
    >>> pipeline = Pipeline(ModelRegistry.from_names(["default-classifier"]), batching=None)
    >>> model = FamKServeModel("default-classifier", pipeline)
    >>> model.load()
    True
    >>> pipeline.close()
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import math
import re
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from fam_core.extras import require
from fam_core.pipeline import (
    BatchingConfig,
    ExplainRequest,
    Limits,
    ModelRegistry,
    Pipeline,
    PipelineError,
)
from fam_core.pipeline.decode import check_count
from fam_core.pipeline.errors import InvalidArgument, LaneFull, Unavailable
from fam_core.pipeline.json_codec import kserve_fields, request_from_fields, response_to_json
from fam_core.pipeline.models import load_registry
from fam_core.pipeline.oip_codec import answer_infer, tensor_metadata
from fam_core.server.calls import MAX_MESSAGE, shorten
from fam_core.server.status import status_code


def _import_kserve() -> Any:
    """``kserve``, imported with an empty command line: ``kserve.model_server`` parses
    ``sys.argv`` when it is imported, and would read ``fam serve``'s options as its own."""
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        require("kserve", "kserve", "kserve.model_server", "grpc_interceptor.exceptions")
    finally:
        sys.argv = argv
    import kserve

    return kserve


kserve = _import_kserve()
from fastapi.responses import JSONResponse  # noqa: E402  (a dependency of kserve)
from grpc_interceptor.exceptions import GrpcException  # noqa: E402
from kserve.protocol.grpc import grpc_predict_v2_pb2 as kserve_pb  # noqa: E402
from kserve.protocol.infer_type import (  # noqa: E402
    InferOutput,
    InferRequest,
    InferResponse,
    to_http_parameters,
)

VERSION = "1"
"""The model version reported in v2 responses."""
BODY_OVERHEAD = 1 << 20
"""Bytes a REST body (a gRPC message) may hold beyond the base64 of (beyond)
``Limits.max_request_bytes``."""


class RequestError(GrpcException):
    """A :class:`PipelineError` on its way out: KServe's gRPC server answers
    ``status_code`` (:class:`GrpcException`), the REST server ``http_status``
    (:func:`request_error_response`)."""

    def __init__(self, error: PipelineError) -> None:
        super().__init__(shorten(str(error), MAX_MESSAGE), status_code(error))
        self.http_status = error.http_status
        self.code = error.code
        self.retry_after_s = error.retry_after_s if isinstance(error, LaneFull) else None

    def __str__(self) -> str:
        return self.details


async def request_error_response(_request: Any, error: RequestError) -> JSONResponse:
    """The REST answer to a refused request: its HTTP status, ``{"error", "code"}``, and
    ``Retry-After`` when retrying later may succeed."""
    headers = None if error.retry_after_s is None else {"Retry-After": str(error.retry_after_s)}
    return _error_response(error.http_status, error.details, error.code, headers)


def _error_response(
    http_status: int, details: str, code: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A REST refusal: ``{"error": details, "code": code}`` with its HTTP status."""
    return JSONResponse(
        status_code=http_status, content={"error": details, "code": code}, headers=headers
    )


class FamKServeModel(kserve.Model):  # type: ignore[misc,name-defined]
    """One served model of ``pipeline`` behind KServe's v1, v2 and gRPC v2 routes."""

    def __init__(self, name: str, pipeline: Pipeline) -> None:
        super().__init__(name)
        self.pipeline = pipeline

    def load(self) -> bool:
        """Ready when the pipeline's registry loaded this model (it loads models itself); a
        model that failed to load stays not ready and the pipeline answers it with 503."""
        self.ready = self.name in self.pipeline.registry.names()
        return self.ready

    def get_input_types(self) -> list[dict[str, Any]]:
        """The v2 metadata's inputs: one ``BYTES`` ``[B]`` tensor of images."""
        return self._tensors()["inputs"]

    def get_output_types(self) -> list[dict[str, Any]]:
        """The v2 metadata's outputs: ``scores``, ``label``, ``embedding``, ``heatmap``; for a
        model with an index the search outputs first (:mod:`~fam_core.pipeline.oip_codec`)."""
        return self._tensors()["outputs"]

    def _tensors(self) -> dict[str, list[dict[str, Any]]]:
        info = self.pipeline.describe(self.name)
        return tensor_metadata(info.output_dim, search=info.searchable)

    async def predict(
        self,
        payload: dict[str, Any] | bytes | InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | InferResponse | Any:
        """v1 ``:predict`` (heatmap unless ``"heatmap": false``), v2 ``infer``, gRPC v2."""
        return await self._answer(payload, explain=False)

    async def explain(
        self, payload: dict[str, Any] | bytes | InferRequest, headers: dict[str, str] | None = None
    ) -> dict[str, Any] | InferResponse | Any:
        """v1 ``:explain``: the results with their heatmaps under ``"explanations"``."""
        return await self._answer(payload, explain=True)

    async def _answer(self, payload: Any, *, explain: bool) -> Any:
        try:
            if self.pipeline.draining:
                raise Unavailable("the server is shutting down")
            if isinstance(payload, InferRequest):
                return await self._infer(payload)
            request = self._v1_request(payload, explain)
            response = await asyncio.to_thread(self.pipeline.explain, request)
            results = response_to_json(response)["results"]
            return {"explanations" if explain else "predictions": results}
        except PipelineError as error:
            raise RequestError(error) from None

    def _v1_request(self, payload: Any, explain: bool) -> ExplainRequest:
        if isinstance(payload, bytes | bytearray):  # a non-JSON body: the image itself
            fields: dict[str, Any] = {"data": bytes(payload)}
        elif isinstance(payload, dict):
            fields = kserve_fields(payload)
        else:
            raise InvalidArgument(
                f"a KServe v1 body must be a JSON object, got {type(payload).__name__}"
            )
        return request_from_fields(
            self.name, fields, force_heatmap=explain, limits=self.pipeline.limits
        )

    async def _infer(self, payload: InferRequest) -> Any:
        """A v2 request: gRPC answers the message itself, REST an :class:`InferResponse`."""
        if not payload.from_grpc:
            _decode_base64_inputs(payload, self.pipeline.limits)
        message = payload.to_grpc()
        version = payload.model_version or VERSION
        answer = await asyncio.to_thread(
            answer_infer, self.pipeline, message, version, kserve_pb.ModelInferResponse
        )
        if payload.from_grpc:
            return answer
        binary = bool(payload.use_binary_outputs)
        if not binary:
            _maps_as_fp32(answer)
        return InferResponse(
            response_id=answer.id,
            model_name=answer.model_name,
            model_version=answer.model_version,
            infer_outputs=[
                InferOutput(
                    name=output.name,
                    shape=list(output.shape),
                    datatype=output.datatype,
                    parameters=to_http_parameters(output.parameters) or None,
                )
                for output in answer.outputs
            ],
            raw_outputs=list(answer.raw_output_contents),
            use_binary_outputs=binary,
        )


def _decode_base64_inputs(payload: InferRequest, limits: Limits) -> None:
    """REST v2 ``BYTES`` elements come as base64 text (JSON carries no bytes): decode them in
    place, after checking their count against the limits."""
    for tensor in payload.inputs:
        if tensor.datatype != "BYTES" or not isinstance(tensor.data, list):
            continue
        check_count(len(tensor.data), limits, f"BYTES input {tensor.name[:40]!r}")
        decoded = []
        for index, item in enumerate(tensor.data):
            if not isinstance(item, str):
                raise InvalidArgument(
                    f"BYTES element {index} is a {type(item).__name__}; expected base64 text"
                )
            try:
                decoded.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                raise InvalidArgument(
                    f"BYTES element {index} is not base64: send each image as base64 text"
                ) from None
        tensor.data = decoded


def _maps_as_fp32(message: Any) -> None:
    """JSON has no FP16: the map outputs of a JSON answer as FP32 (same values)."""
    for index, output in enumerate(message.outputs):
        if output.datatype == "FP16":
            raw = message.raw_output_contents[index]
            message.raw_output_contents[index] = (
                np.frombuffer(raw, dtype="<f2").astype("<f4").tobytes()
            )
            output.datatype = "FP32"


def _limit_body(max_bytes: int) -> Any:
    """HTTP middleware: 413 for a body whose ``Content-Length`` is over ``max_bytes``."""

    async def limit(request: Any, call_next: Any) -> Any:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_bytes:
            return _error_response(
                413,
                f"the body has {length} bytes, more than the limit of {max_bytes}",
                "RESOURCE_EXHAUSTED",
            )
        return await call_next(request)

    return limit


_MODEL_ROUTE = re.compile(r"^/v[12]/models/([^/:]+)")


def _answer_not_ready(reasons: dict[str, str]) -> Any:
    """HTTP middleware: every route of a model that failed to load answers 503 with the
    reason it did not load (KServe's own answer, ``Model with name ... is not ready.``,
    names none); ``reasons`` maps each such model's name to its reason."""

    async def answer(request: Any, call_next: Any) -> Any:
        route = _MODEL_ROUTE.match(request.url.path)
        name = route.group(1) if route else None
        if name in reasons:
            return _error_response(
                503, f"Model with name {name} is not ready: {reasons[name]}", "UNAVAILABLE"
            )
        return await call_next(request)

    return answer


class Drain:
    """The drain of a KServe server: readiness false at once, cancel at the end of the grace.

    :meth:`watch_signals` runs as the app's startup hook, inside uvicorn's own SIGTERM/SIGINT
    handlers, and puts :meth:`begin` in front of them (uvicorn then stops taking connections
    and waits for those in flight; KServe stops its gRPC server after it).
    """

    def __init__(self, pipeline: Pipeline, models: list[FamKServeModel], grace_s: float) -> None:
        self.pipeline = pipeline
        self.models = models
        self.grace_s = grace_s
        self._timer: threading.Timer | None = None

    async def ready(self) -> bool:
        """KServe's server readiness (REST ``/v2/health/ready``, gRPC ``ServerReady``)."""
        return self.pipeline.ready

    def begin(self) -> None:
        """Not ready from now on; what still runs after ``grace_s`` is cancelled."""
        if self._timer is not None:
            return
        self.pipeline.start_drain()
        for model in self.models:
            model.ready = False
        self._timer = threading.Timer(self.grace_s, self.pipeline.cancel)
        self._timer.daemon = True
        self._timer.start()
        print(f"fam serve: draining, grace {self.grace_s:g} s", file=sys.stderr, flush=True)

    def watch_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for number in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(number)

            def handler(signum: int, frame: Any, previous: Any = previous) -> None:
                self.begin()
                if callable(previous):
                    previous(signum, frame)

            signal.signal(number, handler)


def serve(
    registry: ModelRegistry,
    *,
    http_port: int = 8080,
    grpc_port: int = 8081,
    limits: Limits | None = None,
    batching: BatchingConfig | None = None,
    workers: int = 32,
    grace_s: float = 30.0,
) -> None:
    """Serve the models of ``registry`` with ``kserve.ModelServer`` until SIGTERM/SIGINT.

    KServe listens on every interface (``0.0.0.0`` and ``[::]``), as a pod needs. ``workers``
    threads run pipeline calls; concurrent requests are micro-batched per model, in cost lanes
    (``batching``). SIGTERM drains (:class:`Drain`) with ``grace_s`` seconds of grace.
    """
    limits = limits or Limits()
    pipeline = Pipeline(registry, limits, batching or BatchingConfig())
    models = [FamKServeModel(name, pipeline) for name in registry.names()]
    for model in models:
        model.load()
    # a model that failed to load: not ready, and its requests answer 503 with the reason (as
    # fam serve's do), not 404 as an unknown name would (start() registers ready models only)
    failed = [FamKServeModel(model.name, pipeline) for model in registry.failed()]
    # KServe's gRPC server takes its message limits from the options it parsed at import
    # (8 MiB by default): fit them to the request limit, as fam serve does
    options = kserve.model_server.args
    options.grpc_max_receive_message_length = limits.max_request_bytes + BODY_OVERHEAD
    options.grpc_max_send_message_length = limits.max_request_bytes + BODY_OVERHEAD
    from prometheus_client import REGISTRY

    from fam_core.server.metrics import lane_gauges, watch_lanes

    watch_lanes(pipeline, *lane_gauges(REGISTRY))  # KServe's /metrics serves this registry
    drain = Drain(pipeline, models, grace_s)
    app = kserve.model_server.app
    app.router.on_startup.append(drain.watch_signals)
    app.add_exception_handler(RequestError, request_error_response)
    app.middleware("http")(_limit_body(4 * limits.max_request_bytes // 3 + BODY_OVERHEAD))
    app.middleware("http")(_answer_not_ready({f.name: f.reason for f in registry.failed()}))
    server = kserve.ModelServer(
        http_port=http_port,
        grpc_port=grpc_port,
        workers=1,
        max_asyncio_workers=workers,
        enable_latency_logging=False,
        grace_period=math.ceil(grace_s + 1.0),  # uvicorn's wait: the cancelled answer too
    )
    server.dataplane.ready = drain.ready
    for model in failed:
        server.register_model(model)
    try:
        server.start(models)
    finally:
        pipeline.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fam_core.server.kserve_model [--http-port 8080] [--grpc-port 8081]
    [--model NAME_OR_CONFIG ...] [--models DIR]``; ``fam serve --engine kserve`` has every
    option."""
    parser = argparse.ArgumentParser(prog="python -m fam_core.server.kserve_model")
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--grpc-port", type=int, default=8081)
    parser.add_argument("--models", help="folder of */config.yaml and *.onnx")
    parser.add_argument("--model", action="append", default=[], metavar="CONFIG")
    args = parser.parse_args(argv)
    registry = load_registry(args.models, args.model)
    for failed in registry.failed():
        print(f"fam kserve: model {failed.name!r} is not ready: {failed.reason}", flush=True)
    serve(registry, http_port=args.http_port, grpc_port=args.grpc_port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
