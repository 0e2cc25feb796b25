"""The CAM family: parity with Captum and torchcam, hand computations, targets, hooks."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from captum.attr import GuidedGradCam, LayerFeatureAblation, LayerGradCam
from torch import nn
from torchcam import methods as torchcam

from fam_core.explainers.cam.ablationcam import AblationCAM
from fam_core.explainers.cam.activation import UpsampledActivation
from fam_core.explainers.cam.cam import CAM
from fam_core.explainers.cam.eigencam import EigenCAM
from fam_core.explainers.cam.gradcam import GradCAM
from fam_core.explainers.cam.gradcam_pp import GradCAMPlusPlus
from fam_core.explainers.cam.guided_gradcam import GuidedGradCAM
from fam_core.explainers.cam.layercam import LayerCAM
from fam_core.explainers.cam.liftcam import LiftCAM
from fam_core.explainers.cam.relevancecam import RelevanceCAM
from fam_core.explainers.cam.scorecam import ScoreCAM
from fam_core.explainers.cam.xgradcam import XGradCAM
from fam_core.explainers.fam import FAM
from fam_core.explainers.postprocess import min_max
from fam_core.explainers.registry import get_explainer
from fam_core.models.backbones import conv4

ALL_METHODS = [
    GradCAM,
    GradCAMPlusPlus,
    XGradCAM,
    LayerCAM,
    ScoreCAM,
    AblationCAM,
    EigenCAM,
    CAM,
    UpsampledActivation,
    GuidedGradCAM,
    RelevanceCAM,
    LiftCAM,
]
NAMES = {
    GradCAM: "gradcam",
    GradCAMPlusPlus: "gradcam++",
    XGradCAM: "xgradcam",
    LayerCAM: "layercam",
    ScoreCAM: "scorecam",
    AblationCAM: "ablationcam",
    EigenCAM: "eigencam",
    CAM: "cam",
    UpsampledActivation: "activation",
    GuidedGradCAM: "guided-gradcam",
    RelevanceCAM: "relevancecam",
    LiftCAM: "liftcam",
}
CLASSES = [3, 1]


@pytest.fixture(scope="module")
def relu_classifier() -> nn.Module:
    torch.manual_seed(1)
    return conv4(num_classes=5, width=0.25, activation="relu").eval()


def cosine_target(references: torch.Tensor):  # noqa: ANN201
    """A torchcam output target: mean cosine similarity to the references."""
    return lambda z: F.cosine_similarity(z.unsqueeze(0), references, dim=1).mean()


def torchcam_raw(extractor_class, model, layer, images, **call) -> torch.Tensor:  # noqa: ANN001
    with extractor_class(model, layer) as extractor:
        scores = model(images)
        return extractor(scores=scores, normalized=False, **call)[0]


def test_registered_names() -> None:
    for cls, name in NAMES.items():
        assert cls.method == name
        assert get_explainer(name) is cls


# -- Grad-CAM == Captum LayerGradCam (1e-5)
@pytest.mark.parametrize("layer", ["block4", "block3"])
def test_gradcam_equals_captum(classifier, images, layer) -> None:
    explanation = GradCAM(classifier, layer)(images, target=CLASSES)
    module = classifier.get_submodule(layer)
    captum = LayerGradCam(classifier, module).attribute(
        images, target=CLASSES, relu_attributions=True
    )
    torch.testing.assert_close(explanation.raw, captum[:, 0], atol=1e-5, rtol=1e-5)
    upsampled = F.interpolate(captum, size=(84, 84), mode="bilinear", align_corners=False)
    torch.testing.assert_close(
        explanation.maps, min_max(upsampled[:, 0], dim=(1, 2)), atol=1e-5, rtol=0
    )


def test_gradcam_predicted_class_is_argmax(classifier, images) -> None:
    predicted = classifier(images).argmax(dim=1).tolist()
    explainer = GradCAM(classifier, "block3")
    torch.testing.assert_close(explainer(images).raw, explainer(images, predicted).raw)


# -- torchcam parity (1e-4)
@pytest.mark.parametrize(
    ("ours", "theirs"), [(XGradCAM, torchcam.XGradCAM), (LayerCAM, torchcam.LayerCAM)]
)
@pytest.mark.parametrize("layer", ["block4", "block3"])
def test_equals_torchcam_on_classes(classifier, images, ours, theirs, layer) -> None:
    explanation = ours(classifier, layer)(images, target=CLASSES)
    expected = torchcam_raw(theirs, classifier, layer, images, class_idx=CLASSES)
    torch.testing.assert_close(explanation.raw, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(GradCAM, torchcam.GradCAM), (XGradCAM, torchcam.XGradCAM), (LayerCAM, torchcam.LayerCAM)],
)
def test_equals_torchcam_on_similarity_targets(embedder, images, references, ours, theirs) -> None:
    explanation = ours(embedder, "block3")(images, target=references)
    expected = torchcam_raw(theirs, embedder, "block3", images, targets=cosine_target(references))
    torch.testing.assert_close(explanation.raw, expected, atol=1e-4, rtol=1e-4)
    similarities = F.cosine_similarity(
        embedder(images).unsqueeze(1), references.unsqueeze(0), dim=2
    ).mean(dim=1)
    torch.testing.assert_close(explanation.scores, similarities.detach())


def test_gradcam_pp_equals_torchcam_where_formulas_agree(classifier, images) -> None:
    # block4 feeds GAP + linear: dy/dA is constant over each map, so Grad-CAM++'s
    # g^3 sum(A) equals torchcam's sum(A g^3); torchcam's SmoothGradCAMpp applies the
    # division (its GradCAMpp does not, see gradcam_pp.py), here with one noiseless sample.
    # torchcam adds 1e-8 to the denominator 2 g^2 + ..., which is not negligible for
    # gradients ~1e-3; logits scaled by 100 make it so.
    model = copy.deepcopy(classifier)
    with torch.no_grad():
        model.fc.weight.mul_(100)
    explanation = GradCAMPlusPlus(model, "block4")(images, target=CLASSES)
    with torchcam.SmoothGradCAMpp(model, "block4", num_samples=1, std=1e-12) as extractor:
        model(images)
        expected = extractor(class_idx=CLASSES, normalized=False)[0]
    torch.testing.assert_close(explanation.raw, expected, atol=1e-4, rtol=1e-4)


def test_gradcam_pp_by_hand(classifier, images) -> None:
    # block3: gradients vary over the map; Grad-CAM++ eq. 19 with alpha per location.
    features = classifier.block3(classifier.block2(classifier.block1(images))).detach()
    features.requires_grad_(True)
    logits = classifier.fc(classifier.pool(classifier.block4(features)))
    (grads,) = torch.autograd.grad(logits[[0, 1], CLASSES].sum(), features)
    batch, channels, height, width = features.shape
    expected_weights = torch.zeros(batch, channels)
    for b in range(batch):
        for n in range(channels):
            total = features[b, n].sum().item()
            for i in range(height):
                for j in range(width):
                    g = grads[b, n, i, j].item()
                    if g != 0:
                        alpha = g**2 / (2 * g**2 + g**3 * total)
                        expected_weights[b, n] += alpha * max(g, 0.0)
    explanation = GradCAMPlusPlus(classifier, "block3")(images, target=CLASSES)
    torch.testing.assert_close(explanation.weights, expected_weights, atol=1e-5, rtol=1e-4)
    expected_raw = F.relu(torch.einsum("bn,bnhw->bhw", expected_weights, features.detach()))
    torch.testing.assert_close(explanation.raw, expected_raw, atol=1e-5, rtol=1e-4)


def full_resolution_classifier() -> nn.Sequential:
    """A classifier whose target layer ("act") has the input's size: no upsampling."""
    torch.manual_seed(5)
    layers = OrderedDict(
        conv=nn.Conv2d(3, 6, 3, padding=1),
        act=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(),
        fc=nn.Linear(6, 4),
    )
    return nn.Sequential(layers).eval()


def test_scorecam_equals_torchcam() -> None:
    model = full_resolution_classifier()
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(6))
    explanation = ScoreCAM(model, "act", batch_size=5, classifier=True)(images, target=[2, 0])
    with torchcam.ScoreCAM(model, "act", batch_size=5) as extractor:
        with torch.no_grad():
            model(images)
        expected = extractor(class_idx=[2, 0], normalized=False)[0]
    torch.testing.assert_close(explanation.raw, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch_size", [5, 64])
def test_scorecam_eq7_by_hand(classifier, images, batch_size) -> None:
    # M_n = norm(up(A^n)) (min-max after upsampling, as the paper), w = softmax(F(X') - F(X))
    explanation = ScoreCAM(classifier, "block4", batch_size=batch_size)(images, target=CLASSES)
    with torch.no_grad():
        features = classifier.features(images)
        base = classifier(images)[[0, 1], CLASSES]
        for b, c in enumerate(CLASSES):
            increases = []
            for n in range(features.shape[1]):
                up = F.interpolate(features[b : b + 1, n : n + 1], size=(84, 84), mode="bilinear")
                low, high = up.min(), up.max()
                mask = (up - low) / (high - low) if high > low else torch.zeros_like(up)
                increases.append(classifier(images[b : b + 1] * mask)[0, c] - base[b])
            weights = torch.softmax(torch.stack(increases), dim=0)
            torch.testing.assert_close(explanation.weights[b], weights, atol=1e-5, rtol=1e-4)
            expected = F.relu(torch.einsum("n,nhw->hw", weights, features[b]))
            torch.testing.assert_close(explanation.raw[b], expected, atol=1e-5, rtol=1e-4)


# -- gradient-free methods by hand / against Captum
def test_ablationcam_score_drops_equal_captum(classifier, images) -> None:
    explanation = AblationCAM(classifier, "block4", batch_size=5)(images, target=CLASSES)
    channels = explanation.weights.shape[1]
    ablation = LayerFeatureAblation(classifier, classifier.block4)
    mask = torch.arange(channels).view(1, channels, 1, 1)
    drops = torch.cat(  # one image at a time: Captum does not expand list targets per batch
        [
            ablation.attribute(
                images[b : b + 1], target=c, layer_mask=mask, perturbations_per_eval=16
            )[:, :, 0, 0]
            for b, c in enumerate(CLASSES)
        ]
    )
    torch.testing.assert_close(explanation.extras["score_drop"], drops, atol=1e-5, rtol=1e-4)
    logits = classifier(images)[[0, 1], CLASSES].detach()
    torch.testing.assert_close(explanation.weights, drops / logits.unsqueeze(1))  # eq. 6


def test_ablationcam_head_shortcut_equals_full_forward(classifier, images, monkeypatch) -> None:
    fast = AblationCAM(classifier, "block4", batch_size=11)(images, target=CLASSES)
    monkeypatch.setattr(AblationCAM, "_head_if_exact", lambda self, forward, images: None)
    slow = AblationCAM(classifier, "block4", batch_size=11)(images, target=CLASSES)
    torch.testing.assert_close(fast.weights, slow.weights, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast.raw, slow.raw, atol=1e-5, rtol=1e-4)


def test_cam_is_the_classifier_weights(classifier, images) -> None:
    explanation = CAM(classifier, "block4")(images, target=CLASSES)
    features = classifier.features(images).detach()
    fc = classifier.fc.weight.detach()
    expected = torch.stack(
        [sum(fc[c, n] * features[b, n] for n in range(fc.shape[1])) for b, c in enumerate(CLASSES)]
    )
    torch.testing.assert_close(explanation.raw, expected, atol=1e-5, rtol=1e-5)  # eq. 1
    torch.testing.assert_close(explanation.weights, fc[CLASSES])


def test_cam_with_dot_references_on_a_projection(embedder, images, references) -> None:
    explanation = CAM(embedder, "block4", similarity="dot")(images, target=references)
    weights = references.mean(dim=0) @ embedder.embed.weight.detach()
    expected = torch.einsum("n,bnhw->bhw", weights, embedder.features(images).detach())
    torch.testing.assert_close(explanation.raw, expected, atol=1e-5, rtol=1e-5)


def test_cam_refuses_models_it_cannot_explain(images) -> None:
    with pytest.raises(ValueError, match="linear classifier"):
        CAM(conv4(width=0.25).eval(), "block4")(images)
    with pytest.raises(ValueError, match="global average pooling"):
        CAM(conv4(num_classes=5, width=0.25, pooling="max").eval(), "block4")(images, 0)
    with pytest.raises(ValueError, match="linear classifier"):
        CAM(conv4(num_classes=5, width=0.25).eval(), "block3")(images, 0)


def test_eigencam_is_the_first_principal_direction(classifier, images) -> None:
    explanation = EigenCAM(classifier, "block4")(images)
    features = classifier.features(images).detach()
    for b in range(2):
        matrix = features[b].flatten(1).T  # [h*w, N]
        vector = explanation.weights[b]
        largest = torch.linalg.eigvalsh(matrix.T @ matrix)[-1]
        torch.testing.assert_close(
            matrix.T @ matrix @ vector, largest * vector, atol=1e-3, rtol=1e-4
        )
        assert vector.sum() >= 0
        torch.testing.assert_close(explanation.raw[b], (matrix @ vector).view(5, 5))


def test_upsampled_activation_is_the_channel_mean(classifier, images) -> None:
    explanation = UpsampledActivation(classifier, "block4")(images, target=CLASSES)
    torch.testing.assert_close(explanation.raw, classifier.features(images).detach().mean(dim=1))


def test_guided_gradcam_equals_captum(relu_classifier, images) -> None:
    explanation = GuidedGradCAM(relu_classifier, "block4")(images, target=CLASSES)
    expected = GuidedGradCam(relu_classifier, relu_classifier.block4).attribute(
        images, target=CLASSES, interpolate_mode="bilinear"
    )
    torch.testing.assert_close(explanation.extras["attributions"], expected, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(explanation.raw, expected.abs().amax(dim=1))
    assert explanation.maps.shape == (2, 84, 84)


# -- targets: None on an embedding model, bad targets, hooks
def test_self_target_explains_the_embedding_direction(embedder, images) -> None:
    # With no target the score is <z, r>/(|z| |r|) at r = z with |z| frozen: its gradient
    # is z / |z|^2, the gradient of the dot product with the reference z / |z|^2.
    z = embedder(images).detach()
    explanation = GradCAM(embedder, "block4")(images)
    as_dot = GradCAM(embedder, "block4", similarity="dot")(
        images, target=(z / z.norm(dim=1, keepdim=True).square()).unsqueeze(1)
    )
    torch.testing.assert_close(explanation.raw, as_dot.raw)
    torch.testing.assert_close(explanation.scores, torch.ones(2))
    assert explanation.raw.abs().sum() > 0


@pytest.mark.parametrize("method", [GradCAM, GradCAMPlusPlus, XGradCAM, LayerCAM])
def test_self_target_with_the_dot_product_scores_the_squared_norm(method, embedder, images):
    """``s(z, z) = <z, z> = |z|^2`` as FAM reports it; the map is that of the reference
    ``z`` given explicitly (the dot product is not flat at ``r = z``)."""
    z = embedder(images).detach()
    itself = method(embedder, "block4", similarity="dot")(images)
    given = method(embedder, "block4", similarity="dot")(images, target=z.unsqueeze(1))
    torch.testing.assert_close(itself.scores, (z * z).sum(dim=1))
    torch.testing.assert_close(itself.raw, given.raw)
    fam = FAM(embedder, "block4", similarity="dot")(images)
    torch.testing.assert_close(itself.scores, fam.scores)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_bad_targets_raise_clear_errors(method, classifier, embedder, images) -> None:
    with pytest.raises(ValueError, match="out of range"):
        method(classifier, "block4")(images, target=5)
    with pytest.raises(ValueError, match="dimension 7"):
        method(embedder, "block4")(images, target=torch.rand(2, 7))
    with pytest.raises(TypeError, match="classifier"):
        method(embedder, "block4")(images, target=1)


def test_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        ScoreCAM(conv4(width=0.25), "block4", batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        AblationCAM(conv4(width=0.25), "block4", batch_size=2.5)


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


@pytest.mark.parametrize("method", ALL_METHODS)
def test_hooks_are_removed_and_maps_normalised(method, classifier, images) -> None:
    before = hook_count(classifier)
    explanation = method(classifier, "block4")(images, target=CLASSES)
    assert hook_count(classifier) == before
    with pytest.raises(ValueError):
        method(classifier, "block4")(images, target=99)
    assert hook_count(classifier) == before
    assert explanation.maps.shape == (2, 84, 84)
    assert explanation.maps.min() >= 0 and explanation.maps.max() <= 1
    assert explanation.method == NAMES[method]
    torch.testing.assert_close(explanation.scores, classifier(images)[[0, 1], CLASSES].detach())


@pytest.mark.parametrize("method", ALL_METHODS)
def test_batch_items_are_independent(method, classifier, images) -> None:
    together = method(classifier, "block4")(images, target=CLASSES)
    alone = method(classifier, "block4")(images[1:], target=CLASSES[1])
    torch.testing.assert_close(together.raw[1:], alone.raw, atol=1e-5, rtol=1e-4)


class InplaceHead(nn.Module):
    """conv -> ReLU(inplace) -> global average pool -> linear: Grad-CAM by hand is easy."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(images)).mean(dim=(2, 3)))


def test_gradcam_by_hand_when_an_inplace_op_follows_the_layer() -> None:
    model, images = InplaceHead().eval(), torch.rand(2, 3, 16, 16)
    explanation = GradCAM(model, "conv", classifier=True)(images, target=[0, 2])
    activations = model.conv(images).detach()  # before the in-place ReLU
    _, _, height, width = activations.shape
    alive = (activations > 0).float()
    weights = model.fc.weight[[0, 2]].detach()[:, :, None, None] * alive / (height * width)
    expected = F.relu((weights.mean(dim=(2, 3))[:, :, None, None] * activations).sum(dim=1))
    torch.testing.assert_close(explanation.raw, expected, atol=1e-6, rtol=1e-5)


def test_gradient_graph_starts_at_the_target_layer(classifier, images) -> None:
    recorded: dict[str, bool] = {}

    def record(name: str):  # noqa: ANN202
        return lambda *_: recorded.__setitem__(name, torch.is_grad_enabled())

    handles = [
        classifier.get_submodule(name).register_forward_hook(record(name))
        for name in ("block1", "block3", "fc")
    ]
    try:
        with torch.enable_grad():
            GradCAM(classifier, "block3")(images, target=CLASSES)
            assert torch.is_grad_enabled()  # the caller's mode is restored
        with torch.no_grad():
            GradCAM(classifier, "block3")(images, target=CLASSES)
            assert not torch.is_grad_enabled()
    finally:
        for handle in handles:
            handle.remove()
    assert recorded == {"block1": False, "block3": False, "fc": True}


def test_grad_mode_and_hooks_are_restored_when_the_model_fails_after_the_layer(
    classifier, images
) -> None:
    def fail(*_: object) -> None:
        raise RuntimeError("head failed")

    handle = classifier.get_submodule("fc").register_forward_hook(fail)
    before = hook_count(classifier)
    try:
        for grad_enabled in (False, True):
            with torch.set_grad_enabled(grad_enabled):
                with pytest.raises(RuntimeError, match="head failed"):
                    GradCAM(classifier, "block3")(images, target=CLASSES)
                assert torch.is_grad_enabled() is grad_enabled
            assert hook_count(classifier) == before
    finally:
        handle.remove()
