"""Relevant features (Oramas et al.): descriptor by hand, mu-Lasso recovery, top-k, save/load,
and the feature ablation check of sec. 4.1 on the default classifier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fam_core
from fam_core.data.flowers import make_flowers
from fam_core.explainers.relevant import (
    RelevantFeatures,
    default_feature_layers,
    descriptor_from_responses,
    features,
    top_positive,
)
from fam_core.explainers.relevant_ablation import ablation_check


class _Tiny(nn.Module):
    """conv (2 channels) -> ReLU -> mean -> linear (2) -> ReLU -> linear (2 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.act = nn.ReLU()
        self.hidden = nn.Linear(2, 2, bias=False)
        self.act2 = nn.ReLU()
        self.out = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
            self.hidden.weight.copy_(torch.eye(2))
            self.out.weight.copy_(torch.eye(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x)).mean(dim=(2, 3))
        return self.out(self.act2(self.hidden(h)))


def test_descriptor_by_hand_on_a_tiny_model():
    model = _Tiny()
    assert default_feature_layers(model) == ["conv", "hidden"]
    image = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]]]])  # sum of squares 6
    x = RelevantFeatures(model).descriptors(image)
    # conv channels: 1^2 * 6 = 6 and 2^2 * 6 = 24 -> L1: (0.2, 0.8)
    # hidden = mean of relu(conv) = (1, 2): squares (1, 4) -> L1: (0.2, 0.8)
    conv, hidden = torch.tensor([0.2, 0.8]), torch.tensor([0.2, 0.8])
    expected = torch.cat([conv, hidden])
    expected = expected / expected.norm()
    assert torch.allclose(x, expected.unsqueeze(0), atol=1e-6)
    assert torch.allclose(x.norm(dim=1), torch.ones(1))
    # the helper on raw responses: energies (9, 1) -> (0.9, 0.1); (4) -> 1; then L2
    d = descriptor_from_responses([torch.tensor([[3.0, 1.0]]), torch.tensor([[[2.0]]])])
    raw = torch.tensor([0.9, 0.1, 1.0])
    assert torch.allclose(d, (raw / raw.norm()).unsqueeze(0))


def test_fit_recovers_a_known_relevant_feature():
    # channel 1 of "conv" is on for class 1 only; everything else is noise shared by classes
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), nn.Flatten(), nn.LazyLinear(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    model(torch.zeros(1, 3, 4, 4))
    labels = torch.tensor([0, 1] * 20)
    images = torch.rand(40, 3, 4, 4) * 0.2
    images[labels == 1, 1] += 1.0
    rf = RelevantFeatures(model, ["0"]).fit(images, labels, mu=1.0)
    w = rf.relevance
    assert w.shape == (3, 2)
    assert (w.abs().sum(dim=0) <= 1.0 + 1e-5).all()
    assert int(w[:, 1].argmax()) == 1 and w[1, 1] > 0
    strongest = max(rf.relevant_features(1), key=lambda feature: feature[2])
    assert strongest[:2] == ("0", 1)
    # the explanation of a class-1 image uses that feature first
    e = rf(images[1:2], target=1)
    assert features(e)[0][0][:2] == ("0", 1)


def test_top_k_selection_by_hand():
    values, index = top_positive(torch.tensor([[0.1, -2.0, 0.5, 0.0], [0.3, 0.2, 0.1, 0.4]]), 3)
    assert torch.equal(index, torch.tensor([[2, 0, -1], [3, 0, 1]]))
    assert torch.allclose(values, torch.tensor([[0.5, 0.1, 0.0], [0.4, 0.3, 0.2]]))
    # r = x * w_c / |sum(w_c)| on the tiny model, checked through the explainer
    model = _Tiny()
    rf = RelevantFeatures(model, top_k=2)
    rf.layer_sizes = [2, 2]
    rf.relevance = torch.tensor([[0.5, 0.0], [0.0, 1.0], [1.5, 0.0], [-1.0, 0.0]])
    image = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]]]])
    e = rf(image, target=0)
    x = rf.descriptors(image)[0]
    r = x * rf.relevance[:, 0] / 1.0
    assert torch.allclose(e.weights[0], r)
    assert features(e)[0] == [("hidden", 0, pytest.approx(float(r[2]))),
                              ("conv", 0, pytest.approx(float(r[0])))]  # fmt: skip
    maps = e.extras["feature_maps"][0]
    assert torch.allclose(e.raw[0], maps.amax(dim=0))
    assert e.maps.min() >= 0 and e.maps.max() <= 1


def test_save_load_round_trip(tmp_path):
    model = _Tiny()
    rf = RelevantFeatures(model).fit(torch.rand(6, 1, 3, 3), [0, 1, 0, 1, 0, 1], mu=0.5)
    path = tmp_path / "relevance.pt"
    rf.save(path)
    other = RelevantFeatures(model).load(path)
    assert torch.equal(other.relevance, rf.relevance)
    assert other.feature_index == rf.feature_index and other.mu == 0.5
    with pytest.raises(ValueError, match="fitted on layers"):
        RelevantFeatures(model, ["conv"]).load(path)


def test_ablation_on_default_classifier_selected_beat_random():
    model, config = fam_core.load_model("default-classifier")
    classes = list(range(0, 48, 6))
    train = make_flowers(classes, per_class=4, seed=0, start_index=1000)
    test = make_flowers(classes, per_class=3, seed=0, start_index=2000)
    rf = RelevantFeatures(model).fit(config.normalize(train.images), train.labels, mu=2.0)
    report = ablation_check(rf, config.normalize(test.images), test.labels, per_class=True)
    assert report.baseline_accuracy >= 0.9
    assert report.selected_drop > report.random_drop + 0.05, report


def test_bad_inputs_raise():
    model = _Tiny()
    with pytest.raises(ValueError, match="not fitted"):
        RelevantFeatures(model)(torch.rand(1, 1, 2, 2))
    with pytest.raises(ValueError, match="unknown feature layers"):
        RelevantFeatures(model, ["nope"])
    with pytest.raises(ValueError, match="top_k"):
        RelevantFeatures(model, top_k=0)
    rf = RelevantFeatures(model)
    with pytest.raises(ValueError, match="mu"):
        rf.fit(torch.rand(2, 1, 2, 2), [0, 1], mu=0)
    with pytest.raises(ValueError, match="labels are required"):
        rf.fit(torch.rand(2, 1, 2, 2))
    with pytest.raises(ValueError, match="labels must be in"):
        rf.fit(torch.rand(2, 1, 2, 2), [0, 5], num_classes=2)
    with pytest.raises(ValueError, match="at least two"):
        RelevantFeatures(nn.Sequential(nn.Conv2d(1, 1, 1)))
