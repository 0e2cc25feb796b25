"""Feature-relevance metrics (Oramas et al. sec. 4.1, supp. sec. 8) on known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fam_core.explainers.relevant.relevant import RelevantFeatures
from fam_core.metrics.relevance import (
    ablation_accuracy_drop,
    class_reconstruction_auc,
    reconstruction_auc_over_mu,
    roc_auc,
)


def test_roc_auc_by_hand() -> None:
    # positives 0.35, 0.8 against negatives 0.1, 0.4: 3 of 4 pairs won
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert roc_auc(torch.tensor([1.0, 1.0]), torch.tensor([1, 0])) == 0.5  # a tie is half
    with pytest.raises(ValueError, match="positive and one negative"):
        roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1]))


def test_class_reconstruction_auc_perfect_and_reversed() -> None:
    x = torch.eye(3).repeat(2, 1)  # feature j fires for class j only
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert class_reconstruction_auc(x, labels, torch.eye(3)) == 1.0
    assert class_reconstruction_auc(x, labels, -torch.eye(3)) == 0.0
    # class 2 absent from the labels is left out of the mean: (1 + 1) / 2
    assert class_reconstruction_auc(x[:2], torch.tensor([0, 1]), torch.eye(3)) == 1.0
    with pytest.raises(ValueError, match="descriptors"):
        class_reconstruction_auc(x, labels, torch.eye(4))


class ColourNet(nn.Module):
    """1x1 conv: channel 0 = red, 1 = green, 2 and 3 = blue (absent from the images);
    logits = (channel 0, channel 1) averaged, plus a bias of 0.01 for class 1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.copy_(
                torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]).view(4, 3, 1, 1)
            )
            self.fc.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]]))
            self.fc.bias.copy_(torch.tensor([0.0, 0.01]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def colour_images() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.zeros(4, 3, 4, 4)
    images[:2, 0] = 1.0  # red: class 0
    images[2:, 1] = 1.0  # green: class 1
    return images, torch.tensor([0, 0, 1, 1])


def test_ablating_the_relevant_features_by_hand() -> None:
    images, labels = colour_images()
    explainer = RelevantFeatures(ColourNet().eval(), layers=["conv"], classifier=True).fit(
        images, labels, mu=1.0
    )
    assert {(layer, ch) for layer, ch, _ in explainer.relevant_features()} == {
        ("conv", 0),
        ("conv", 1),
    }
    drops = ablation_accuracy_drop(explainer, images, labels, repeats=3)
    # channels 0 and 1 zeroed: logits (0, 0.01) for every image -> class 1: accuracy 1/2
    assert drops["accuracy"] == 1.0 and drops["features"] == 2.0
    assert drops["relevant_accuracy"] == 0.5 and drops["relevant_drop"] == 0.5
    assert 0.0 <= drops["random_drop"] <= 0.5
    # per class: class 0 loses channel 0 (-> class 1, wrong), class 1 loses channel 1
    # (logits (0, 0.01) -> class 1, right): accuracy 1/2 again
    own = ablation_accuracy_drop(explainer, images, labels, per_class=True)
    assert own["relevant_accuracy"] == 0.5 and own["features"] == 2.0


def test_reconstruction_auc_over_mu_is_perfect_for_separable_classes() -> None:
    images, labels = colour_images()
    explainer = RelevantFeatures(ColourNet().eval(), layers=["conv"], classifier=True)
    curve = reconstruction_auc_over_mu(explainer, images, labels, images, labels, mus=(0.5, 2.0))
    assert curve == {0.5: 1.0, 2.0: 1.0}
    assert explainer.relevance is None  # the explainer's own fit is left alone
    # labels swapped at test time: every class score ranks the wrong class first
    assert reconstruction_auc_over_mu(explainer, images, labels, images, 1 - labels, mus=(1,)) == {
        1.0: 0.0
    }
