"""What grafting costs on ONNX files as real exporters write them: the grafted graph against
the original file under onnxruntime (CPU), batch 1 and 16, median of alternating rounds in
one process (``common.ratio``).

Run: .venv/bin/python bench/bench_graft_cost.py [--repeats N] [--threads T] [--models ppocr-cls ...]
Target: grafted / original <= 1.05 for every model and method.
Each graft is measured as it is served for both resolutions a request can ask: ``input``,
the grafted graph with its input-size ``heatmap``; ``feature``, the same graph less that
output and the nodes only it needs (upsampling, min-max over the full map): the session
``OnnxExplainer`` runs for a feature-resolution request (onnxruntime runs every node of a
session whatever outputs a run asks for).

Models (from the tests' zoo, ``tests/helpers/onnx_zoo.py``): PaddleOCR's text-orientation classifier
shipped in ``rapidocr-onnxruntime`` (opset 11, ``-1`` batch, Constant-node weights, a Softmax
output; 48 x 192), the Keras emotion classifier of ``fer`` converted by tf2onnx (NHWC,
greyscale, 64 x 64; needs ``bash scripts/build_onnx_zoo.sh``), the zoo's own classifier (a
small CNN, 48/96/192 channels, 32 x 32) at opset 17 and its static QDQ int8 form. Each is grafted with CAM and with Grad-CAM as a served
``onnx:`` config grafts it (``class_input=False``: top-1).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests" / "helpers"))
from common import ratio  # noqa: E402
from onnx_zoo import Zoo  # noqa: E402

from fam_core.exporters.graft import graft_onnx  # noqa: E402
from fam_core.exporters.onnx_load import fixed_batch  # noqa: E402

DEFAULT_MODELS = ("ppocr-cls", "fer-keras", "opset17", "qdq-int8")


def session(source: bytes | str, threads: int):  # noqa: ANN201
    """A CPU session on ``threads`` threads that does not spin between runs: two sessions
    whose idle threads spin would slow each other down in alternating rounds."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def without_heatmap(grafted: onnx.ModelProto) -> onnx.ModelProto:
    """``grafted`` without its ``heatmap`` output and the nodes that only it reads: the
    graph ``OnnxExplainer`` runs for a feature-resolution request."""
    from fam_core.exporters.onnx_graph import drop_output
    from fam_core.graphs import onnx_format as fmt

    return drop_output(grafted, fmt.OUTPUT_HEATMAP)


def upsampled_only(grafted: onnx.ModelProto) -> onnx.ModelProto:
    """``grafted`` whose ``heatmap`` is the upsampled map before its min-max (the tensor its
    ``ReduceMin`` reads): a diagnostic stage between ``feature`` and ``input``."""
    from fam_core.exporters.onnx_graph import prune_graph
    from fam_core.graphs import onnx_format as fmt

    upsampled = next(node.input[0] for node in grafted.graph.node if node.op_type == "ReduceMin")
    for output in grafted.graph.output:
        if output.name == fmt.OUTPUT_HEATMAP:
            output.name = upsampled
    prune_graph(grafted.graph)
    return grafted


def pair(model, method: str, batch: int, threads: int, resolution: str = "input"):  # noqa: ANN001, ANN201
    """``(grafted run, original run)`` on the same images, the graph served for a request
    at ``resolution``."""
    channels = model.channels
    grafted = graft_onnx(
        model.path,
        method=method,
        task="classifier",
        input_size=model.input_size,
        mean=(0.0,) * channels,
        std=(1 / 255 if model.input_dtype == "uint8" else 1.0,) * channels,  # 0-255 pixels
    )
    if resolution == "feature":
        grafted = without_heatmap(grafted)  # type: ignore[arg-type]
    elif resolution == "upsampled":
        grafted = upsampled_only(grafted)  # type: ignore[arg-type]
    images = np.random.default_rng(0).random((batch, 3, *model.input_size), dtype=np.float32)
    original = session(str(model.path), threads)
    feeds = {original.get_inputs()[0].name: model.model_input(images)}
    explained = session(grafted.SerializeToString(), threads)  # type: ignore[union-attr]
    pixels = images[:, :channels] * (255.0 if model.input_dtype == "uint8" else 1.0)
    explained_feeds = {"image": np.ascontiguousarray(pixels)}
    return (
        lambda: explained.run(None, explained_feeds),
        lambda: original.run(None, feeds),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--methods", nargs="+", default=["cam", "gradcam"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--resolutions",
        nargs="+",
        choices=["input", "upsampled", "feature"],
        default=["input", "feature"],
    )
    args = parser.parse_args()
    import onnxruntime

    print(f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} threads")
    print(
        "| model | method | batch | resolution | original (ms) | grafted / original "
        "| quartiles of the rounds |"
    )
    print("|---|---|---:|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        zoo = Zoo(Path(folder))
        for name in args.models:
            model = zoo[name]
            fixed = fixed_batch(onnx.load(str(model.path), load_external_data=False).graph.input[0])
            # a graph that fixes its batch (a positive extent) runs that batch only
            batches = [b for b in args.batches if fixed is None or fixed <= 0 or b == fixed]
            for method in args.methods:
                for batch in batches:
                    for resolution in args.resolutions:
                        explained, original = pair(model, method, batch, args.threads, resolution)
                        rounds: list[float] = []
                        value, _, seconds = ratio(
                            explained, original, repeats=args.repeats, rounds=rounds
                        )
                        low, high = np.percentile(rounds, [25, 75])
                        print(
                            f"| {name} | {method} | {batch} | {resolution} "
                            f"| {1000 * seconds:.2f} | {value:.3f} | {low:.3f}-{high:.3f} |",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
