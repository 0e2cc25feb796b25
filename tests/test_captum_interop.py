"""fam_core <-> Captum: layer-attribution wrappers, SimilarityForward, Captum metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.attr import (
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Occlusion,
)
from captum.metrics import infidelity, sensitivity_max

from fam_core import captum as fam_captum
from fam_core.explainers.cam.gradcam import GradCAM
from fam_core.explainers.fam.fam import FAM
from fam_core.explainers.postprocess import min_max

CLASSES = [3, 1]
WRAPPERS = [
    fam_captum.FAMAttribution,
    fam_captum.CAMAttribution,
    fam_captum.GradCAMAttribution,
    fam_captum.GradCAMPlusPlusAttribution,
    fam_captum.XGradCAMAttribution,
    fam_captum.LayerCAMAttribution,
    fam_captum.ScoreCAMAttribution,
    fam_captum.AblationCAMAttribution,
    fam_captum.EigenCAMAttribution,
    fam_captum.UpsampledActivationAttribution,
    fam_captum.GuidedGradCAMAttribution,
    fam_captum.RelevanceCAMAttribution,
    fam_captum.LiftCAMAttribution,
]


def test_the_real_captum_is_not_shadowed() -> None:
    assert fam_captum.LayerAttribution is LayerAttribution
    assert fam_captum.__name__ == "fam_core.captum"


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_round_trip_through_layer_attribution_interpolate(wrapper, classifier, images) -> None:
    attribution = wrapper(classifier, classifier.block4).attribute(images, target=CLASSES)
    explanation = wrapper.explainer_class(classifier, "block4")(images, target=CLASSES)
    size = 84 if wrapper is fam_captum.GuidedGradCAMAttribution else 5
    assert attribution.shape == (2, 1, size, size)
    torch.testing.assert_close(attribution[:, 0], explanation.raw)
    upsampled = LayerAttribution.interpolate(attribution, (84, 84), interpolate_mode="bilinear")
    torch.testing.assert_close(min_max(upsampled[:, 0], dim=(1, 2)), explanation.maps)


def test_layer_attribution_by_method_name(classifier, images) -> None:
    wrapper = fam_captum.layer_attribution("gradcam")
    (attribution,) = wrapper(classifier, classifier.block3).attribute((images,), target=CLASSES)
    torch.testing.assert_close(
        attribution[:, 0], GradCAM(classifier, "block3")(images, target=CLASSES).raw
    )
    with pytest.raises(ValueError, match="unknown method"):
        fam_captum.layer_attribution("no-such-method")


def test_references_travel_as_target_or_forward_args(embedder, images, references) -> None:
    expected = FAM(embedder, "block4")(images, target=references).raw
    plain = fam_captum.FAMAttribution(embedder, embedder.block4)
    torch.testing.assert_close(plain.attribute(images, target=references)[:, 0], expected)
    shared = fam_captum.FAMAttribution(
        fam_captum.SimilarityForward(embedder, references), embedder.block4
    )
    torch.testing.assert_close(shared.attribute(images)[:, 0], expected)
    per_image = fam_captum.FAMAttribution(fam_captum.SimilarityForward(embedder), embedder.block4)
    batched = references.unsqueeze(0).expand(2, -1, -1)
    torch.testing.assert_close(
        per_image.attribute(images, additional_forward_args=batched)[:, 0], expected
    )
    (from_tuple,) = per_image.attribute((images,), additional_forward_args=(batched,))
    torch.testing.assert_close(from_tuple[:, 0], expected)


def test_attribution_bad_arguments(classifier, embedder, images, references) -> None:
    with pytest.raises(ValueError, match="out of range"):
        fam_captum.GradCAMAttribution(classifier, classifier.block4).attribute(images, target=9)
    with pytest.raises(ValueError, match="dimension 7"):
        fam_captum.GradCAMAttribution(embedder, embedder.block4).attribute(
            images, target=torch.rand(7)
        )
    forward = fam_captum.SimilarityForward(embedder, references)
    with pytest.raises(ValueError, match="target must be None"):
        fam_captum.GradCAMAttribution(forward, embedder.block4).attribute(images, target=1)
    with pytest.raises(ValueError, match="SimilarityForward"):
        fam_captum.GradCAMAttribution(classifier, classifier.block4).attribute(
            images, target=1, additional_forward_args=torch.rand(2, 5)
        )
    with pytest.raises(TypeError, match="nn.Module"):
        fam_captum.GradCAMAttribution(lambda x: x, classifier.block4)
    with pytest.raises(ValueError, match="B = 2"):
        forward(images, torch.rand(3, 8))
    with pytest.raises(ValueError, match="no references"):
        fam_captum.SimilarityForward(embedder)(images)


# -- Captum's methods on embedding models through SimilarityForward
def test_similarity_forward_is_the_mean_similarity(embedder, images, references) -> None:
    forward = fam_captum.SimilarityForward(embedder, references)
    z = embedder(images)
    expected = F.cosine_similarity(z.unsqueeze(1), references.unsqueeze(0), dim=2).mean(dim=1)
    torch.testing.assert_close(forward(images), expected)
    dot = fam_captum.SimilarityForward(embedder, references[0], similarity="dot")
    torch.testing.assert_close(dot(images), z @ references[0])


def test_captum_layer_gradcam_on_embeddings_equals_ours(embedder, images, references) -> None:
    forward = fam_captum.SimilarityForward(embedder, references)
    captum = LayerGradCam(forward, embedder.block3).attribute(images, relu_attributions=True)
    ours = GradCAM(embedder, "block3")(images, target=references).raw
    torch.testing.assert_close(ours, captum[:, 0], atol=1e-5, rtol=1e-5)


def test_integrated_gradients_completeness(embedder, images, references) -> None:
    forward = fam_captum.SimilarityForward(embedder, references)
    baselines = torch.zeros_like(images)
    attributions = IntegratedGradients(forward).attribute(
        images, baselines=baselines, n_steps=64, internal_batch_size=64
    )
    gap = (forward(images) - forward(baselines)).detach()
    torch.testing.assert_close(attributions.sum(dim=(1, 2, 3)), gap, atol=2e-2, rtol=5e-2)


def test_per_image_references_survive_captum_expansion(embedder, images, references) -> None:
    per_image = references[:2].unsqueeze(1)  # image b is compared with references[b]
    attributions = IntegratedGradients(fam_captum.SimilarityForward(embedder)).attribute(
        images, additional_forward_args=per_image, n_steps=8
    )
    for b in range(2):
        alone = IntegratedGradients(
            fam_captum.SimilarityForward(embedder, references[b])
        ).attribute(images[b : b + 1], n_steps=8)
        torch.testing.assert_close(attributions[b : b + 1], alone, atol=1e-6, rtol=1e-4)


def test_occlusion_on_embeddings_by_hand(embedder, images, references) -> None:
    forward = fam_captum.SimilarityForward(embedder, references)
    attributions = Occlusion(forward).attribute(
        images, sliding_window_shapes=(3, 42, 42), strides=(3, 42, 42), baselines=0.0
    )
    occluded = images.clone()
    occluded[:, :, :42, :42] = 0
    drop = (forward(images) - forward(occluded)).detach()
    torch.testing.assert_close(attributions[:, 0, 0, 0], drop, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attributions[:, 2, 41, 41], drop, atol=1e-6, rtol=1e-5)


def test_noise_tunnel_without_noise_is_the_plain_method(embedder, images, references) -> None:
    forward = fam_captum.SimilarityForward(embedder, references)
    gradients = IntegratedGradients(forward)
    plain = gradients.attribute(images, n_steps=8)
    tunnel = NoiseTunnel(gradients).attribute(
        images, nt_type="smoothgrad", nt_samples=2, stdevs=0.0, n_steps=8
    )
    torch.testing.assert_close(tunnel, plain, atol=1e-6, rtol=1e-4)


# -- Captum's metrics on fam_core attributions
def input_resolution(attribution: torch.Tensor) -> torch.Tensor:
    upsampled = LayerAttribution.interpolate(attribution, (84, 84), interpolate_mode="bilinear")
    return upsampled.expand(-1, 3, -1, -1)


def test_infidelity_of_our_attribution_by_hand(classifier, images) -> None:
    attributions = input_resolution(
        fam_captum.FAMAttribution(classifier, classifier.block4).attribute(images, target=CLASSES)
    )
    perturbation = torch.zeros_like(images)
    perturbation[:, :, 20:50, 10:60] = 0.3

    def perturb(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return perturbation[: inputs.shape[0]], inputs - perturbation[: inputs.shape[0]]

    value = infidelity(
        classifier, perturb, images, attributions, target=CLASSES, n_perturb_samples=1
    )
    with torch.no_grad():
        logits = classifier(images)[[0, 1], CLASSES]
        perturbed = classifier(images - perturbation)[[0, 1], CLASSES]
    expected = ((perturbation * attributions).sum(dim=(1, 2, 3)) - (logits - perturbed)).square()
    torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-4)


def test_sensitivity_max_matches_captum_gradcam(classifier, images) -> None:
    ours = fam_captum.GradCAMAttribution(classifier, classifier.block4)
    theirs = LayerGradCam(classifier, classifier.block4)

    def captum_gradcam(inputs: tuple[torch.Tensor], target: list[int]) -> tuple[torch.Tensor]:
        # Captum's layer methods return a tensor even for tuple inputs; the metric wants a tuple
        return (theirs.attribute(inputs, target=target, relu_attributions=True),)

    torch.manual_seed(7)
    ours_value = sensitivity_max(ours.attribute, images, target=CLASSES, n_perturb_samples=3)
    torch.manual_seed(7)
    their_value = sensitivity_max(captum_gradcam, images, target=CLASSES, n_perturb_samples=3)
    torch.testing.assert_close(ours_value, their_value, atol=1e-5, rtol=1e-4)
    assert (ours_value > 0).any()  # not a constant explanation
