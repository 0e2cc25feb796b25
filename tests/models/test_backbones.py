"""Tests for fam_core.models.backbones: shapes, layout, parameter counts, options, validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fam_core.anatomy.pooling import global_pool
from fam_core.models.backbones import (
    BACKBONES,
    LEAKY_RELU_SLOPE,
    EmbeddingNet,
    build_backbone,
    conv4,
    conv64f,
    resnet12,
    resnet18,
)

# (channels, h, w) of the last stage at 84x84 and the parameter count without embed / fc.
EXPECTED_84 = {
    "conv4": ((64, 5, 5), 112_832),
    "conv4s8": ((64, 10, 10), 112_832),
    "conv64f": ((64, 21, 21), 112_832),
    "resnet12": ((640, 5, 5), 12_424_320),
    "resnet18": ((512, 3, 3), 11_176_512),
}
STAGES = {
    "conv4": ["block1", "block2", "block3", "block4"],
    "conv4s8": ["block1", "block2", "block3", "block4"],
    "conv64f": ["block1", "block2", "block3", "block4"],
    "resnet12": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4"],
}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_backbone_names() -> None:
    assert BACKBONES == ("conv4", "conv4s8", "conv64f", "resnet12", "resnet18")


@pytest.mark.parametrize("name", BACKBONES)
def test_feature_map_output_and_parameter_count_at_84(name: str) -> None:
    (channels, h, w), params = EXPECTED_84[name]
    net = build_backbone(name).eval()
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        assert net.features(x).shape == (2, channels, h, w)
        assert net(x).shape == (2, channels)
    assert n_params(net) == params
    assert net.feature_channels == channels == net.output_dim
    assert net.default_target_layer == STAGES[name][-1]
    assert net.stage_names == tuple(STAGES[name])
    assert not net.is_classifier


def test_conv4s8_is_conv4_without_the_last_maxpool() -> None:
    """Same weights: pooling Conv4-s8's 10x10 map 2x2 gives Conv4's 5x5 map exactly."""
    coarse = conv4(width=0.25).eval()
    fine = build_backbone("conv4s8", width=0.25).eval()
    fine.load_state_dict(coarse.state_dict())  # same parameter names and shapes
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        fine_map = fine.features(x)
        assert fine_map.shape == (2, 16, 10, 10)
        torch.testing.assert_close(
            nn.functional.max_pool2d(fine_map, 2), coarse.features(x), rtol=0, atol=0
        )
    assert not hasattr(fine.block4, "pool") and hasattr(fine.block3, "pool")


def test_parameter_counts_match_closed_forms() -> None:
    def bn(c: int) -> int:
        return 2 * c

    conv_block = (9 * 3 * 64 + bn(64)) + 3 * (9 * 64 * 64 + bn(64))
    assert EXPECTED_84["conv4"][1] == conv_block == EXPECTED_84["conv64f"][1]
    assert EXPECTED_84["conv4s8"][1] == conv_block

    def res12_block(cin: int, c: int) -> int:
        return 9 * cin * c + 2 * 9 * c * c + 3 * bn(c) + cin * c + bn(c)

    chans = [3, 64, 160, 320, 640]
    assert EXPECTED_84["resnet12"][1] == sum(
        res12_block(a, b) for a, b in zip(chans, chans[1:], strict=False)
    )


def test_resnet18_matches_torchvision_at_224() -> None:
    net = resnet18(num_classes=1000).eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        assert net.features(x).shape == (1, 512, 7, 7)
        assert net(x).shape == (1, 1000)
    assert n_params(net) == 11_689_512  # torchvision.models.resnet18()
    keys = [k.removeprefix("stem.") for k in net.state_dict()]
    assert len(keys) == 122  # len(torchvision.models.resnet18().state_dict())
    for key in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.1.conv2.weight",
        "layer2.0.downsample.0.weight",
        "layer4.0.downsample.1.num_batches_tracked",
        "layer4.1.bn2.bias",
        "fc.weight",
        "fc.bias",
    ):
        assert key in keys
    assert "layer1.0.downsample.0.weight" not in keys
    assert net.stem.conv1.kernel_size == (7, 7) and net.stem.conv1.stride == (2, 2)
    assert net.stem.maxpool.kernel_size == 3 and net.stem.maxpool.stride == 2
    assert isinstance(net.stem.act, nn.ReLU)


@pytest.mark.parametrize("name", BACKBONES)
def test_top_level_children_are_stages_then_head(name: str) -> None:
    net = build_backbone(name, width=0.25, embedding_dim=8, num_classes=3)
    assert [n for n, _ in net.named_children()] == [*STAGES[name], "pool", "embed", "fc"]


@pytest.mark.parametrize("name", BACKBONES)
def test_forward_is_composition_and_equals_walking_children(name: str) -> None:
    net = build_backbone(name, width=0.25, embedding_dim=8, num_classes=3).eval()
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        out = net(x)
        composed = net.fc(net.embed(net.pool(net.features(x))))
        walked = x
        for _, child in net.named_children():
            walked = child(walked)
        assert out.shape == (2, 3)
        torch.testing.assert_close(out, composed, rtol=0, atol=0)
        torch.testing.assert_close(out, walked, rtol=0, atol=0)
        torch.testing.assert_close(net.embedding(x), net.embed(net.pool(net.features(x))))


def test_embedding_and_classifier_options() -> None:
    x = torch.randn(2, 3, 84, 84)
    plain = conv4()
    assert isinstance(plain.embed, nn.Identity) and isinstance(plain.fc, nn.Identity)

    emb = conv4(embedding_dim=16)
    assert isinstance(emb.embed, nn.Linear) and emb.embed.in_features == 64
    assert emb.output_dim == 16 and emb.embedding_dim == 16 and not emb.is_classifier
    assert emb(x).shape == (2, 16)

    clf = conv4(num_classes=5)
    assert clf.fc.in_features == 64 and clf.output_dim == 5 and clf.is_classifier
    assert clf(x).shape == (2, 5) and clf.embedding(x).shape == (2, 64)

    both = conv4(embedding_dim=16, num_classes=5)
    assert both.fc.in_features == 16 and both.output_dim == 5
    assert both(x).shape == (2, 5) and both.embedding(x).shape == (2, 16)


def test_pooling_options() -> None:
    x = torch.randn(2, 3, 84, 84)
    outputs, features = {}, {}
    for kind in ("avg", "max", "lse", "gem"):
        torch.manual_seed(1)  # identical weights for every pooling kind
        net = conv64f(pooling=kind).eval()
        assert net.pool.kind == kind
        with torch.no_grad():
            features[kind] = net.features(x)
            outputs[kind] = net(x)
        # two forward passes may pick different oneDNN kernels: allow float32 round-off
        torch.testing.assert_close(
            outputs[kind], global_pool(features[kind], kind), atol=2e-4, rtol=1e-3
        )
    feats = features["avg"]
    torch.testing.assert_close(features["max"], feats, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(outputs["max"], feats.amax(dim=(2, 3)), atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(outputs["avg"], feats.mean(dim=(2, 3)), atol=2e-4, rtol=1e-3)
    assert (outputs["max"] >= outputs["avg"]).all()
    assert (outputs["max"] - outputs["avg"]).abs().max() > 0.1
    assert not torch.allclose(outputs["lse"], outputs["avg"])
    assert not torch.allclose(outputs["gem"], outputs["avg"])


def test_activation_defaults_and_switch() -> None:
    def activations(net: nn.Module) -> set[type]:
        return {type(m) for m in net.modules() if isinstance(m, nn.ReLU | nn.LeakyReLU)}

    for factory in (conv4, conv64f, resnet12):
        net = factory(width=0.25)
        assert activations(net) == {nn.LeakyReLU}
        assert {m.negative_slope for m in net.modules() if isinstance(m, nn.LeakyReLU)} == {
            LEAKY_RELU_SLOPE
        }
        assert activations(factory(width=0.25, activation="relu")) == {nn.ReLU}
    assert activations(resnet18(width=0.25)) == {nn.ReLU}
    assert activations(resnet18(width=0.25, activation="leaky_relu")) == {nn.LeakyReLU}


@pytest.mark.parametrize("name", BACKBONES)
def test_no_in_place_ops_so_hooked_activations_stay_intact(name: str) -> None:
    net = build_backbone(name, width=0.25, num_classes=3).eval()
    assert not any(getattr(m, "inplace", False) for m in net.modules())
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        captured.append((output, output.detach().clone()))

    handles = [m.register_forward_hook(hook) for m in net.modules() if m is not net]
    with torch.no_grad():
        net(torch.randn(2, 3, 84, 84))
    for handle in handles:
        handle.remove()
    assert len(captured) > 10
    for live, snapshot in captured:
        assert torch.equal(live, snapshot)


def test_residual_blocks_shapes() -> None:
    net = resnet12()
    assert [net.get_submodule(f"layer{i}").conv1.out_channels for i in range(1, 5)] == [
        64,
        160,
        320,
        640,
    ]
    assert isinstance(net.stem, nn.Identity)
    assert net.layer1.downsample[0].kernel_size == (1, 1)


def test_width_and_in_channels() -> None:
    assert resnet12(width=0.5).feature_channels == 320
    assert resnet18(width=0.5).feature_channels == 256
    assert conv4(width=0.5).feature_channels == 32
    net = conv4(in_channels=1).eval()
    assert net(torch.randn(2, 1, 84, 84)).shape == (2, 64)


def test_weight_init() -> None:
    net = resnet12()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    w = net.layer4.conv2.weight  # kaiming normal, fan_out = 640 * 3 * 3
    expected_std = math.sqrt(2.0 / (1 + LEAKY_RELU_SLOPE**2)) / math.sqrt(640 * 9)
    assert w.std().item() == pytest.approx(expected_std, rel=0.01)
    assert abs(w.mean().item()) < 1e-4
    w18 = resnet18().layer4[1].conv2.weight  # relu gain: sqrt(2 / (512 * 9))
    assert w18.std().item() == pytest.approx(math.sqrt(2.0 / (512 * 9)), rel=0.01)


def test_backward_in_training_mode() -> None:
    net = conv4(num_classes=5).train()
    loss = nn.functional.cross_entropy(net(torch.randn(4, 3, 84, 84)), torch.arange(4))
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pooling": "median"},
        {"embedding_dim": 0},
        {"embedding_dim": -3},
        {"embedding_dim": 2.5},
        {"embedding_dim": True},
        {"num_classes": 0},
        {"activation": "gelu"},
        {"width": 0},
        {"width": -1.0},
        {"width": float("nan")},
        {"width": float("inf")},
        {"in_channels": 0},
    ],
)
@pytest.mark.parametrize("name", BACKBONES)
def test_bad_arguments_raise(name: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        build_backbone(name, **{"width": 0.125, **kwargs})


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="conv4.*conv4s8.*conv64f.*resnet12.*resnet18"):
        build_backbone("vgg16")


def test_embedding_net_validates_stages() -> None:
    with pytest.raises(ValueError):
        EmbeddingNet([], feature_channels=4)
    with pytest.raises(ValueError, match="unique"):
        EmbeddingNet([("a", nn.Identity()), ("a", nn.Identity())], feature_channels=4)
    with pytest.raises(ValueError, match="reserved"):
        EmbeddingNet([("pool", nn.Identity())], feature_channels=4)
    with pytest.raises(ValueError):
        EmbeddingNet([("a", nn.Identity())], feature_channels=0)
