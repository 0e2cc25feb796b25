"""Score-FAM: equals a plain per-channel loop; skips constant maps; top_k; known region."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fam_core.explainers.fam.scorefam import ScoreFAM
from fam_core.models.backbones import conv4


def _loop_reference(model, layer, images, refs):
    """Score-CAM eq. 7 written as the plainest loop: one masked image at a time."""
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        outputs = model(images)
    handle.remove()
    activations = captured[0]
    weights = torch.zeros(activations.shape[:2])
    for b in range(images.shape[0]):
        baseline = F.cosine_similarity(outputs[b : b + 1], refs, dim=1).mean()
        differences = {}
        for n in range(activations.shape[1]):
            a = activations[b, n]
            if a.max() == a.min():
                continue
            up = F.interpolate(a[None, None], size=images.shape[-2:], mode="bilinear")[0, 0]
            mask = (up - up.min()) / (up.max() - up.min())
            with torch.no_grad():
                out = model(images[b : b + 1] * mask)
            differences[n] = F.cosine_similarity(out, refs, dim=1).mean() - baseline
        soft = torch.softmax(torch.stack(list(differences.values())), dim=0)
        for n, w in zip(differences, soft, strict=True):
            weights[b, n] = w
    raw = torch.relu(torch.einsum("bn,bnhw->bhw", weights, activations))
    return weights, raw


class ConstantChannels(nn.Module):
    """Zeroes the first ``count`` channels: their maps are constant."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def forward(self, x):
        return torch.cat([torch.zeros_like(x[:, : self.count]), x[:, self.count :]], dim=1)


def test_equals_plain_per_channel_loop_and_skips_constant_maps():
    torch.manual_seed(0)
    model = conv4(width=0.125, embedding_dim=6).eval()  # 8 channels
    model.block4.add_module("zero", ConstantChannels(2))
    images, refs = torch.rand(2, 3, 84, 84), torch.randn(3, 6)
    calls = []
    handle = model.block1.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    try:
        explanation = ScoreFAM(model, "block4", batch_size=5)(images, target=refs)
    finally:
        handle.remove()
    weights, raw = _loop_reference(model, "block4", images, refs)
    assert torch.allclose(explanation.weights, weights, atol=1e-5)
    assert torch.allclose(explanation.raw, raw, atol=1e-5)
    assert (explanation.weights[:, :2] == 0).all()
    # one plain forward + 2 images x 6 varying channels in batches of 5 = 12 masked inputs
    assert calls == [2, 5, 5, 2]
    assert explanation.extras["evaluated"][:, :2].sum() == 0
    assert torch.allclose(explanation.weights.sum(dim=1), torch.ones(2))


def test_batch_size_does_not_change_the_result():
    torch.manual_seed(1)
    model = conv4(width=0.125, num_classes=4).eval()
    images = torch.rand(2, 3, 84, 84)
    a = ScoreFAM(model, "block4", batch_size=1)(images, target=[0, 3])
    b = ScoreFAM(model, "block4", batch_size=64)(images, target=[0, 3])
    assert torch.allclose(a.weights, b.weights, atol=1e-6)
    # class target: the baseline score is the logit
    assert torch.allclose(a.scores, model(images)[[0, 1], [0, 3]].detach(), atol=1e-6)


def test_top_k_runs_the_channels_with_largest_fam_contributions():
    torch.manual_seed(2)
    model = conv4(width=0.25, embedding_dim=8).eval()  # 16 channels
    images, refs = torch.rand(1, 3, 84, 84), torch.randn(8)
    exact = ScoreFAM(model, "block4")(images, target=refs)
    fam_channels = ScoreFAM(model, "block4")._fam(images, target=refs)
    expected = fam_channels.extras["channel_contributions"][0].topk(4).indices
    for rest in ("baseline", "zero"):
        approx = ScoreFAM(model, "block4", top_k=4, top_k_rest=rest)(images, target=refs)
        evaluated = approx.extras["evaluated"][0]
        assert sorted(evaluated.nonzero().flatten().tolist()) == sorted(expected.tolist())
        d = approx.extras["differences"][0]
        assert torch.allclose(d[evaluated], exact.extras["differences"][0][evaluated], atol=1e-6)
        if rest == "zero":
            assert (approx.weights[0][~evaluated] == 0).all()
        else:  # unevaluated channels get the neutral difference 0
            others = approx.weights[0][~evaluated]
            assert torch.allclose(others, others[0].expand_as(others))
            assert torch.allclose(others[0], torch.softmax(d, 0)[~evaluated][0])


class RegionModel(nn.Module):
    """Output depends only on the top-left 8x8 quarter of a 16x16 input (1x1 conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        self.head = nn.Linear(3, 4, bias=False)
        self.is_classifier = False

    def forward(self, x):
        a = torch.relu(self.conv(x))
        return self.head(a[:, :, :8, :8].mean(dim=(2, 3)))


def test_mass_lies_in_the_region_the_output_depends_on():
    torch.manual_seed(3)
    images = torch.zeros(1, 3, 16, 16)
    images[0, 0, 2:6, 2:6] = 1.0  # red square inside the region
    images[0, 1, 10:14, 10:14] = 1.0  # green square outside
    images[0, 2, 2:6, 10:14] = 1.0  # blue square outside
    model = RegionModel().eval()
    explanation = ScoreFAM(model, "conv", head=model.head)(images)
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[:8, :8] = True
    mass = explanation.maps[0]
    assert mass[region].sum() / mass.sum() > 0.5
    assert explanation.weights[0, 0] > explanation.weights[0, 1:].max()


def test_bad_arguments():
    model = conv4(width=0.125).eval()
    with pytest.raises(ValueError, match="batch_size"):
        ScoreFAM(model, batch_size=0)
    with pytest.raises(ValueError, match="top_k"):
        ScoreFAM(model, top_k=0)
    with pytest.raises(ValueError, match="top_k_rest"):
        ScoreFAM(model, top_k_rest="drop")
