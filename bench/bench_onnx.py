"""onnxruntime FAM graph vs torch eager FAM, and the heatmap's cost inside the graph.

ResNet18 (embedding model, global average pooling) at 224x224, K = 5 references, CPU.

1. onnxruntime time of the exported FAM graph (embedding + scores + heatmap + weights) over
   torch eager time of ``fam_core.FAM`` on the same model and inputs. Target: <= 0.8 at batch 1.
   Reported for the bare ``InferenceSession.run`` and for ``fam_core.graphs.onnx_runtime.OnnxExplainer``
   (input validation and conversion to an ``Explanation`` included).
2. The graph with the heatmap outputs over the same graph exported with ``heatmap=False``
   (embedding and scores only). Target: <= 1.05.

Both sides run in this process, interleaved (``bench/common.py: ratio``), with the same
number of threads for torch and onnxruntime.

Run: .venv/bin/python bench/bench_onnx.py [--repeats N] [--batches 1 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ratio  # noqa: E402

from fam_core.explainers.fam.fam import FAM  # noqa: E402
from fam_core.exporters import OPSET, export_model  # noqa: E402
from fam_core.graphs.onnx_runtime import OnnxExplainer  # noqa: E402
from fam_core.models.backbones import resnet18  # noqa: E402


def session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads for torch and onnxruntime alike (default 1: on a shared, oversubscribed "
        "machine torch's OpenMP threads slow down far more than onnxruntime's)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    threads = args.threads
    model = resnet18().eval()
    explainer = FAM(model, target_layer="layer4")
    folder = Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    with_map = export_model(
        model, method="fam", path=folder / "fam.onnx", target_layer="layer4", input_size=224
    )
    without_map = export_model(
        model,
        method="fam",
        path=folder / "fam_nomap.onnx",
        target_layer="layer4",
        input_size=224,
        heatmap=False,
    )
    full, bare = session(with_map, threads), session(without_map, threads)
    runner = OnnxExplainer(with_map, providers=["CPUExecutionProvider"])
    runner.session = full  # same thread settings as the bare session
    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, opset {OPSET}, "
        f"{threads} threads, CPU"
    )
    print(
        "| batch | torch FAM (ms) | ORT graph (ms) | ORT / torch | OnnxExplainer / torch "
        "| ORT with heatmap (ms) | ORT without (ms) | with / without heatmap |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        images = torch.rand(batch, 3, 224, 224)
        references = explainer.embed(torch.rand(5, 3, 224, 224))
        feeds = {"image": images.numpy(), "references": references.numpy()}

        def eager(images: torch.Tensor = images, references: torch.Tensor = references) -> None:
            explainer(images, target=references)

        def graph(feeds: dict = feeds) -> None:
            full.run(None, feeds)

        def graph_without_map(feeds: dict = feeds) -> None:
            bare.run(None, feeds)

        def wrapped(images: torch.Tensor = images, references: torch.Tensor = references) -> None:
            runner(images, references=references)

        repeats = args.repeats if batch < 8 else max(5, args.repeats // 3)
        ort_ratio, ort_seconds, torch_seconds = ratio(graph, eager, repeats=repeats)
        wrapper_ratio, _, _ = ratio(wrapped, eager, repeats=repeats)
        map_ratio, map_seconds, bare_seconds = ratio(graph, graph_without_map, repeats=repeats)
        print(
            f"| {batch} | {1000 * torch_seconds:.1f} | {1000 * ort_seconds:.1f} | "
            f"{ort_ratio:.3f} | {wrapper_ratio:.3f} | {1000 * map_seconds:.1f} | "
            f"{1000 * bare_seconds:.1f} | {map_ratio:.3f} |"
        )


if __name__ == "__main__":
    main()
