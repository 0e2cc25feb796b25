"""FAM: hand-computed values, identities, batching, hooks and bad input."""

from __future__ import annotations

import pytest
import torch
from model_helpers import toy_model
from torch import nn

import fam_core
from fam_core.anatomy.pooling import GlobalPool
from fam_core.explainers.postprocess import min_max
from fam_core.maths.similarity import channel_contributions, similarity
from fam_core.models.backbones import conv4


def image_with_mean(means: list[float], size: int = 4) -> torch.Tensor:
    """A [1, C, size, size] image whose channel n has spatial mean ``means[n]`` but varies."""
    ramp = torch.linspace(-1, 1, size * size).view(size, size)
    return torch.stack([m + 0.5 * ramp for m in means]).unsqueeze(0)


@pytest.mark.parametrize("kind", ["cosine", "dot", "euclidean"])
def test_contributions_sum_to_similarity(kind: str) -> None:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(6, 32, generator=generator, dtype=torch.float64)
    refs = torch.randn(6, 4, 32, generator=generator, dtype=torch.float64)
    total = channel_contributions(z, refs, kind).sum(dim=2)
    torch.testing.assert_close(total, similarity(z, refs, kind), atol=1e-6, rtol=0)


def test_decompositions_by_hand() -> None:
    z, r = torch.tensor([[1.0, 2.0, 2.0]]), torch.tensor([[[2.0, 1.0, 2.0]]])
    torch.testing.assert_close(
        channel_contributions(z, r, "dot"), torch.tensor([[[2.0, 2.0, 4.0]]])
    )
    # |z - r| = sqrt(2); c_n = -(z_n - r_n)^2 / sqrt(2)
    expected = -torch.tensor([[[1.0, 1.0, 0.0]]]) / 2**0.5
    torch.testing.assert_close(channel_contributions(z, r, "euclidean"), expected)


def test_eq15_by_hand_on_three_channels() -> None:
    # Z = [1, 2, 2] (|Z| = 3); R1 = [2, 1, 2] (|R1| = 3, s1 = 8/9); R2 = [0, 0, -3] (s2 = -2/3)
    # eq. 15: pair 1 gives [2, 2, 4] / 9 / (8/9) = [1/4, 1/4, 1/2]; pair 2 gives [0, 0, -1]
    # mean over K = 2: C = [1/8, 1/8, -1/4]; eq. 12: [1, 1, 0]; eq. 11: S = (8/9 - 2/3) / 2
    explainer = fam_core.FAM(toy_model(), target_layer="features")
    image = image_with_mean([1.0, 2.0, 2.0])
    refs = torch.tensor([[2.0, 1.0, 2.0], [0.0, 0.0, -3.0]])
    explanation = explainer(image, target=refs)
    torch.testing.assert_close(
        explanation.extras["channel_contributions"], torch.tensor([[0.125, 0.125, -0.25]])
    )
    torch.testing.assert_close(explanation.weights, torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(explanation.scores, torch.tensor([(8 / 9 - 2 / 3) / 2]))
    torch.testing.assert_close(explanation.raw[0], image[0, 0] + image[0, 1])  # eq. 13


def test_transformation_equals_direct_computation() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(3, 5)
    explainer = fam_core.FAM(toy_model(head=linear), target_layer="features")
    image = image_with_mean([0.3, 1.2, -0.4])
    refs = torch.randn(2, 5)
    explanation = explainer(image, target=refs)
    # by hand: Z' = W Z + b, c'_j = mean_k z'_j r_kj / (|Z'| |R_k| |s_k|), C = W^T C'
    z = image.mean(dim=(2, 3))[0]
    embedding = linear.weight @ z + linear.bias
    per_pair = []
    for r in refs:
        s = embedding @ r / (embedding.norm() * r.norm())
        per_pair.append(embedding * r / (embedding.norm() * r.norm()) / s.abs())
    expected = linear.weight.T @ torch.stack(per_pair).mean(dim=0)
    torch.testing.assert_close(
        explanation.extras["channel_contributions"][0], expected.detach(), atol=1e-6, rtol=1e-5
    )


def test_batchnorm_head_is_folded_and_matches_the_jacobian() -> None:
    torch.manual_seed(1)
    head = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    head[1].running_mean.uniform_(-1, 1)
    head[1].running_var.uniform_(0.5, 2)
    head[1].weight.data.uniform_(0.5, 2)
    model = toy_model(head=head)
    image = torch.randn(2, 3, 4, 4)
    refs = torch.randn(3, 4)
    folded = fam_core.FAM(model, target_layer="features")(image, target=refs)
    jacobian = fam_core.FAM(
        model, "features", head=nn.Sequential(head[0], nn.ReLU()), nonlinear_head="jacobian"
    )
    assert jacobian.head.nonlinear_layer == "ReLU"
    local = fam_core.FAM(model, "features", nonlinear_head="jacobian")
    torch.testing.assert_close(
        folded.extras["channel_contributions"],
        local(image, target=refs).extras["channel_contributions"],
    )


def test_nonlinear_head_raises_unless_linearised() -> None:
    torch.manual_seed(2)
    head = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
    model = toy_model(head=head)
    image, refs = torch.randn(2, 3, 4, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"not linear \(layer 'head.1'\)"):
        fam_core.FAM(model, target_layer="features", nonlinear_head="error")(image, target=refs)
    explanation = fam_core.FAM(model, "features")(image, target=refs)  # default: jacobian
    assert explanation.extras["head"] == "jacobian"
    # the Jacobian of Linear-ReLU-Linear at z is W2 diag(relu'(W1 z + b1)) W1
    z = image.mean(dim=(2, 3))
    for b in range(2):
        active = (head[0](z[b]) > 0).float()
        jac = head[2].weight @ torch.diag(active) @ head[0].weight
        embedding = head(z[b : b + 1])[0]
        c_prime = torch.stack(
            [
                embedding
                * r
                / (embedding.norm() * r.norm())
                / torch.cosine_similarity(embedding, r, dim=0).abs()
                for r in refs
            ]
        ).mean(0)
        torch.testing.assert_close(
            explanation.extras["channel_contributions"][b],
            (jac.T @ c_prime).detach(),
            atol=1e-5,
            rtol=1e-4,
        )


@pytest.mark.parametrize("pooling", ["avg", "max", "lse", "gem"])
def test_pooling_of_a_feature_map_model(pooling: str) -> None:
    """A model returning its feature map is pooled by ``pooling``, as its own GlobalPool would."""
    torch.manual_seed(3)
    backbone = conv4(pooling=pooling).eval()
    features_only = nn.Sequential(*[getattr(backbone, n) for n in backbone.stage_names]).eval()
    images, refs = torch.rand(2, 3, 84, 84), torch.randn(3, 64)
    ours = fam_core.FAM(features_only, target_layer="3", pooling=pooling)(images, target=refs)
    native = fam_core.FAM(backbone, target_layer="block4")(images, target=refs)
    torch.testing.assert_close(ours.maps, native.maps)
    torch.testing.assert_close(ours.scores, native.scores)


@pytest.fixture(scope="module")
def backbone_explainer() -> fam_core.FAM:
    torch.manual_seed(4)
    return fam_core.FAM(conv4(embedding_dim=16).eval(), target_layer="block4")


@pytest.mark.parametrize("target_shape", ["D", "KD", "BKD"])
def test_batch_equals_items(backbone_explainer: fam_core.FAM, target_shape: str) -> None:
    images = torch.rand(4, 3, 84, 84)
    refs = {"D": torch.randn(16), "KD": torch.randn(3, 16), "BKD": torch.randn(4, 2, 16)}[
        target_shape
    ]
    batch = backbone_explainer(images, target=refs)
    for i in range(4):
        item_target = refs[i : i + 1] if target_shape == "BKD" else refs
        item = backbone_explainer(images[i : i + 1], target=item_target)
        torch.testing.assert_close(item.maps, batch.maps[i : i + 1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(item.weights, batch.weights[i : i + 1], atol=1e-5, rtol=1e-4)


def test_explanation_contract(backbone_explainer: fam_core.FAM) -> None:
    images = torch.rand(3, 3, 84, 84)
    explanation = backbone_explainer(images, target=backbone_explainer.embed(images[:2]))
    assert explanation.method == "fam" and explanation.target_layer == "block4"
    assert explanation.maps.shape == (3, 84, 84) and explanation.maps.dtype == torch.float32
    assert explanation.raw.shape == (3, 5, 5) and explanation.weights.shape == (3, 64)
    assert explanation.maps.amin() == 0 and explanation.maps.amax() == 1
    assert explanation.weights.amin() == 0 and explanation.weights.amax() == 1
    assert not explanation.maps.requires_grad


def test_no_target_explains_the_embedding_itself(backbone_explainer: fam_core.FAM) -> None:
    explanation = backbone_explainer(torch.rand(2, 3, 84, 84))
    torch.testing.assert_close(explanation.scores, torch.ones(2))


def test_pair_explains_both_sides(backbone_explainer: fam_core.FAM) -> None:
    queries, references = torch.rand(2, 3, 84, 84), torch.rand(2, 3, 84, 84)
    query_side, reference_side = backbone_explainer.pair(queries, references)
    for i in range(2):
        expected = backbone_explainer(
            queries[i : i + 1], target=backbone_explainer.embed(references[i : i + 1])
        )
        torch.testing.assert_close(query_side.maps[i : i + 1], expected.maps, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(query_side.scores, reference_side.scores)  # cosine is symmetric


def test_class_target_on_a_classifier_reduces_to_cam_weights() -> None:
    torch.manual_seed(5)
    model = conv4(num_classes=7).eval()
    explainer = fam_core.FAM(model, target_layer="block4")
    images = torch.rand(2, 3, 84, 84)
    explanation = explainer(images, target=[3, 5])
    logits = model(images).detach()
    for b, c in enumerate([3, 5]):
        expected = min_max(torch.sign(logits[b, c]) * model.fc.weight[c].detach(), dim=0)
        torch.testing.assert_close(explanation.weights[b], expected)
        assert explanation.scores[b].item() == pytest.approx(logits[b, c].item(), abs=1e-5)
    predicted = explainer(images)  # None: the predicted class
    torch.testing.assert_close(predicted.scores, logits.amax(dim=1))


def test_hooks_removed_after_success_and_error() -> None:
    class Exploding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.features(x)
            raise RuntimeError("boom")

    model = Exploding()
    with fam_core.FAM(model, target_layer="features") as explainer, pytest.raises(RuntimeError):
        explainer(torch.rand(1, 3, 8, 8))
    assert not model.features._forward_hooks
    backbone = conv4().eval()
    explainer = fam_core.FAM(backbone, target_layer="block4")
    explainer(torch.rand(1, 3, 84, 84))
    assert all(not m._forward_hooks for m in backbone.modules())


@pytest.mark.parametrize(
    ("images", "target", "error", "message"),
    [
        (torch.rand(3, 84, 84), None, ValueError, r"\[B, C, H, W\]"),
        (torch.rand(1, 4, 84, 84), None, ValueError, "4 channels, the model expects 3"),
        (torch.rand(0, 3, 84, 84), None, ValueError, "empty batch"),
        (torch.rand(1, 3, 84, 84), torch.randn(2, 10), ValueError, "dimension 10.*16"),
        (
            torch.rand(1, 3, 84, 84),
            torch.randn(2, 3, 4, 16),
            ValueError,
            r"\[D\], \[K, D\] or \[B, K, D\]",
        ),
        (torch.rand(2, 3, 84, 84), torch.randn(3, 1, 16), ValueError, "B = 2"),
        (torch.rand(1, 3, 84, 84), 3, TypeError, "classifier"),
        (torch.randint(0, 255, (1, 3, 84, 84)), None, TypeError, "floating-point"),
        ("not a tensor", None, TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(backbone_explainer: fam_core.FAM, images, target, error, message) -> None:
    with pytest.raises(error, match=message):
        backbone_explainer(images, target=target)


def test_bad_layers_and_targets() -> None:
    model = conv4(num_classes=5).eval()
    with pytest.raises(ValueError, match="unknown target layer 'block5'.*'block4'"):
        fam_core.FAM(model, target_layer="block5")
    with pytest.raises(ValueError, match="not spatial"):
        fam_core.FAM(model, target_layer="pool")(torch.rand(1, 3, 84, 84))
    with pytest.raises(ValueError, match="out of range"):
        fam_core.FAM(model, target_layer="block4")(torch.rand(1, 3, 84, 84), target=5)
    with pytest.raises(ValueError, match="similarity"):
        fam_core.FAM(model, similarity="manhattan")
    with pytest.raises(TypeError, match="nn.Module"):
        fam_core.FAM(lambda x: x)  # type: ignore[arg-type]


def test_head_that_does_not_match_the_forward_is_reported() -> None:
    class Reordered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Conv2d(3, 4, 3)
            self.pool = GlobalPool()
            self.head = nn.Linear(4, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.pool(self.features(x))) * 2  # not what the modules say

    model = Reordered().eval()
    image, target = torch.rand(1, 3, 8, 8), torch.randn(6)
    wrong = fam_core.FAM(model, target_layer="features", head=model.head)
    with pytest.raises(ValueError, match="pass head= explicitly"):
        wrong(image, target=target)
    # from the dataflow, the head is found as it runs: 2 W (eq. 18 with the real matrix)
    found = fam_core.FAM(model, target_layer="features")(image, target=target)
    assert found.extras["head"] == "linear"
    embedding = model(image)[0]
    c_prime = embedding * target / (embedding.norm() * target.norm())
    c_prime = c_prime / c_prime.sum().abs()
    expected = c_prime @ (2 * model.head.weight)
    torch.testing.assert_close(found.extras["channel_contributions"][0], expected.detach())
