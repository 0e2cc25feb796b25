"""Grad-FAM: the analytic gradient equals autograd; the explained score is FAM's similarity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fam_core.explainers.fam.gradfam import GradFAM, similarity_gradient
from fam_core.models.backbones import conv4


def _autograd_weights(model, layer, images, score_fn):
    """Independent Grad-CAM eq. 3: spatial mean of dS/dA by plain autograd."""
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        outputs = model(images.requires_grad_(True))
    finally:
        handle.remove()
    (grads,) = torch.autograd.grad(score_fn(outputs).sum(), captured[0])
    return grads.mean(dim=(2, 3)), captured[0].detach()


def _close(a, b, tol=1e-5):
    scale = b.abs().max().clamp_min(1e-12)
    assert torch.allclose(a / scale, b / scale, atol=tol), (a - b).abs().max() / scale


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"embedding_dim": 16},
        {"pooling": "max", "embedding_dim": 8},
        {"pooling": "gem"},
        {"pooling": "lse", "embedding_dim": 12},
    ],
)
@pytest.mark.parametrize("kind", ["cosine", "dot", "euclidean"])
def test_analytic_weights_equal_autograd(kwargs, kind):
    torch.manual_seed(0)
    model = conv4(**kwargs).eval()
    images, refs = torch.rand(3, 3, 84, 84), torch.randn(2, model.output_dim)
    explainer = GradFAM(model, "block4", similarity=kind, analytic=True)
    assert explainer.analytic and not explainer.needs_gradients
    explanation = explainer(images, target=refs)

    def score(out):
        z = out.unsqueeze(1)
        r = refs.unsqueeze(0)
        if kind == "cosine":
            return F.cosine_similarity(z, r, dim=2).mean(1)
        if kind == "dot":
            return (z * r).sum(2).mean(1)
        return -(z - r).norm(dim=2).mean(1)

    expected, activations = _autograd_weights(model, "block4", images.clone(), score)
    _close(explanation.weights, expected)
    with torch.no_grad():
        assert torch.allclose(explanation.scores, score(model(images)), atol=1e-6)
    raw = torch.relu(torch.einsum("bn,bnhw->bhw", expected, activations))  # eq. 2
    _close(explanation.raw, raw)


def test_analytic_and_autograd_paths_agree_on_class_target():
    torch.manual_seed(1)
    model = conv4(num_classes=5, embedding_dim=10).eval()
    images = torch.rand(2, 3, 84, 84)
    fast = GradFAM(model, "block4", analytic=True)(images, target=[1, 4])
    slow = GradFAM(model, "block4", analytic=False)(images, target=[1, 4])
    _close(fast.weights, slow.weights)
    expected, _ = _autograd_weights(model, "block4", images.clone(), lambda o: o[[0, 1], [1, 4]])
    _close(fast.weights, expected)
    assert torch.allclose(fast.scores, model(images)[[0, 1], [1, 4]].detach(), atol=1e-6)


def test_no_target_weights_are_the_gradient_of_the_norm():
    torch.manual_seed(2)
    model = conv4(embedding_dim=16).eval()
    images = torch.rand(2, 3, 84, 84)
    # the cosine of Z with (detached) itself has zero gradient: nothing to explain
    cos_self, _ = _autograd_weights(
        model, "block4", images.clone(), lambda o: F.cosine_similarity(o, o.detach(), dim=1)
    )
    assert cos_self.abs().max() < 1e-6
    explanation = GradFAM(model, "block4")(images)
    expected, _ = _autograd_weights(model, "block4", images.clone(), lambda o: o.norm(dim=1))
    assert expected.abs().max() > 1e-4
    _close(explanation.weights, expected)


def test_similarity_gradient_by_hand():
    z, r = torch.tensor([[3.0, 4.0]]), torch.tensor([[[1.0, 0.0]]])
    # cos = 3/5; d/dz = r/(|z||r|) - cos z/|z|^2 = (0.2, 0) - 0.6 (3, 4)/25
    expected = torch.tensor([[0.2 - 0.072, -0.096]])
    assert torch.allclose(similarity_gradient(z, r, "cosine"), expected)
    assert torch.allclose(similarity_gradient(z, r, "dot"), torch.tensor([[1.0, 0.0]]))
    # -(z - r)/|z - r| with z - r = (2, 4)
    expected = -torch.tensor([[2.0, 4.0]]) / 20**0.5
    assert torch.allclose(similarity_gradient(z, r, "euclidean"), expected)


def test_nonlinear_head_falls_back_to_autograd_and_rejects_analytic():
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        conv4().block1,
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 4),
    ).eval()
    explainer = GradFAM(model, "0")
    assert not explainer.analytic and explainer.needs_gradients
    with pytest.raises(ValueError, match="analytic=True"):
        GradFAM(model, "0", analytic=True)
    images, refs = torch.rand(2, 3, 84, 84), torch.randn(4)
    explanation = explainer(images, target=refs)
    expected, _ = _autograd_weights(
        model, "0", images.clone(), lambda o: F.cosine_similarity(o, refs.expand_as(o), dim=1)
    )
    _close(explanation.weights, expected)
    with pytest.raises(TypeError, match="analytic"):
        GradFAM(model, "0", analytic="yes")


@pytest.mark.parametrize("analytic", [True, False])
def test_explained_score_is_the_similarity_fam_explains(analytic):
    """No target: the cosine of Z with itself (1), not |Z|; a reference: the cosine to it,
    computed by hand; both equal FAM's score for the same target."""
    from fam_core.explainers.fam.fam import FAM

    torch.manual_seed(3)
    model = conv4(embedding_dim=16).eval()
    images, reference = torch.rand(2, 3, 84, 84), torch.randn(1, 1, 16)
    gradfam = GradFAM(model, "block4", analytic=analytic)
    fam = FAM(model, "block4")
    with torch.no_grad():
        z = model(images)
    assert (z.norm(dim=1) - 1).abs().min() > 0.1  # |Z| would not pass for the cosine
    by_hand = (z * reference[0]).sum(dim=1) / (z.norm(dim=1) * reference[0].norm(dim=1))
    for target, expected in ((None, torch.ones(2)), (reference.expand(2, 1, 16), by_hand)):
        scores = gradfam(images, target=target).scores
        assert torch.allclose(scores, expected, atol=1e-5)
        assert torch.allclose(scores, fam(images, target=target).scores, atol=1e-5)
