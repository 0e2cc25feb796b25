"""The README's first command: start the server, send one request, print, save the overlay, stop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from fam_core.data.flowers import CLASS_NAMES, SPLITS, make_flowers
from fam_core.pipeline import ModelRegistry
from fam_core.pipeline.encode import heatmap_from_bytes
from fam_core.render import (
    explanation_title,
    overlay_figure,
    save_png,
    score_names,
    to_png_bytes,
)
from fam_core.server.app import FamServer, ServerConfig
from fam_core.server.stubs import fam_pb2, fam_pb2_grpc

DEMO_SEED = 700


@dataclass(frozen=True)
class ServeDemoResult:
    label: str
    score: float
    heatmap_shape: tuple[int, ...]
    overlay: Path


def run_serve_demo(
    out: Path, *, model: str = "default-classifier", registry: ModelRegistry | None = None
) -> ServeDemoResult:
    """Serve the default models on a free loopback port, explain one benchmark image through
    the generated ``fam.v1`` client, print the prediction, stop; write the returned heatmap
    over the image as ``fam explain`` does (a figure with a colour bar, and a title with the
    label, the method and both scores named as in :func:`fam_core.render.score_names`)."""
    out.mkdir(parents=True, exist_ok=True)
    sample = make_flowers([SPLITS["novel"][0]], 1, seed=DEMO_SEED)
    image = to_png_bytes((sample.images[0].permute(1, 2, 0) * 255).round().byte())
    registry = registry or ModelRegistry.from_names()
    config = registry.get(model).config
    server = FamServer(registry, ServerConfig(port=0))
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = fam_pb2_grpc.FamServiceStub(channel)
            response = stub.Explain(
                fam_pb2.ExplainRequest(model=model, images=[fam_pb2.Image(encoded=image)]),
                timeout=60,
            )
    finally:
        server.stop(grace=5.0)
    result = response.results[0]
    heatmap = heatmap_from_bytes(result.heatmap.data, tuple(result.heatmap.shape))
    title = explanation_title(
        f"benchmark image ({CLASS_NAMES[int(sample.labels[0])]})",
        result.prediction.label,
        result.heatmap.method,
        result.prediction.score,
        result.explained_score,
        task=config.task,
        similarity=config.similarity,
    )
    overlay = save_png(
        overlay_figure(sample.images[0], heatmap.float(), title=title),
        out / "serve_demo_overlay.png",
    )
    print(f"server on 127.0.0.1:{port}, model {response.model}")
    print(f"true class:  {CLASS_NAMES[int(sample.labels[0])]}")
    first, second = score_names(config.task, config.similarity)
    print(
        f"prediction:  {result.prediction.label} ({first} {result.prediction.score:.4f}, "
        f"{second} {result.explained_score:.3f})"
    )
    print(
        f"heatmap:     {result.heatmap.method} at {result.heatmap.target_layer}, "
        f"{'x'.join(map(str, heatmap.shape))} float16, peak at "
        f"{divmod(int(heatmap.argmax()), heatmap.shape[1])}"
    )
    print(f"overlay:     {overlay}")
    return ServeDemoResult(
        result.prediction.label, result.prediction.score, tuple(heatmap.shape), overlay
    )
