"""FAM variants (fam_core.explainers.fam.variants) against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from model_helpers import toy_model

from fam_core.explainers import EXPLAINERS, FAM
from fam_core.explainers.fam.variants import CentredFAM, OrthogonalFAM, SignedFAM
from fam_core.maths.fam import gradient_contributions
from fam_core.maths.similarity import similarity_gradient
from fam_core.models.backbones import conv4

# The toy model's feature map is the image: A^0 = [6, 0, 0], A^1 = [0, 3, 0], A^2 = [0, 0, 3]
# (one row of 3 pixels), so Z = mean = (2, 1, 1), |Z| = sqrt(6). Reference R = (1, 1, 0),
# |R| = sqrt(2), s = 3 / sqrt(12) = sqrt(3) / 2.
IMAGE = torch.tensor([[[[6.0, 0.0, 0.0]], [[0.0, 3.0, 0.0]], [[0.0, 0.0, 3.0]]]])
REFERENCE = torch.tensor([[1.0, 1.0, 0.0]])
# eq. 15: z_n r_n / (|Z||R|) / s = (2, 1, 0) / sqrt(12) / (sqrt(3)/2) = (2/3, 1/3, 0)
PAPER_WEIGHTS = torch.tensor([[2 / 3, 1 / 3, 0.0]])


def _explain(cls: type[FAM]):
    return cls(toy_model(), target_layer="features")(IMAGE, target=REFERENCE)


def test_the_variants_are_registered_under_their_own_names() -> None:
    assert EXPLAINERS["fam"] is FAM
    assert EXPLAINERS["fam-signed"] is SignedFAM
    assert EXPLAINERS["fam-centred"] is CentredFAM
    assert EXPLAINERS["fam-orthogonal"] is OrthogonalFAM


def test_paper_fam_by_hand() -> None:
    explanation = _explain(FAM)
    torch.testing.assert_close(explanation.extras["channel_contributions"], PAPER_WEIGHTS)
    torch.testing.assert_close(explanation.weights, torch.tensor([[1.0, 0.5, 0.0]]))  # eq. 12
    torch.testing.assert_close(explanation.raw, torch.tensor([[[6.0, 1.5, 0.0]]]))


def test_signed_fam_by_hand() -> None:
    explanation = _explain(SignedFAM)
    torch.testing.assert_close(explanation.weights, PAPER_WEIGHTS)  # no eq. 12
    torch.testing.assert_close(explanation.raw, torch.tensor([[[4.0, 1.0, 0.0]]]))


def test_centred_fam_by_hand() -> None:
    # weights (2/3, 1/3, 0) - 1/3 = (1/3, 0, -1/3); sum = (2, 0, -1); ReLU -> (2, 0, 0)
    explanation = _explain(CentredFAM)
    torch.testing.assert_close(explanation.weights, torch.tensor([[1 / 3, 0.0, -1 / 3]]))
    torch.testing.assert_close(explanation.raw, torch.tensor([[[2.0, 0.0, 0.0]]]))
    torch.testing.assert_close(explanation.maps, torch.tensor([[[1.0, 0.0, 0.0]]]))


def test_orthogonal_fam_by_hand() -> None:
    # grad = R/(|Z||R|) - s Z/|Z|^2 = (1,1,0)/sqrt(12) - (sqrt(3)/2)(2,1,1)/6
    #      = (0, 1/(4 sqrt 3), -1/(4 sqrt 3)); z * grad / s = (0, 1/6, -1/6)
    # map: (1/6) A^1 - (1/6) A^2 = (0, 0.5, -0.5); ReLU -> (0, 0.5, 0): channel 0, which the
    # query holds more of than the reference, no longer lights up
    explanation = _explain(OrthogonalFAM)
    torch.testing.assert_close(explanation.weights, torch.tensor([[0.0, 1 / 6, -1 / 6]]))
    torch.testing.assert_close(explanation.raw, torch.tensor([[[0.0, 0.5, 0.0]]]))
    torch.testing.assert_close(explanation.scores, torch.tensor([3**0.5 / 2]))


def test_gradient_contributions_are_the_orthogonal_part_for_the_cosine() -> None:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(3, 8, generator=generator, dtype=torch.float64)
    refs = torch.randn(3, 2, 8, generator=generator, dtype=torch.float64)
    unit = z / z.norm(dim=1, keepdim=True)
    orthogonal = refs - (refs * unit.unsqueeze(1)).sum(dim=2, keepdim=True) * unit.unsqueeze(1)
    norms = z.norm(dim=1).view(3, 1, 1) * refs.norm(dim=2, keepdim=True)
    expected = z.unsqueeze(1) * orthogonal / norms
    torch.testing.assert_close(gradient_contributions(z, refs, "cosine"), expected)
    torch.testing.assert_close(
        gradient_contributions(z, refs, "cosine").sum(dim=2), torch.zeros(3, 2, dtype=z.dtype)
    )
    torch.testing.assert_close(gradient_contributions(z, refs, "dot"), z.unsqueeze(1) * refs)
    for k in range(2):  # one reference at a time: the closed-form gradient of that pair
        grad = similarity_gradient(z, refs[:, k : k + 1], "euclidean")
        torch.testing.assert_close(gradient_contributions(z, refs, "euclidean")[:, k], z * grad)


@pytest.mark.parametrize("cls", [SignedFAM, CentredFAM, OrthogonalFAM])
def test_batch_equals_items_and_maps_are_normalised(cls: type[FAM]) -> None:
    torch.manual_seed(0)
    explainer = cls(conv4(width=0.25).eval(), target_layer="block4")
    images = torch.rand(3, 3, 84, 84)
    refs = explainer.embed(torch.rand(3, 3, 84, 84)).unsqueeze(1)
    batch = explainer(images, target=refs)
    for i in range(3):
        item = explainer(images[i : i + 1], target=refs[i : i + 1])
        torch.testing.assert_close(item.raw, batch.raw[i : i + 1], atol=1e-5, rtol=1e-4)
    assert batch.maps.min() >= 0 and batch.maps.max() <= 1
