"""Guided backprop / deconvnet rules by hand, and the stride fix's effect on artifacts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fam_core.explainers.backprop.deconvnet import (
    Deconvnet,
    GuidedBackprop,
    backprop_rules,
    input_signal,
    stride_one_size,
)
from fam_core.models.backbones import conv4


def exact(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Hand-computed small integers: equal up to float rounding on any CPU."""
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def _net(w1, w2):
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False)
    )
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor(w1))
        net[3].weight.copy_(torch.tensor(w2))
    return net


def test_rectifier_rules_by_hand():
    # h = W1 x = (1, -1) for x = (1, 0); y = W2 relu(h) with W2 = (-2, 3)
    net = _net([[1.0, 0.0], [-1.0, 0.0]], [[-2.0, 3.0]])
    x = torch.tensor([[[[1.0, 0.0]]]])
    results = {}
    for rule in ("gradient", "guided", "deconvnet"):
        inputs = x.clone().requires_grad_(True)
        with backprop_rules(net, rule):
            (results[rule],) = torch.autograd.grad(net(inputs).sum(), inputs)
    # R at the ReLU = (-2, 3); the ReLU's forward mask = (1, 0)
    # gradient:  R * mask = (-2, 0)            -> W1^T (-2, 0) = (-2, 0)
    # guided:    max(R, 0) * mask = (0, 0)     -> (0, 0)
    # deconvnet: max(R, 0) = (0, 3)            -> W1^T (0, 3) = (-3, 0)
    exact(results["gradient"].flatten(), torch.tensor([-2.0, 0.0]))
    exact(results["guided"].flatten(), torch.tensor([0.0, 0.0]))
    exact(results["deconvnet"].flatten(), torch.tensor([-3.0, 0.0]))
    # hooks are gone afterwards: plain gradient again
    inputs = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(net(inputs).sum(), inputs)
    exact(plain, results["gradient"])


def test_stride_fix_on_max_pool_by_hand():
    pool = nn.MaxPool2d(2)
    x = torch.arange(16.0).view(1, 1, 4, 4).flip(-1).requires_grad_(True)
    assert stride_one_size(pool, (4, 4)) == (3, 3)
    with backprop_rules(pool, "gradient", stride_fix=True):
        (fixed,) = torch.autograd.grad(pool(x), x, torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]))
    # nearest resampling of the 2x2 signal to 3x3: [[1,1,2],[1,1,2],[3,3,4]]; each stride-1
    # 2x2 window sends its value to its maximum (the top-left element of x flipped = left)
    resampled = torch.tensor([[1.0, 1.0, 2.0], [1.0, 1.0, 2.0], [3.0, 3.0, 4.0]])
    expected = torch.zeros(4, 4)
    values = x.detach()[0, 0]
    for i in range(3):
        for j in range(3):
            window = values[i : i + 2, j : j + 2]
            k = int(window.argmax())
            expected[i + k // 2, j + k % 2] += resampled[i, j]
    exact(fixed[0, 0], expected)
    (plain,) = torch.autograd.grad(pool(x), x, torch.ones(1, 1, 2, 2))
    assert int((plain != 0).sum()) == 4  # strided: one input per window (the grid)


def test_stride_fix_on_strided_conv_is_stride_one_transpose():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False)
    x = torch.rand(1, 2, 9, 9, requires_grad=True)
    grad = torch.rand(1, 3, 5, 5)
    with backprop_rules(conv, "gradient", stride_fix=True):
        (fixed,) = torch.autograd.grad(conv(x), x, grad)
    resampled = torch.nn.functional.interpolate(grad, size=(9, 9), mode="nearest")
    expected = torch.nn.functional.conv_transpose2d(resampled, conv.weight, padding=1)
    assert torch.allclose(fixed, expected, atol=1e-6)


def _high_frequency_share(maps, cutoff=0.25):
    centred = maps - maps.mean(dim=(1, 2), keepdim=True)
    power = torch.fft.fft2(centred).abs().square()
    fy = torch.fft.fftfreq(maps.shape[1]).view(-1, 1)
    fx = torch.fft.fftfreq(maps.shape[2]).view(1, -1)
    high = (fy.square() + fx.square()).sqrt() > cutoff
    return power[:, high].sum(dim=1) / power.sum(dim=(1, 2))


@pytest.mark.parametrize("explainer_type", [Deconvnet, GuidedBackprop])
def test_stride_fix_removes_high_frequency_energy_on_a_smooth_input(explainer_type):
    torch.manual_seed(0)
    model = conv4().eval()  # four 2x2 max pools of stride 2
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 84), torch.linspace(-1, 1, 84), indexing="ij")
    blob = 0.5 + 0.4 * torch.exp(-(xx**2 + yy**2) / 0.3)
    smooth = torch.stack([blob, 0.5 + 0.3 * xx, 0.5 + 0.3 * yy]).unsqueeze(0)
    plain = explainer_type(model, stride_fix=False)(smooth)
    fixed = explainer_type(model, stride_fix=True)(smooth)
    before, after = _high_frequency_share(plain.raw), _high_frequency_share(fixed.raw)
    # measured: 0.63 -> 0.13 (deconvnet), 0.65 -> 0.03 (guided) for this seed
    assert after < 0.5 * before
    assert fixed.maps.min() == 0 and abs(fixed.maps.max() - 1) < 1e-6  # min_max: a reciprocal


def test_explainer_signal_matches_the_rules_directly():
    torch.manual_seed(1)
    model = conv4(width=0.25, num_classes=3).eval()
    images = torch.rand(2, 3, 84, 84)
    explanation = Deconvnet(model)(images, target=[0, 2])
    inputs = images.clone().requires_grad_(True)
    with backprop_rules(model, "deconvnet"):
        logits = model(inputs)
        (signal,) = torch.autograd.grad(logits[[0, 1], [0, 2]].sum(), inputs)
    assert torch.allclose(explanation.extras["signal"], signal)
    assert torch.allclose(explanation.raw, signal.abs().amax(dim=1))
    assert torch.allclose(explanation.weights, signal.sum(dim=(2, 3)))
    assert torch.allclose(explanation.scores, logits[[0, 1], [0, 2]].detach())


def test_input_signal_from_one_channel():
    torch.manual_seed(2)
    model = conv4(width=0.25).eval()
    images = torch.rand(1, 3, 84, 84)
    signal = input_signal(model, images, model.block2.conv, 3, rule="gradient")
    inputs = images.clone().requires_grad_(True)
    out = model.block2.conv(model.block1(inputs))
    (expected,) = torch.autograd.grad((out[:, 3] * out[:, 3].detach()).sum(), inputs)
    assert torch.allclose(signal, expected, atol=1e-6)
    with pytest.raises(ValueError, match="channel"):
        input_signal(model, images, model.block2.conv, 99)
    with pytest.raises(ValueError, match="backprop rule"), backprop_rules(model, "lrp"):
        pass


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_self_target_sends_the_embedding_itself_back_by_hand(similarity):
    # x = (1, 0): h = W1 x = (1, -1), relu(h) = (1, 0), Z = W2 relu(h) = (2, 1)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False)
    )
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 2.0]]))
        net[3].weight.copy_(torch.tensor([[2.0, 3.0], [1.0, -1.0]]))
    x = torch.tensor([[[[1.0, 0.0]]]])
    options = {"similarity": similarity, "task": "embedding"}
    deconv = Deconvnet(net, "1", **options)(x)  # target None: the embedding explains itself
    guided = GuidedBackprop(net, "1", **options)(x)
    # the seed is Z = (2, 1) itself; at the ReLU R = W2^T Z = (5, 5), its forward mask (1, 0)
    # deconvnet: max(R, 0) = (5, 5)          -> W1^T (5, 5) = (0, 10)
    # guided:    max(R, 0) * mask = (5, 0)   -> W1^T (5, 0) = (5, 0)
    exact(deconv.extras["signal"].flatten(), torch.tensor([0.0, 10.0]))
    exact(guided.extras["signal"].flatten(), torch.tensor([5.0, 0.0]))
    exact(deconv.raw.flatten(), torch.tensor([0.0, 10.0]))
    exact(deconv.weights.flatten(), torch.tensor([10.0]))
    exact(deconv.maps.flatten(), torch.tensor([0.0, 1.0]))
    # the explained score is s(Z, Z), as every method reports it: cos = 1, <Z, Z> = 5
    expected = torch.tensor([1.0 if similarity == "cosine" else 5.0])
    for explanation in (deconv, guided):
        assert torch.allclose(explanation.scores, expected, atol=1e-6)
