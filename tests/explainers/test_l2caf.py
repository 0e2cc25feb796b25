"""L2-CAF: the filter finds the region the output depends on; fast == slow; batched == single."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fam_core.explainers.l2caf import L2CAF
from fam_core.models.backbones import conv4


class RegionNet(nn.Module):
    """Output depends only on the top-left 4x4 cells of the 8x8 ``features`` map."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 6, 3, padding=1)
        self.crop = Crop()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6, classes)


class Crop(nn.Module):
    def forward(self, x):
        return x[:, :, :4, :4]


def _forward(self, x):
    return self.fc(self.flat(self.pool(self.crop(self.features(x)))))


RegionNet.forward = _forward


def _region_fraction(raw):
    return raw[:, :4, :4].sum(dim=(1, 2)) / raw.sum(dim=(1, 2))


def test_class_oblivious_filter_concentrates_on_the_known_region():
    torch.manual_seed(0)
    model = RegionNet().eval()
    images = torch.rand(2, 3, 8, 8)
    explanation = L2CAF(model, "features")(images)
    assert (_region_fraction(explanation.raw) > 0.9).all()
    assert (explanation.scores < explanation.extras["initial_loss"]).all()
    unit = explanation.extras["filter"]
    assert torch.allclose(unit.flatten(1).norm(dim=1), torch.ones(2))
    assert torch.allclose(explanation.raw, unit.abs())


def test_targeted_modes_use_their_losses():
    torch.manual_seed(1)
    model = RegionNet().eval()
    model.is_classifier = True
    images = torch.rand(1, 3, 8, 8)
    explainer = L2CAF(model, "features", iterations=1)
    with torch.no_grad():
        logits = model(images)
        # first loss, with f = ones / 8 (unit norm on 8x8): output of the scaled features
        feats = model.features(images) / 8.0
        scaled = model.fc(model.flat(model.pool(model.crop(feats))))
    size = (logits - model.fc.bias).norm()  # S: the output an all-zero filter takes away
    cls = explainer(images, target=2)
    expected = (scaled.sum() - 2 * scaled[0, 2]) / size
    assert torch.allclose(cls.extras["initial_loss"], expected.view(1), atol=1e-5)
    oblivious = explainer(images)
    mse = (scaled - logits).square().sum() / size**2
    assert torch.allclose(oblivious.extras["initial_loss"], mse.view(1), atol=1e-6)
    embedding = L2CAF(model, "features", iterations=1, classifier=False)
    refs = torch.randn(2, 4)
    units = refs / refs.norm(dim=1, keepdim=True)
    kept = ((scaled - logits) @ units.T).square().mean() / size**2  # <FT - NT, r_k>^2
    out = embedding(images, target=refs)
    assert torch.allclose(out.extras["initial_loss"], kept.view(1), atol=1e-6)
    # not scale-invariant: scaling the references changes nothing, scaling the filter does
    assert torch.allclose(embedding(images, target=3 * refs).extras["initial_loss"], kept.view(1))


def test_losses_do_not_depend_on_the_size_of_the_output():
    torch.manual_seed(5)
    model = RegionNet().eval()
    images = torch.rand(2, 3, 8, 8)
    ref = torch.randn(3, 4)
    small = L2CAF(model, "features", iterations=40, classifier=False)(images, target=ref)
    with torch.no_grad():
        model.fc.weight.mul_(100.0)
        model.fc.bias.mul_(100.0)
    large = L2CAF(model, "features", iterations=40, classifier=False)(images, target=ref)
    torch.testing.assert_close(small.extras["initial_loss"], large.extras["initial_loss"])
    torch.testing.assert_close(small.raw, large.raw, atol=1e-5, rtol=1e-4)


def test_fast_equals_slow_and_batched_equals_single():
    torch.manual_seed(2)
    model = conv4(width=0.25, embedding_dim=8).eval()
    images = torch.rand(2, 3, 48, 48)  # 3x3 at block4
    ref = torch.randn(8)
    fast = L2CAF(model, "block4", iterations=30, fast=True)(images, target=ref)
    slow = L2CAF(model, "block4", iterations=30, fast=False)(images, target=ref)
    assert torch.allclose(fast.raw, slow.raw, atol=1e-5)
    single = L2CAF(model, "block4", iterations=30)(images[1:], target=ref)
    assert torch.allclose(fast.raw[1:], single.raw, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # no gradient left on the model


def test_convergence_check_stops_early():
    torch.manual_seed(3)
    model = RegionNet().eval()
    explanation = L2CAF(model, "features", iterations=1000, tolerance=1e9)(torch.rand(1, 3, 8, 8))
    assert int(explanation.extras["iterations"][0]) == 51  # checks at 0 and 50


def test_bad_arguments_and_fast_mode_limits():
    model = RegionNet().eval()
    with pytest.raises(ValueError, match="iterations"):
        L2CAF(model, "features", iterations=0)
    with pytest.raises(ValueError, match="lr"):
        L2CAF(model, "features", lr=-1)


def test_fast_mode_on_a_nested_layer_falls_back_to_the_whole_model():
    torch.manual_seed(4)
    net = conv4(width=0.25).eval()
    images = torch.rand(2, 3, 84, 84)
    nested = L2CAF(net, "block4.conv", iterations=15)(images)  # no shortcut after it
    slow = L2CAF(net, "block4.conv", iterations=15, fast=False)(images)
    assert nested.extras["tail"] == "model"
    torch.testing.assert_close(nested.raw, slow.raw)
    top = L2CAF(net, "block4", iterations=15)(images)
    assert top.extras["tail"] in ("children", "head")
    torch.testing.assert_close(
        top.raw, L2CAF(net, "block4", iterations=15, fast=False)(images).raw, atol=1e-5, rtol=1e-4
    )
