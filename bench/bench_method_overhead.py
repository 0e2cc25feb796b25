"""Explanation time of Grad-FAM, Score-FAM and L2-CAF over the forward passes they need.

Every figure is a ratio in one process.

Run: .venv/bin/python bench/bench_method_overhead.py [gradfam] [scorefam] [l2caf] [--repeats N]

- gradfam: Grad-FAM (analytic path) over a plain forward, ResNet18 at 224x224, batch 1 / 32.
  Target <= 1.1.
- scorefam: Score-FAM exact over its masked forward passes alone (target <= 1.1) and over
  torchcam's ScoreCAM on the same model (target <= 1.0); top_k=64 speed-up over exact
  (target >= 6) and Spearman rank correlation of its maps to the exact maps on benchmark
  flower images (target >= 0.9).
- l2caf: L2-CAF fast mode, seconds per image for 1000 iterations on the default embedding
  model (Conv4 random init if the store has none), batch 1 and 16, over one forward.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import explain_over_forward, ratio  # noqa: E402

from fam_core.explainers.fam.gradfam import GradFAM  # noqa: E402
from fam_core.models.backbones import resnet18  # noqa: E402


def bench_gradfam(repeats: int) -> None:
    torch.manual_seed(0)
    model = resnet18().eval()
    explainer = GradFAM(model, target_layer="layer4")
    assert explainer.analytic
    print("\n## Grad-FAM analytic path vs plain forward (ResNet18, 224x224)")
    print("| batch | forward (ms) | Grad-FAM (ms) | Grad-FAM / forward |")
    print("|---:|---:|---:|---:|")
    for batch in (1, 32):
        value, candidate, baseline = explain_over_forward(model, explainer, batch, repeats)
        print(f"| {batch} | {1000 * baseline:.1f} | {1000 * candidate:.1f} | {value:.3f} |")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two flattened maps (average ranks for ties)."""

    def ranks(values: torch.Tensor) -> torch.Tensor:
        values = values.flatten().double()
        order = values.argsort()
        sorted_values = values[order]
        position = torch.arange(1, values.numel() + 1, dtype=torch.float64)
        unique, inverse = sorted_values.unique_consecutive(return_inverse=True)
        mean_rank = torch.zeros(unique.numel(), dtype=torch.float64).index_reduce_(
            0, inverse, position, "mean", include_self=False
        )
        result = torch.empty_like(values)
        result[order] = mean_rank[inverse]
        return result

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def bench_scorefam(repeats: int) -> None:
    from torchcam.methods import ScoreCAM

    from fam_core.data.flowers import make_flowers
    from fam_core.explainers.cam.cam_common import masked_inputs
    from fam_core.explainers.fam.scorefam import ScoreFAM

    torch.manual_seed(0)
    model = resnet18(num_classes=1000).eval()
    image = torch.rand(1, 3, 224, 224)
    batch_size = 32
    exact = ScoreFAM(model, "layer4", batch_size=batch_size)
    with torch.no_grad():
        target = int(model(image).argmax())
    # the floor: the masked inputs of all channels, prepared in advance, through the model
    activations = exact.forward(image).activations.detach()
    channels = torch.arange(activations.shape[1])
    masked = masked_inputs(image, activations, torch.zeros_like(channels), channels)

    def masked_passes() -> None:
        with torch.no_grad():
            for start in range(0, masked.shape[0], batch_size):
                model(masked[start : start + batch_size])

    def score_fam() -> None:
        exact(image, target=target)

    def torchcam_scorecam() -> None:
        extractor = ScoreCAM(model, "layer4", batch_size=batch_size, input_shape=(3, 224, 224))
        try:
            with torch.no_grad():
                scores = model(image)
            extractor(target, scores)
        finally:
            extractor.remove_hooks()

    reps = max(1, repeats // 5)  # each Score-FAM run is 512 ResNet18 passes
    print("\n## Score-FAM, ResNet18 (1000 classes), 224x224, one image, class target")
    print("| candidate | baseline | candidate (s) | baseline (s) | ratio |")
    print("|---|---|---:|---:|---:|")
    value, c, b = ratio(score_fam, masked_passes, repeats=reps, warmup=0)
    print(f"| Score-FAM exact | masked forward passes alone | {c:.2f} | {b:.2f} | {value:.3f} |")
    value, c, b = ratio(score_fam, torchcam_scorecam, repeats=reps, warmup=0)
    print(f"| Score-FAM exact | torchcam ScoreCAM | {c:.2f} | {b:.2f} | {value:.3f} |")
    for rest in ("baseline", "zero"):
        top = ScoreFAM(model, "layer4", batch_size=batch_size, top_k=64, top_k_rest=rest)
        value, c, b = ratio(
            lambda top=top: top(image, target=target), score_fam, repeats=reps, warmup=0
        )
        print(
            f"| Score-FAM top_k=64 ({rest}) | Score-FAM exact | {c:.2f} | {b:.2f} | "
            f"{value:.3f} (speed-up {1 / value:.1f}x) |"
        )

    # fidelity on benchmark data: ResNet18 embedding model, image explains itself
    flowers = make_flowers(list(range(3)), 1, image_size=224, seed=0)
    embedder = resnet18().eval()
    exact_maps = ScoreFAM(embedder, "layer4", batch_size=batch_size)(flowers.images).maps
    print("\n| top_k=64 rest | Spearman to exact (mean over 3 flower images) | min |")
    print("|---|---:|---:|")
    for rest in ("baseline", "zero"):
        top = ScoreFAM(embedder, "layer4", batch_size=batch_size, top_k=64, top_k_rest=rest)
        maps = top(flowers.images).maps
        values = [spearman(maps[i], exact_maps[i]) for i in range(len(maps))]
        print(f"| {rest} | {sum(values) / len(values):.3f} | {min(values):.3f} |")


def bench_l2caf(repeats: int) -> None:
    from fam_core.explainers.l2caf import L2CAF
    from fam_core.models.backbones import conv4

    torch.manual_seed(0)
    try:
        from fam_core import load_model

        model, config = load_model("default-embedding")
        size, name = config.input_size, "default-embedding"
        normalize = config.normalize
    except (OSError, ValueError, KeyError) as error:
        model, size, name = conv4().eval(), 84, f"conv4 random init ({error.__class__.__name__})"
        normalize = None
    print(f"\n## L2-CAF fast mode, 1000 iterations (no early stop), {name}, {size}x{size}")
    print("| batch | forward (ms) | L2-CAF per image (s) | L2-CAF / forward (same batch) |")
    print("|---:|---:|---:|---:|")
    explainer = L2CAF(model, "block4", iterations=1000, tolerance=0.0, fast=True)
    for batch in (1, 16):
        images = torch.rand(batch, 3, size, size)
        if normalize is not None:
            images = normalize(images)

        def forward(images: torch.Tensor = images) -> None:
            with torch.no_grad():
                model(images)

        def explain(images: torch.Tensor = images) -> None:
            explainer(images)

        value, c, b = ratio(explain, forward, repeats=3, warmup=1)
        print(f"| {batch} | {1000 * b:.2f} | {c / batch:.3f} | {value:.0f} |")


BENCHES = {"gradfam": bench_gradfam, "scorefam": bench_scorefam, "l2caf": bench_l2caf}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("which", nargs="*", default=list(BENCHES), choices=list(BENCHES))
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.which:
        started = time.perf_counter()
        BENCHES[name](args.repeats)
        print(f"({name}: {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
