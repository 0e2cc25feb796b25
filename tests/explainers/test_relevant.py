"""Relevant features (Oramas et al.): descriptor by hand, mu-Lasso recovery, top-k, save/load,
and the feature ablation check of sec. 4.1 on the default classifier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fam_core
from fam_core.data.flowers import make_flowers
from fam_core.explainers.relevant.relevant import (
    RelevantFeatures,
    default_feature_layers,
    descriptor_from_responses,
    features,
    top_positive,
)
from fam_core.explainers.relevant.relevant_ablation import ablated_accuracy, ablation_check
from fam_core.explainers.relevant.removal import removal_points
from fam_core.models.backbones import ResNet12Block, conv4


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


# -- interpretation by average image patches (sec. 3.2) and receptive fields


def test_receptive_field_by_hand_on_a_conv_pool_stack():
    from fam_core.explainers.relevant.receptive_field import receptive_field

    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # size 3, stride 1, start -1
        nn.ReLU(),
        nn.MaxPool2d(2),  # 3 + 1*1 = 4, stride 2, start -1
        nn.Sequential(nn.Conv2d(4, 4, (3, 5), stride=2, dilation=(1, 2), padding=(0, 2))),
        nn.AvgPool2d(3, stride=1, padding=1),
    )
    # rows: 4 + 2*1*2 = 8, stride 4, start -1; cols: 4 + 4*2*2 = 20, stride 4, start -1 - 2*2 = -5
    rf = receptive_field(net, "3.0")
    assert (rf.size, rf.stride, rf.start) == ((8, 20), (4, 4), (-1, -5))
    # AvgPool 3 (pad 1): size + 2*4 = (16, 28), stride 4, start - 1*4
    rf = receptive_field(net, "4")
    assert (rf.size, rf.stride, rf.start) == ((16, 28), (4, 4), (-5, -9))
    assert receptive_field(net, "1").size == (3, 3)
    assert rf.boxes(torch.tensor([[1, 2]])).tolist() == [[-9 + 8, -5 + 4, -1 + 28, -1 + 16]]


def test_receptive_field_equals_the_gradient_support_of_one_unit():
    from fam_core.explainers.relevant.receptive_field import receptive_field

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.AvgPool2d(2),
        nn.Conv2d(2, 2, 3, stride=2, dilation=2, padding=1),
        nn.Conv2d(2, 1, (3, 1), padding=(1, 0)),
    )
    with torch.no_grad():
        for module in net:
            if isinstance(module, nn.Conv2d):
                module.weight.uniform_(0.1, 1.0)  # positive: no cancellation in the support
    image = torch.rand(1, 1, 40, 40, requires_grad=True)
    out = net(image)
    field = receptive_field(net, "3")
    for row, col in [(4, 5), (0, 0)]:
        (grad,) = torch.autograd.grad(out[0, 0, row, col], image, retain_graph=True)
        ys, xs = grad[0, 0].nonzero(as_tuple=True)
        x0, y0, x1, y1 = field.boxes(torch.tensor([[row, col]]))[0].tolist()
        support = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
        if row > 0:  # interior unit: the support spans exactly the receptive field
            assert support == (y0, y1, x0, x1)
        else:  # border unit: the field reaches into the padding; the support stays inside it
            assert y0 < 0 and x0 < 0
            assert y0 <= support[0] and support[1] <= y1 and x0 <= support[2] and support[3] <= x1


def test_receptive_field_rejects_modules_it_cannot_analyse():
    from fam_core.explainers.relevant.receptive_field import receptive_field

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2), nn.Conv2d(4, 4, 1))
    with pytest.raises(ValueError, match="'1' .AdaptiveAvgPool2d"):
        receptive_field(net, "2")
    with pytest.raises(ValueError, match="unknown layer"):
        receptive_field(net, "9")


def test_crop_pads_outside_the_image_with_the_image_mean():
    from fam_core.explainers.relevant.receptive_field import crop

    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    out = crop(images, torch.tensor([1, 0]), torch.tensor([[-1, -1, 2, 2], [2, 1, 5, 4]]))
    assert out.shape == (2, 3, 3, 3)
    mean1 = images[1].mean(dim=(1, 2))
    assert torch.equal(out[0, :, 0, :], mean1[:, None].expand(3, 3))
    assert torch.equal(out[0, :, :, 0], mean1[:, None].expand(3, 3))
    assert torch.equal(out[0, :, 1:, 1:], images[1, :, :2, :2])
    assert torch.equal(out[1, :, :, :2], images[0, :, 1:4, 2:4])
    assert torch.equal(out[1, :, :, 2], images[0].mean(dim=(1, 2))[:, None].expand(3, 3))


class _PatchDetector(nn.Module):
    """shift (1x1 conv, padding 1: start -1) -> sum over 3x3 windows with stride 2.

    On a zero background with a positive 3x3 patch whose top-left corner (y, x) is odd, the
    response peaks exactly at unit ((y + 1) / 2, (x + 1) / 2), whose field is the patch."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Conv2d(3, 3, 1, padding=1, bias=False)
        self.window = nn.Conv2d(3, 2, 3, stride=2, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.shift.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.window.weight.fill_(1.0)
            self.window.weight[1].mul_(-1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.window(self.shift(x))).flatten(1))


def _planted(count: int = 6, size: int = 16):
    g = torch.Generator().manual_seed(3)
    patch = torch.rand(3, 3, 3, generator=g) * 0.5 + 0.1  # strictly positive, x1.5 <= 1
    images = torch.zeros(count, 3, size, size)
    corners = torch.randint(0, (size - 3) // 2, (count, 2), generator=g) * 2 + 1  # odd
    for i, (y, x) in enumerate(corners.tolist()):
        images[i, :, y : y + 3, x : x + 3] = patch * (1.0 + 0.1 * i)  # image 5 responds most
    return patch, images, corners


def test_interpret_averages_the_planted_patch_at_the_right_positions():
    patch, images, corners = _planted()
    explainer = RelevantFeatures(_PatchDetector().eval(), layers=["shift", "window"])
    result = explainer.interpret(images, top_n=3, features=[("window", 0)], shown=2)
    (item,) = result.features
    assert (item.receptive_field.size, item.receptive_field.stride) == ((3, 3), (2, 2))
    assert item.receptive_field.start == (-1, -1)
    assert item.image_indices.tolist() == [5, 4, 3]  # largest planted contrast first
    expected_patch = patch * (1.0 + 0.1 * torch.tensor([5.0, 4.0, 3.0])).mean()
    assert torch.allclose(item.average_crop, expected_patch, atol=1e-5)
    chosen = corners[item.image_indices]
    assert torch.equal(item.positions, (chosen + 1) // 2)
    assert torch.equal(item.boxes[:, :2], chosen.flip(1))  # (x0, y0)
    assert torch.equal(item.boxes[:, 2:] - item.boxes[:, :2], torch.full((3, 2), 3))
    assert torch.allclose(item.top_crops[0], patch * 1.5, atol=1e-5)
    assert item.top_crops.shape == (2, 3, 3, 3)
    assert torch.allclose(item.responses[:2], item.top_crops.sum(dim=(1, 2, 3)), atol=1e-5)


def test_interpret_defaults_linear_layers_and_validation():
    _, images, _ = _planted()
    model = _PatchDetector().eval()
    explainer = RelevantFeatures(model, layers=["window", "fc"])
    explainer.relevance = torch.zeros(3, 2)
    explainer.layer_sizes = [2, 1]
    with pytest.raises(ValueError, match="no relevant features"):
        explainer.interpret(images)
    explainer.relevance[1, 0] = 0.5  # ("window", 1) is relevant
    result = explainer.interpret(images, top_n=100, features=[("fc", 1), *[("window", 1)]])
    linear, window = result.features
    assert linear.average_crop.shape == (3, 16, 16)  # a Linear feature sees the whole image
    assert torch.allclose(linear.average_crop, images.mean(dim=0), atol=1e-6)  # all 6 images
    # ("window", 1) is minus the patch sum: its maxima are zero windows, whose crops average 0
    assert window.image_indices.shape == (6,)
    assert (explainer.interpret(images, top_n=2).features[0].layer, 1) == ("window", 1)
    with pytest.raises(ValueError, match="not in this explainer's layers"):
        explainer.interpret(images, features=[("shift", 0)])
    with pytest.raises(ValueError, match="C > channel"):
        explainer.interpret(images, features=[("window", 7)])
    with pytest.raises(ValueError, match="top_n"):
        explainer.interpret(images, top_n=0, features=[("window", 0)])


def test_render_interpretation_puts_average_then_top_crops_in_rows():
    from fam_core.explainers.relevant.relevant import render_interpretation

    _, images, _ = _planted()
    explainer = RelevantFeatures(_PatchDetector().eval(), layers=["shift", "window"])
    result = explainer.interpret(images, top_n=4, features=[("window", 0), ("shift", 2)], shown=2)
    figure = render_interpretation(result, dpi=40)
    assert figure.dtype == torch.uint8 and figure.dim() == 3 and figure.shape[-1] == 3
    wide = render_interpretation(result, shown=1, dpi=40)
    assert wide.shape[1] < figure.shape[1]  # one column fewer


class ShiftNet(nn.Module):
    """1x1 conv (channel 0 = red, 1 = green), BatchNorm shifting both by +1, ReLU, mean,
    identity classifier: red images are class 0, green ones class 1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.act = nn.ReLU()
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0]]).view(2, 3, 1, 1))
            self.bn.bias.fill_(1.0)  # running mean 0, var 1, weight 1: BN adds 1
            self.fc.weight.copy_(torch.eye(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.bn(self.conv(x))).mean(dim=(2, 3)))


def test_a_filter_is_removed_after_batchnorm_and_activation():
    model = ShiftNet().eval()
    images = torch.zeros(4, 3, 2, 2)
    images[:2, 0] = 2.0  # red: class 0
    images[2:, 1] = 2.0  # green: class 1
    labels = torch.tensor([0, 0, 1, 1])
    assert removal_points(model, ["conv"], images[:1]) == ["act"]
    # zeroing the conv's red channel leaves BN's shift: red images score (0 + 1, 0 + 1) and
    # argmax takes class 0 on the tie, green ones (1, 3): nothing is lost
    assert ablated_accuracy(model, images, labels, {model.conv: [0]}) == 1.0
    # removed after the ReLU: red images score (0, 1) -> class 1, wrong; green (0, 3) right
    assert ablated_accuracy(model, images, labels, {model.act: [0]}) == 0.5
    rf = RelevantFeatures(model, ["conv"], classifier=True).fit(images, labels, mu=1.0)
    report = ablation_check(rf, images, labels, features=[("conv", 0)], repeats=2)
    assert report.baseline_accuracy == 1.0 and report.selected_accuracy == 0.5


def test_removal_points_follow_the_dataflow():
    net = conv4(width=0.25, num_classes=3).eval()
    names = [f"block{i}.conv" for i in range(1, 5)]
    image = torch.rand(1, 3, 32, 32)
    points = removal_points(net, names, image)
    assert points == [f"block{i}.act" for i in range(1, 5)]  # conv -> BN -> activation
    shared = nn.ReLU()  # one ReLU module used twice (as torchvision's BasicBlock does)
    net2 = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2), shared, nn.Conv2d(2, 2, 1), shared)
    assert removal_points(net2.eval(), ["0", "3"], image) == ["1", "3"]
    block = ResNet12Block(3, 4, nn.ReLU).eval()  # conv3 -> bn3 -> residual sum: stop at bn3
    assert removal_points(block, ["conv1", "conv3"], image) == ["act1", "bn3"]
