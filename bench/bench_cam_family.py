"""CAM family vs torchcam and Captum: time over a plain forward, ResNet18 at 224x224.

Run: .venv/bin/python bench/bench_cam_family.py [--batches 1 32] [--repeats N]
     [--methods gradcam ...] [--perturbation-batch 1]

For each method and batch: our time / forward, the peer's time / forward and ours / peer,
each the median of per-round ratios with the two sides interleaved (bench/common.py).
Peers: torchcam 0.5 (extractor built once, as its docs use it, its hooks enabled only while it
runs so that they do not slow the other measurements) and Captum 0.9
(LayerGradCam, GuidedGradCam, LayerFeatureAblation with one group per channel; for LIFT-CAM
the authors' recipe: a hooked forward, then Captum's DeepLift on pooling + fc from zero maps).
Relevance-CAM has no peer: Captum's LayerLRP supports neither GlobalPool nor the residual sums.
Score-CAM and Ablation-CAM run ``N`` forwards per image (N = 512 channels), so they run at
``--perturbation-batch`` images (default 1) with fewer repeats. Targets: the predicted class.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from captum.attr import DeepLift, GuidedGradCam, LayerFeatureAblation, LayerGradCam
from torch import nn
from torchcam import methods as torchcam

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import time_once  # noqa: E402

from fam_core.explainers.cam.ablationcam import AblationCAM  # noqa: E402
from fam_core.explainers.cam.activation import UpsampledActivation  # noqa: E402
from fam_core.explainers.cam.cam import CAM  # noqa: E402
from fam_core.explainers.cam.eigencam import EigenCAM  # noqa: E402
from fam_core.explainers.cam.gradcam import GradCAM  # noqa: E402
from fam_core.explainers.cam.gradcam_pp import GradCAMPlusPlus  # noqa: E402
from fam_core.explainers.cam.guided_gradcam import GuidedGradCAM  # noqa: E402
from fam_core.explainers.cam.layercam import LayerCAM  # noqa: E402
from fam_core.explainers.cam.liftcam import LiftCAM  # noqa: E402
from fam_core.explainers.cam.relevancecam import RelevanceCAM  # noqa: E402
from fam_core.explainers.cam.scorecam import ScoreCAM  # noqa: E402
from fam_core.explainers.cam.xgradcam import XGradCAM  # noqa: E402
from fam_core.models.backbones import resnet18  # noqa: E402

LAYER = "layer4"
PERTURBATION = ("scorecam", "ablationcam")
EXTRACTORS: list[torchcam.core._CAM] = []  # removed after each method


def torchcam_runner(extractor: torchcam.core._CAM, model, images, classes) -> Callable[[], object]:  # noqa: ANN001
    def run() -> object:
        extractor.enable_hooks()
        try:
            scores = model(images)
            return extractor(class_idx=classes, scores=scores)
        finally:
            extractor.disable_hooks()

    return run


def torchcam_scorecam(extractor, model, images, classes) -> Callable[[], object]:  # noqa: ANN001
    def run() -> object:
        extractor.enable_hooks()
        try:
            with torch.no_grad():
                model(images)
            return extractor(class_idx=classes)
        finally:
            extractor.disable_hooks()

    return run


def lift_cam_recipe(model, images, classes) -> Callable[[], object]:  # noqa: ANN001
    """LIFT-CAM as its authors run it: capture the layer, DeepLift on the part after it."""
    layer = model.get_submodule(LAYER)
    after = nn.Sequential(model.pool, model.embed, model.fc)

    def run() -> object:
        captured: list[torch.Tensor] = []
        handle = layer.register_forward_hook(lambda _m, _i, output: captured.append(output))
        try:
            with torch.no_grad():
                model(images)
        finally:
            handle.remove()
        maps = captured[0]
        contributions = DeepLift(after).attribute(
            maps.clone().requires_grad_(True), torch.zeros_like(maps), target=classes
        )
        weights = contributions.sum(dim=(2, 3))
        return F.relu((weights[:, :, None, None] * maps).sum(dim=1))

    return run


def interleaved(
    functions: dict[str, Callable[[], object]], *, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Per-round times of each function, the order rotating every round."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    names = list(functions)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_once(functions[name]))
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def peers(name: str, model, images, classes) -> list[tuple[str, Callable[[], object]]]:  # noqa: ANN001, C901
    layer = model.get_submodule(LAYER)
    found: list[tuple[str, Callable[[], object]]] = []
    if name in ("gradcam", "gradcam++", "xgradcam", "layercam", "cam"):
        kind = {
            "gradcam": torchcam.GradCAM,
            "gradcam++": torchcam.GradCAMpp,
            "xgradcam": torchcam.XGradCAM,
            "layercam": torchcam.LayerCAM,
            "cam": torchcam.CAM,
        }[name]
        extractor = kind(model, LAYER, fc_layer="fc") if name == "cam" else kind(model, LAYER)
        extractor.disable_hooks()
        EXTRACTORS.append(extractor)
        found.append(("torchcam", torchcam_runner(extractor, model, images, classes)))
    if name == "scorecam":
        extractor = torchcam.ScoreCAM(model, LAYER, batch_size=32)
        extractor.disable_hooks()
        EXTRACTORS.append(extractor)
        found.append(("torchcam", torchcam_scorecam(extractor, model, images, classes)))
    if name == "gradcam":
        gradcam = LayerGradCam(model, layer)
        found.append(
            ("captum", lambda: gradcam.attribute(images, target=classes, relu_attributions=True))
        )
    if name == "guided-gradcam":
        guided = GuidedGradCam(model, layer)
        found.append(
            (
                "captum",
                lambda: guided.attribute(images, target=classes, interpolate_mode="bilinear"),
            )
        )
    if name == "liftcam":
        found.append(("captum (authors' recipe)", lift_cam_recipe(model, images, classes)))
    if name == "ablationcam":
        ablation = LayerFeatureAblation(model, layer)
        mask = torch.arange(512).view(1, 512, 1, 1)
        found.append(
            (
                "captum",
                # one image per call: Captum does not spread per-image targets over
                # the perturbations it evaluates together
                lambda: [
                    ablation.attribute(
                        images[i : i + 1],
                        target=int(classes[i]),
                        layer_mask=mask,
                        perturbations_per_eval=32,
                    )
                    for i in range(len(images))
                ],
            )
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--perturbation-batch", type=int, default=1)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[
            "cam",
            "gradcam",
            "gradcam++",
            "xgradcam",
            "layercam",
            "guided-gradcam",
            "eigencam",
            "activation",
            "scorecam",
            "ablationcam",
            "relevancecam",
            "liftcam",
        ],
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Setting forward, backward hooks")
    torch.manual_seed(0)
    model = resnet18(num_classes=1000).eval()
    ours = {
        "cam": CAM(model, LAYER),
        "gradcam": GradCAM(model, LAYER),
        "gradcam++": GradCAMPlusPlus(model, LAYER),
        "xgradcam": XGradCAM(model, LAYER),
        "layercam": LayerCAM(model, LAYER),
        "guided-gradcam": GuidedGradCAM(model, LAYER),
        "eigencam": EigenCAM(model, LAYER),
        "activation": UpsampledActivation(model, LAYER),
        "scorecam": ScoreCAM(model, LAYER, batch_size=32),
        "ablationcam": AblationCAM(model, LAYER, batch_size=32),
        "relevancecam": RelevanceCAM(model, LAYER),
        "liftcam": LiftCAM(model, LAYER),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ResNet18 224x224")
    print("| method | batch | ours / forward | peer | peer / forward | ours / peer |")
    print("|---|---:|---:|---|---:|---:|")
    for batch in args.batches:
        for name in args.methods:
            size = min(batch, args.perturbation_batch) if name in PERTURBATION else batch
            if name in PERTURBATION and batch != args.batches[0]:
                continue
            images = torch.rand(size, 3, 224, 224)
            with torch.no_grad():
                classes = model(images).argmax(dim=1).tolist()

            def forward(images: torch.Tensor = images) -> None:
                with torch.no_grad():
                    model(images)

            def explain(name: str = name, images=images, classes=classes) -> None:  # noqa: ANN001
                ours[name](images, target=classes)

            repeats = max(3, args.repeats // 3) if name in PERTURBATION else args.repeats
            warmup = 0 if name in PERTURBATION else 1 if size >= 8 else 3
            found = peers(name, model, images, classes)
            functions = {"forward": forward, "ours": explain, **dict(found)}
            times = interleaved(functions, repeats=repeats, warmup=warmup)
            ours_ratio = median_ratio(times["ours"], times["forward"])
            if not found:
                print(f"| {name} | {size} | {ours_ratio:.2f} | - | - | - |", flush=True)
            for peer_name, _ in found:
                peer_ratio = median_ratio(times[peer_name], times["forward"])
                head_to_head = median_ratio(times["ours"], times[peer_name])
                print(
                    f"| {name} | {size} | {ours_ratio:.2f} | {peer_name} | {peer_ratio:.2f} "
                    f"| {head_to_head:.2f} |",
                    flush=True,
                )
            for extractor in EXTRACTORS:
                extractor.remove_hooks()
            EXTRACTORS.clear()


if __name__ == "__main__":
    main()
