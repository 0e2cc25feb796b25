"""Relevance-CAM and LIFT-CAM: hand computations, conservation, parity with Captum, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from captum.attr import DeepLift, LayerLRP
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule
from torch import nn

from fam_core.explainers.cam.cam import CAM
from fam_core.explainers.cam.liftcam import LiftCAM
from fam_core.explainers.cam.relevancecam import RelevanceCAM
from fam_core.explainers.postprocess import min_max
from fam_core.explainers.registry import get_explainer
from fam_core.models.backbones import conv4

CLASSES = [3, 1]


class PooledLinear(nn.Module):
    """``features`` (the target layer, the input itself) -> global average pool -> linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            if bias is not None:
                self.fc.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class BiasFreeReLUNet(nn.Module):
    """conv -> ReLU -> global average pool -> [linear ->] linear, no biases (Captum LRP
    runs on every module of it)."""

    def __init__(self, embed: bool = True) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, bias=False)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Linear(6, 5, bias=False) if embed else None
        self.fc = nn.Linear(5 if embed else 6, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.relu(self.conv(x))).flatten(1)
        return self.fc(pooled if self.embed is None else self.embed(pooled))


@pytest.fixture(scope="module")
def bias_free() -> nn.Module:
    return BiasFreeReLUNet().eval()


@pytest.fixture(scope="module")
def small_images() -> torch.Tensor:
    return torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(8))


def test_registered_by_name() -> None:
    assert get_explainer("relevancecam") is RelevanceCAM
    assert get_explainer("liftcam") is LiftCAM


# -- LIFT-CAM: the linear case has an exact answer
def test_liftcam_by_hand_on_pooling_and_a_linear_layer() -> None:
    # two channels of 2 x 2; class 0 has w = (2, -1), bias 5 (DeepLIFT's reference removes it)
    maps = torch.tensor([[[[1.0, 3.0], [0.0, 4.0]], [[2.0, 2.0], [6.0, 2.0]]]])
    model = PooledLinear(torch.tensor([[2.0, -1.0], [1.0, 1.0]]), torch.tensor([5.0, 0.0]))
    explanation = LiftCAM(model.eval(), "features", task="classifier")(maps, target=0)
    # C^n_ij = A^n_ij w_n / 4; a_n = w_n mean(A^n) = (2 * 2, -1 * 3) = (4, -3)   (eq. 10)
    expected_contributions = maps * torch.tensor([2.0, -1.0])[None, :, None, None] / 4
    torch.testing.assert_close(explanation.extras["contributions"], expected_contributions)
    torch.testing.assert_close(explanation.weights, torch.tensor([[4.0, -3.0]]))
    # L = ReLU(4 A^0 - 3 A^1) = ReLU([[4 - 6, 12 - 6], [0 - 18, 16 - 6]])
    torch.testing.assert_close(explanation.raw, torch.tensor([[[0.0, 6.0], [0.0, 10.0]]]))
    torch.testing.assert_close(explanation.scores, torch.tensor([2 * 2.0 - 3.0 + 5.0]))


def test_liftcam_contributions_with_a_zero_reference_are_cam(classifier, images) -> None:
    # GAP + linear: sum_n C^n = CAM / hw, so both normalise to the same map; the weights are
    # CAM's times the channel means
    lift = LiftCAM(classifier, "block4")(images, target=CLASSES)
    cam = CAM(classifier, "block4")(images, target=CLASSES)
    per_position = lift.extras["contributions"].sum(dim=1)
    torch.testing.assert_close(
        min_max(per_position, dim=(1, 2)), min_max(cam.raw, dim=(1, 2)), atol=1e-5, rtol=0
    )
    activations = classifier.block4(
        classifier.block3(classifier.block2(classifier.block1(images)))
    ).detach()
    torch.testing.assert_close(lift.weights, cam.weights * activations.mean(dim=(2, 3)))


def test_liftcam_equals_captum_deeplift_on_the_layers_after_the_target(images) -> None:
    # a nonlinear head (block4: conv, BN, ReLU, max pool), so the whole model runs; Captum's
    # DeepLift on an independently built copy of those layers, from zero maps, agrees
    torch.manual_seed(9)
    model = conv4(num_classes=5, width=0.25, activation="relu").eval()
    explanation = LiftCAM(model, "block3")(images, target=CLASSES)
    after = copy.deepcopy(nn.Sequential(model.block4, model.pool, model.embed, model.fc)).eval()
    maps = model.block3(model.block2(model.block1(images))).detach()
    expected = DeepLift(after).attribute(
        maps.clone().requires_grad_(True), torch.zeros_like(maps), target=CLASSES
    )
    torch.testing.assert_close(
        explanation.extras["contributions"], expected.detach(), atol=1e-5, rtol=1e-4
    )
    # summation to delta: sum_n a_n = y(A) - y(0)
    delta = model(images)[[0, 1], CLASSES] - after(torch.zeros_like(maps))[[0, 1], CLASSES]
    torch.testing.assert_close(explanation.weights.sum(dim=1), delta.detach(), atol=1e-4, rtol=1e-4)


def test_liftcam_on_similarity_targets(embedder, images, references) -> None:
    explanation = LiftCAM(embedder, "block4")(images, target=references)
    z = embedder(images).detach()
    cosine = F.cosine_similarity(z.unsqueeze(1), references.unsqueeze(0), dim=2).mean(dim=1)
    torch.testing.assert_close(explanation.scores, cosine)
    # the linear score <z, c> with |z| held: its contributions add up to <z - z(0), c>
    coefficients = (references / references.norm(dim=1, keepdim=True)).mean(dim=0)
    coefficients = coefficients / z.norm(dim=1, keepdim=True)
    z0 = embedder.embed(torch.zeros(1, embedder.feature_channels)).detach()
    torch.testing.assert_close(
        explanation.weights.sum(dim=1), ((z - z0) * coefficients).sum(dim=1), atol=1e-5, rtol=1e-4
    )


# -- Relevance-CAM: conservation and Captum's z+ rule
def test_relevance_is_conserved_to_the_target_layer(bias_free, small_images) -> None:
    explainer = RelevanceCAM(bias_free, "relu", contrastive=False)
    explanation = explainer(small_images, target=[0, 2])
    relevance = explanation.extras["relevance"]
    logits = bias_free(small_images)[[0, 1], [0, 2]].detach()
    torch.testing.assert_close(relevance.sum(dim=(1, 2, 3)), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explanation.weights, relevance.sum(dim=(2, 3)))
    # eq. 8: the target's logit against the mean of the others, which sums to zero
    contrastive = RelevanceCAM(bias_free, "relu")(small_images, target=[0, 2])
    torch.testing.assert_close(
        contrastive.extras["relevance"].sum(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_relevance_of_a_similarity_is_conserved(bias_free, small_images, similarity) -> None:
    explainer = RelevanceCAM(bias_free, "relu", similarity=similarity, task="embedding")
    references = torch.randn(3, 4, generator=torch.Generator().manual_seed(10))
    explanation = explainer(small_images, target=references)
    z = bias_free(small_images).detach()
    if similarity == "dot":
        expected = (z @ references.T).mean(dim=1)
    else:
        expected = F.cosine_similarity(z.unsqueeze(1), references.unsqueeze(0), dim=2).mean(dim=1)
    torch.testing.assert_close(explanation.scores, expected)
    relevance = explanation.extras["relevance"].sum(dim=(1, 2, 3))
    torch.testing.assert_close(relevance, expected, atol=1e-5, rtol=1e-5)


def test_relevancecam_equals_captum_layer_lrp_with_z_plus(small_images) -> None:
    # Captum's Alpha1_Beta0_Rule keeps w^+ whatever the sign of the input: the same rule as
    # eq. 9 on the non-negative inputs of a ReLU network's pooled layer
    bias_free = BiasFreeReLUNet(embed=False).eval()
    model = copy.deepcopy(bias_free)
    model.fc.rule = Alpha1_Beta0_Rule()  # z+ (eq. 9) on the layer after the pooling
    # the relevance at the ReLU's output is the relevance at the pooling's input
    expected = LayerLRP(model, model.pool).attribute(
        small_images.clone().requires_grad_(True), target=[1, 3], attribute_to_layer_input=True
    )
    explanation = RelevanceCAM(bias_free, "relu", contrastive=False)(small_images, target=[1, 3])
    torch.testing.assert_close(
        explanation.extras["relevance"], expected.detach(), atol=1e-5, rtol=1e-4
    )


def test_relevancecam_by_hand_on_pooling_and_a_linear_layer() -> None:
    maps = torch.tensor([[[[1.0, 3.0], [0.0, 4.0]], [[2.0, 2.0], [6.0, 2.0]]]])
    model = PooledLinear(torch.tensor([[2.0, -1.0], [1.0, 1.0]])).eval()
    explanation = RelevanceCAM(model, "features", task="classifier")(maps, target=0)
    # pooled z = (2, 3), logits (1, 5); eq. 8: R = (1, -1); z+ (eq. 9): class 0 gives all of
    # its 1 to channel 0 (w^+ = (2, 0)); class 1 splits -1 as (2, 3) / 5; the pooling passes
    # each channel's relevance on as A^n_ij / sum A^n
    torch.testing.assert_close(explanation.weights, torch.tensor([[1.0 - 0.4, -0.6]]))
    torch.testing.assert_close(
        explanation.extras["relevance"][0, 1], torch.tensor([[-0.1, -0.1], [-0.3, -0.1]])
    )
    expected = F.relu(0.6 * maps[0, 0] - 0.6 * maps[0, 1])
    torch.testing.assert_close(explanation.raw[0], expected)


def test_relevancecam_refuses_layers_it_cannot_propagate_through(images) -> None:
    model = conv4(num_classes=5, width=0.25).eval()
    with pytest.raises(ValueError, match="Relevance-CAM.*'block3'"):
        RelevanceCAM(model, "block3")(images, target=CLASSES)
    with pytest.raises(TypeError, match="contrastive"):
        RelevanceCAM(model, "block4", contrastive="yes")


@pytest.mark.parametrize(
    ("method", "name"), [(RelevanceCAM, "Relevance-CAM"), (LiftCAM, "LIFT-CAM")]
)
def test_euclidean_similarity_is_refused(method, name, embedder, images, references) -> None:
    with pytest.raises(ValueError, match=f"{name} needs a score linear"):
        method(embedder, "block4", similarity="euclidean")(images, target=references)


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


@pytest.mark.parametrize(("method", "layer"), [(RelevanceCAM, "block4"), (LiftCAM, "block3")])
def test_hooks_are_removed_when_the_model_fails(method, layer, classifier, images) -> None:
    failing = {"on": False}

    def fail(*_: object) -> None:
        if failing["on"]:
            raise RuntimeError("head failed")

    explainer = method(classifier, layer)
    explainer(images, target=CLASSES)  # the head is found while the model still works
    handle = classifier.fc.register_forward_hook(fail)
    before = hook_count(classifier)
    try:
        failing["on"] = True
        with pytest.raises(RuntimeError, match="head failed"):
            explainer(images, target=CLASSES)
        assert hook_count(classifier) == before
        assert not any(hasattr(m, "rule") for m in classifier.modules())
    finally:
        handle.remove()


def test_liftcam_without_captum_is_refused_before_any_work(monkeypatch, classifier) -> None:
    import fam_core.explainers.cam.liftcam as liftcam
    from fam_core.extras import MissingExtraError, require
    from fam_core.models.store import ModelConfig, find_config
    from fam_core.pipeline.errors import NotFound
    from fam_core.pipeline.torch_backend import TorchBackend

    def missing(extra: str, *_modules: str) -> object:
        return require(extra, "no_such_module_xyz")

    monkeypatch.setattr(liftcam, "require", missing)
    with pytest.raises(MissingExtraError, match=r"pip install 'fam-core\[captum\]'"):
        LiftCAM(classifier, "block4")
    config = ModelConfig.from_file(find_config("default-classifier"))
    backend = TorchBackend(classifier, config)
    with pytest.raises(NotFound, match="'liftcam'.*fam-core\\[captum\\]"):
        backend.explainer("liftcam")


def test_both_are_the_similarity_contributions_when_the_embedding_is_the_pooled_layer(
    images, references
) -> None:
    # no layer between pooling and the score: the z-rule and DeepLIFT both give z_n c_n
    torch.manual_seed(11)
    model = conv4(width=0.125, activation="relu").eval()  # embedding: pooled block4 (8)
    z = model(images).detach()
    coefficients = (references / references.norm(dim=1, keepdim=True)).mean(dim=0)
    expected = z * coefficients / z.norm(dim=1, keepdim=True)
    for method in (RelevanceCAM, LiftCAM):
        explanation = method(model, "block4")(images, target=references)
        torch.testing.assert_close(explanation.weights, expected, atol=1e-6, rtol=1e-5)
