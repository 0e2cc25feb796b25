"""Models nobody here wrote: ResNet-50 and ViT-B/16 built from their ``transformers`` configs
(random weights, nothing downloaded), 224x224, batch 1 and 16.

Run: .venv/bin/python bench/bench_own_models.py [--repeats N] [--models resnet50 vit-b16]
Targets: FAM / forward <= 1.05, Grad-FAM / forward <= 1.10, ONNX graph with the
FAM head / the ONNX graph without it <= 1.05 (onnxruntime, same process, same inputs): the
head is grafted onto a plain ``torch.onnx.export`` file of each model (``graft_onnx``; the
ViT's head, its last block read through the class token, is interpreted in torch and grafted
through its per-sample Jacobian).

The explainers find the target layer and the head themselves (``target_layer=None``). The
ViT's embedding is its class token (``pooler_output``): its head is the last block, so FAM
maps its weights through that block's Jacobian. Only the class token's row of the block's
query, output projection and MLP reaches the output (:mod:`fam_core.anatomy.head_rows`), so the
explainer computes those rows alone, forward and backward, and the exported graph does too.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "helpers"))
from common import ratio  # noqa: E402
from hf_factories import reinit  # noqa: E402

from fam_core import FAM, GradFAM  # noqa: E402


def build(name: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    if name == "resnet50":
        return reinit(transformers.ResNetModel(transformers.ResNetConfig()))  # ResNet-50
    if name == "vit-b16":
        return transformers.ViTModel(transformers.ViTConfig()).eval()  # ViT-B/16 at 224
    raise ValueError(name)


def session_options():  # noqa: ANN201
    """Both sessions of a pair on the same threads, without spinning: two sessions whose
    idle threads spin would slow each other down in alternating rounds."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def onnx_pair(model: nn.Module, batch: int, folder: Path):  # noqa: ANN201
    """``(plain session, grafted session, feeds)`` for a plain export and its grafted FAM."""
    import onnxruntime

    from fam_core.exporters.graft import graft_onnx

    class Embedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.model(images).pooler_output.flatten(1)

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Embedding().eval(),
            (torch.rand(1, 3, 224, 224),),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["pixels"],
            dynamic_axes={"pixels": {0: "batch"}},
        )
    plain = folder / "plain.onnx"
    plain.write_bytes(buffer.getvalue())
    grafted = graft_onnx(plain, method="fam", task="embedding", input_size=(224, 224))
    options = session_options()
    providers = ["CPUExecutionProvider"]
    plain_session = onnxruntime.InferenceSession(str(plain), options, providers=providers)
    grafted_bytes = (
        grafted.SerializeToString()
        if hasattr(grafted, "SerializeToString")
        else Path(grafted).read_bytes()
    )
    grafted_session = onnxruntime.InferenceSession(grafted_bytes, options, providers=providers)
    images = torch.rand(batch, 3, 224, 224).numpy()
    config = model.config
    dimension = getattr(config, "hidden_size", None) or config.hidden_sizes[-1]
    references = torch.rand(5, dimension).numpy()
    return (
        lambda: plain_session.run(None, {"pixels": images}),
        lambda: grafted_session.run(None, {"image": images, "references": references}),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit-b16"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | batch | forward (ms) | FAM / forward | Grad-FAM / forward | ONNX FAM / ONNX |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        model = build(name)
        fam, gradfam = FAM(model, input_size=224), GradFAM(model, input_size=224)
        references = fam.embed(torch.rand(5, 3, 224, 224))
        for batch in args.batches:
            repeats = args.repeats if batch < 8 else max(5, args.repeats // 2)
            print(measure(name, model, fam, gradfam, references, batch, repeats), flush=True)
        print(f"{name}: target layer {fam.target_layer!r}", flush=True)


def measure(
    name: str,
    model: nn.Module,
    fam: FAM,
    gradfam: GradFAM,
    references: torch.Tensor,
    batch: int,
    repeats: int,
) -> str:
    """One table row: the three ratios at one batch size."""
    images = torch.rand(batch, 3, 224, 224)

    def forward() -> None:
        with torch.no_grad():
            model(images)

    fam_ratio, _, forward_seconds = ratio(
        lambda: fam(images, target=references), forward, repeats=repeats
    )
    grad_ratio, _, _ = ratio(lambda: gradfam(images, target=references), forward, repeats=repeats)
    with tempfile.TemporaryDirectory() as folder:
        plain, explained = onnx_pair(model, batch, Path(folder))
        onnx_ratio, _, _ = ratio(explained, plain, repeats=repeats)
    onnx_text = f"{onnx_ratio:.3f}"
    return (
        f"| {name} | {batch} | {1000 * forward_seconds:.1f} | {fam_ratio:.3f} | "
        f"{grad_ratio:.3f} | {onnx_text} |"
    )


if __name__ == "__main__":
    main()
