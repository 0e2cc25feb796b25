"""Render the documentation's example images with the project's own code.

Run from the repository root (about a minute on two CPU cores):

    python docs/make_images.py [--out docs/images]

Every picture comes from the default models (``model-store/``) explaining novel-class images
of the embedded benchmark (``fam_core.data.flowers``), drawn by ``fam_core.render``; the last
column of each grid is the ground-truth discriminative part; ``images/methods/`` holds one small
picture per registered method, one benchmark image each. The images are committed; run the
script again after a change to the explainers or the default models.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image

import fam_core
from fam_core.commands.demo import run_demo
from fam_core.data.flowers import CLASS_NAMES, SPLITS, make_flowers
from fam_core.explainers.relevant import RelevantFeatures, render_interpretation
from fam_core.render import grid, save_png

SEED = 0
QUERIES = 3  # images per figure
DPI = 60  # small PNGs


def _queries_and_references():
    """Novel-class queries and, for each, one support image of its class (a 1-shot episode)."""
    classes = list(SPLITS["novel"][:QUERIES])
    support = make_flowers(classes, 1, seed=SEED + 700)
    queries = make_flowers(classes, 1, seed=SEED + 700, start_index=1)
    return queries, support


def _save(rgb: torch.Tensor, path: Path) -> None:
    """Write a rendered figure as a 256-colour PNG (a few hundred kB less per picture)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(rgb, path)
    Image.open(path).quantize(256).save(path, optimize=True)
    print(f"wrote {path}")


def _figure(path: Path, images, maps: dict, masks, labels, title: str | None) -> None:
    columns = {**maps, "part (truth)": masks.float()}
    _save(grid(images, columns, row_labels=labels, title=title, dpi=DPI), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "images")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)

    with tempfile.TemporaryDirectory() as folder:  # fam demo's own summary page
        summary = run_demo(Path(folder), count=4, seed=SEED).summary
        Image.open(summary).quantize(256).save(out / "demo_summary.png", optimize=True)
        print(f"wrote {out / 'demo_summary.png'}")

    queries, support = _queries_and_references()
    labels = [CLASS_NAMES[c] for c in queries.labels.tolist()]
    embedder, emb_config = fam_core.load_model("default-embedding")
    classifier, clf_config = fam_core.load_model("default-classifier")
    emb_in = emb_config.normalize(queries.images)
    clf_in = clf_config.normalize(queries.images)
    layer = emb_config.target_layer

    # FAM: the embedding model against the 1-shot support image, and the classifier
    fam = fam_core.FAM(embedder, layer)
    refs = fam.embed(emb_config.normalize(support.images)).unsqueeze(1)  # [B, 1, D]
    fam_clf = fam_core.FAM(classifier, clf_config.target_layer)
    _figure(
        out / "fam.png",
        queries.images,
        {
            "FAM, embedding (1-shot)": fam(emb_in, target=refs).maps,
            "FAM, classifier": fam_clf(clf_in).maps,
        },
        queries.masks,
        labels,
        "FAM (Liao et al.)",
    )

    # Grad-FAM and Score-FAM on the embedding model, same references
    _figure(
        out / "gradfam_scorefam.png",
        queries.images,
        {
            "FAM": fam(emb_in, target=refs).maps,
            "Grad-FAM": fam_core.GradFAM(embedder, layer)(emb_in, target=refs).maps,
            "Score-FAM": fam_core.ScoreFAM(embedder, layer)(emb_in, target=refs).maps,
        },
        queries.masks,
        labels,
        "Grad-FAM and Score-FAM (Wu et al.)",
    )

    # L2-CAF: the embedding model (against a support image) and the classifier (its class)
    _figure(
        out / "l2caf.png",
        queries.images,
        {
            "L2-CAF, embedding (1-shot)": fam_core.L2CAF(embedder, layer)(emb_in, target=refs).maps,
            "L2-CAF, classifier": fam_core.L2CAF(classifier, clf_config.target_layer)(
                clf_in, target=fam_clf.embed(clf_in).argmax(1).tolist()
            ).maps,
        },
        queries.masks,
        labels,
        "L2-CAF (Taha et al.)",
    )

    # The CAM family on the classifier, predicted class
    clf_layer = clf_config.target_layer
    cam_methods = {
        "CAM": fam_core.CAM(classifier, clf_layer),
        "Grad-CAM": fam_core.GradCAM(classifier, clf_layer),
        "Grad-CAM++": fam_core.GradCAMPlusPlus(classifier, clf_layer),
        "LayerCAM": fam_core.LayerCAM(classifier, clf_layer),
        "Score-CAM": fam_core.ScoreCAM(classifier, clf_layer),
        "Eigen-CAM": fam_core.EigenCAM(classifier, clf_layer),
        "Guided Grad-CAM": fam_core.GuidedGradCAM(classifier, clf_layer),
        "Relevance-CAM": fam_core.RelevanceCAM(classifier, clf_layer),
        "LIFT-CAM": fam_core.LiftCAM(classifier, clf_layer),
    }
    _figure(
        out / "cam_family.png",
        queries.images,
        {name: explainer(clf_in).maps for name, explainer in cam_methods.items()},
        queries.masks,
        labels,
        "The CAM family on default-classifier",
    )

    # Guided backprop and deconvnet with and without the stride fix, relevant features
    train = make_flowers(range(len(CLASS_NAMES)), 4, seed=SEED + 800)
    relevant = RelevantFeatures(classifier).fit(
        clf_config.normalize(train.images), train.labels, mu=10
    )
    _figure(
        out / "relevant.png",
        queries.images,
        {
            "deconvnet": fam_core.Deconvnet(classifier)(clf_in).maps,
            "deconvnet, stride fix": fam_core.Deconvnet(classifier, stride_fix=True)(clf_in).maps,
            "guided backprop, stride fix": fam_core.GuidedBackprop(classifier, stride_fix=True)(
                clf_in
            ).maps,
            "relevant features": relevant(clf_in).maps,
        },
        queries.masks,
        labels,
        "Visual explanation by interpretation (Oramas et al.)",
    )
    interpretation = relevant.interpret(
        clf_config.normalize(train.images),
        top_n=20,
        features=sorted(relevant.relevant_features(int(queries.labels[0])), key=lambda f: -f[2])[
            :3
        ],
        display_images=train.images,
    )
    _save(
        render_interpretation(interpretation, shown=4, dpi=DPI), out / "relevant_interpretation.png"
    )

    # One small picture per method (docs/methods/<family>/<method>.md): the first query only,
    # the same models, layers and targets as the family figures above
    one = slice(0, 1)
    emb_one, clf_one, refs_one = emb_in[one], clf_in[one], refs[one]

    def cam(title: str, method: type) -> tuple[str, torch.Tensor]:
        return title, method(classifier, clf_layer)(clf_one).maps

    def fam_variant(title: str, method: type) -> tuple[str, torch.Tensor]:
        return title, method(embedder, layer)(emb_one, target=refs_one).maps

    per_method = {
        "fam": ("FAM, embedding (1-shot)", fam(emb_one, target=refs_one).maps),
        "gradfam": fam_variant("Grad-FAM", fam_core.GradFAM),
        "scorefam": fam_variant("Score-FAM", fam_core.ScoreFAM),
        "l2caf": fam_variant("L2-CAF, embedding (1-shot)", fam_core.L2CAF),
        "cam": cam("CAM", fam_core.CAM),
        "gradcam": cam("Grad-CAM", fam_core.GradCAM),
        "gradcam++": cam("Grad-CAM++", fam_core.GradCAMPlusPlus),
        "xgradcam": cam("XGrad-CAM", fam_core.XGradCAM),
        "layercam": cam("LayerCAM", fam_core.LayerCAM),
        "scorecam": cam("Score-CAM", fam_core.ScoreCAM),
        "ablationcam": cam("Ablation-CAM", fam_core.AblationCAM),
        "eigencam": cam("Eigen-CAM", fam_core.EigenCAM),
        "guided-gradcam": cam("Guided Grad-CAM", fam_core.GuidedGradCAM),
        "relevancecam": cam("Relevance-CAM", fam_core.RelevanceCAM),
        "liftcam": cam("LIFT-CAM", fam_core.LiftCAM),
        "activation": cam("upsampled activation", fam_core.UpsampledActivation),
        "guided-backprop": (
            "guided backprop, stride fix",
            fam_core.GuidedBackprop(classifier, stride_fix=True)(clf_one).maps,
        ),
        "deconvnet": (
            "deconvnet, stride fix",
            fam_core.Deconvnet(classifier, stride_fix=True)(clf_one).maps,
        ),
        "relevant-features": ("relevant features", relevant(clf_one).maps),
    }
    for name, (column, maps) in per_method.items():
        _figure(
            out / "methods" / f"{name.replace('++', 'pp')}.png",
            queries.images[one],
            {column: maps},
            queries.masks[one],
            labels[:1],
            None,
        )


if __name__ == "__main__":
    main()
