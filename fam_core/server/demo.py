"""The README's first command: start the server, send one request, print, save the overlay, stop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from fam_core.data.flowers import CLASS_NAMES, SPLITS, make_flowers
from fam_core.pipeline import ModelRegistry
from fam_core.pipeline.encode import heatmap_from_bytes
from fam_core.render import to_png_bytes
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
    the generated ``fam.v1`` client, print the prediction, write the returned overlay, stop."""
    out.mkdir(parents=True, exist_ok=True)
    sample = make_flowers([SPLITS["novel"][0]], 1, seed=DEMO_SEED)
    image = to_png_bytes((sample.images[0].permute(1, 2, 0) * 255).round().byte())
    server = FamServer(registry or ModelRegistry.from_names(), ServerConfig(port=0))
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = fam_pb2_grpc.FamServiceStub(channel)
            response = stub.Explain(
                fam_pb2.ExplainRequest(
                    model=model, images=[fam_pb2.Image(encoded=image)], return_overlay=True
                ),
                timeout=60,
            )
    finally:
        server.stop(grace=5.0)
    result = response.results[0]
    heatmap = heatmap_from_bytes(result.heatmap.data, tuple(result.heatmap.shape))
    overlay = out / "serve_demo_overlay.png"
    overlay.write_bytes(result.overlay_png)
    print(f"server on 127.0.0.1:{port}, model {response.model}")
    print(f"true class:  {CLASS_NAMES[int(sample.labels[0])]}")
    print(f"prediction:  {result.prediction.label} (score {result.prediction.score:.3f})")
    print(
        f"heatmap:     {result.heatmap.method} at {result.heatmap.target_layer}, "
        f"{'x'.join(map(str, heatmap.shape))} float16, peak at "
        f"{divmod(int(heatmap.argmax()), heatmap.shape[1])}"
    )
    print(f"overlay:     {overlay}")
    return ServeDemoResult(
        result.prediction.label, result.prediction.score, tuple(heatmap.shape), overlay
    )
