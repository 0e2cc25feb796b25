"""CNN backbones used in the FAM paper (Liao et al.): Conv4Net, Conv64F, ResNet12 and ResNet18,
plus Conv4-s8, Conv4 with an 8x (not 16x) downsampling for finer maps.

Every backbone is an :class:`EmbeddingNet` whose top-level children are flat and registered in
forward order, so an explainer can address a layer by name and run "everything after the target
layer" by walking :meth:`torch.nn.Module.named_children`:

- feature stages: ``block1`` .. ``block4`` (Conv4, Conv4-s8, Conv64F) or ``stem``, ``layer1`` .. ``layer4``
  (ResNets; ResNet12 has no stem of its own, so its ``stem`` is an :class:`torch.nn.Identity` and
  the stage names are the same for both ResNets);
- ``pool``: :class:`fam_core.anatomy.pooling.GlobalPool`, feature map ``[B, C, h, w]`` -> ``[B, C]``;
- ``embed``: optional ``nn.Linear(C, embedding_dim)`` (the paper's transformation module),
  ``nn.Identity`` otherwise;
- ``fc``: optional ``nn.Linear(dim, num_classes)`` classifier, ``nn.Identity`` otherwise.

No module works in place (activations use ``inplace=False`` and residual sums are
``out = out + identity``), so tensors captured by forward hooks are never overwritten.
Convolutions have no bias (each is followed by BatchNorm, which makes a bias redundant).

Example:
    >>> net = build_backbone("conv4")
    >>> [name for name, _ in net.named_children()]
    ['block1', 'block2', 'block3', 'block4', 'pool', 'embed', 'fc']
    >>> net(torch.randn(2, 3, 84, 84)).shape
    torch.Size([2, 64])
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from fam_core.anatomy.pooling import GlobalPool, PoolingKind

ActivationKind = Literal["leaky_relu", "relu"]
ACTIVATIONS: tuple[str, ...] = ("leaky_relu", "relu")
LEAKY_RELU_SLOPE = 0.1
"""Negative slope of LeakyReLU for all few-shot backbones (FAM paper, Sec. IV-B)."""

BACKBONES: tuple[str, ...] = ("conv4", "conv4s8", "conv64f", "resnet12", "resnet18")
_RESERVED_NAMES = ("pool", "embed", "fc")


class EmbeddingNet(nn.Module):
    """Feature stages followed by ``pool``, ``embed`` and ``fc``, all flat top-level children.

    ``forward(x) = fc(embed(pool(features(x))))``; the output is ``[B, output_dim]``: an embedding
    (``num_classes is None``) or logits (``is_classifier``).

    Args:
        stages: ``(name, module)`` pairs applied in order; the last one yields the feature map
            explained by FAM. Names must be unique and not ``pool``, ``embed`` or ``fc``.
        feature_channels: number of channels ``C`` of the last stage's output.
        pooling: global pooling kind, one of :data:`fam_core.anatomy.pooling.POOLING_KINDS` (an unknown
            kind raises ``ValueError`` from :class:`fam_core.anatomy.pooling.GlobalPool`).
        embedding_dim: if given, ``embed`` is ``nn.Linear(C, embedding_dim)``.
        num_classes: if given, ``fc`` is a linear classifier onto ``num_classes`` logits.

    Example:
        >>> stages = [("block1", nn.Conv2d(3, 8, 3)), ("block2", nn.Conv2d(8, 16, 3))]
        >>> net = EmbeddingNet(stages, feature_channels=16, embedding_dim=4)
        >>> net.default_target_layer, net.output_dim, net.is_classifier
        ('block2', 4, False)
        >>> net.features(torch.randn(1, 3, 10, 10)).shape
        torch.Size([1, 16, 6, 6])
    """

    def __init__(
        self,
        stages: Sequence[tuple[str, nn.Module]],
        *,
        feature_channels: int,
        pooling: PoolingKind = "avg",
        embedding_dim: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if not stages:
            raise ValueError("EmbeddingNet needs at least one feature stage")
        names = [name for name, _ in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        clashes = sorted(set(names) & set(_RESERVED_NAMES))
        if clashes:
            raise ValueError(f"stage names {clashes} are reserved for the head {_RESERVED_NAMES}")
        _check_positive_int("feature_channels", feature_channels)
        if embedding_dim is not None:
            _check_positive_int("embedding_dim", embedding_dim)
        if num_classes is not None:
            _check_positive_int("num_classes", num_classes)

        for name, module in stages:
            self.add_module(name, module)
        self.pool = GlobalPool(pooling)
        self.embed: nn.Module = (
            nn.Identity() if embedding_dim is None else nn.Linear(feature_channels, embedding_dim)
        )
        embed_dim = feature_channels if embedding_dim is None else embedding_dim
        self.fc: nn.Module = (
            nn.Identity() if num_classes is None else nn.Linear(embed_dim, num_classes)
        )

        self.stage_names: tuple[str, ...] = tuple(names)
        self.default_target_layer: str = names[-1]
        self.feature_channels: int = feature_channels
        self.embedding_dim: int = embed_dim
        self.is_classifier: bool = num_classes is not None
        self.output_dim: int = embed_dim if num_classes is None else num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map ``[B, C, h, w]`` of the last stage (``default_target_layer``)."""
        for name in self.stage_names:
            x = self.get_submodule(name)(x)
        return x

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Output before the classifier, ``embed(pool(features(x)))``: ``[B, embedding_dim]``."""
        return self.embed(self.pool(self.features(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embedding(x))


class ResNet12Block(nn.Module):
    """Few-shot ResNet12 block: three conv3x3-BN-act, 1x1 conv shortcut, act, maxpool 2.

    Example:
        >>> ResNet12Block(3, 64, nn.ReLU)(torch.randn(1, 3, 84, 84)).shape
        torch.Size([1, 64, 42, 42])
    """

    def __init__(self, in_channels: int, out_channels: int, act: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = act()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = act()
        self.conv3 = _conv3x3(out_channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.act3 = act()
        self.maxpool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + self.downsample(x)
        return self.maxpool(self.act3(out))


class BasicBlock(nn.Module):
    """Torchvision ResNet ``BasicBlock`` (same parameter names), with no in-place operation.

    Example:
        >>> BasicBlock(64, 128, nn.ReLU, stride=2)(torch.randn(1, 64, 56, 56)).shape
        torch.Size([1, 128, 28, 28])
    """

    def __init__(
        self, in_channels: int, out_channels: int, act: Callable[[], nn.Module], *, stride: int = 1
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride=stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = act()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module = (
            nn.Identity()
            if stride == 1 and in_channels == out_channels
            else nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        )
        self.act2 = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.downsample(x)
        return self.act2(out)


def _four_block_net(
    pooled_blocks: int,
    pooling: PoolingKind,
    embedding_dim: int | None,
    num_classes: int | None,
    activation: ActivationKind,
    width: float,
    in_channels: int,
) -> EmbeddingNet:
    """``block1``..``block4`` of conv3x3-BN-activation (64 channels x ``width``); the first
    ``pooled_blocks`` max-pool. Conv4, Conv4-s8 and Conv64F differ only there."""
    act = _activation_factory(activation)
    channels = _scaled(64, width)
    _check_positive_int("in_channels", in_channels)
    stages = [
        (
            f"block{i + 1}",
            _conv_block(in_channels if i == 0 else channels, channels, act, pool=i < pooled_blocks),
        )
        for i in range(4)
    ]
    return _finish(stages, channels, activation, pooling, embedding_dim, num_classes)


# conv4, conv4s8 and conv64f spell out the same keyword-only signature on purpose: it is the
# public signature each builder documents and that a config's ``backbone_kwargs`` are passed to.
def conv4(
    *,
    pooling: PoolingKind = "avg",
    embedding_dim: int | None = None,
    num_classes: int | None = None,
    activation: ActivationKind = "leaky_relu",
    width: float = 1.0,
    in_channels: int = 3,
) -> EmbeddingNet:
    """Conv4Net (Prototypical Networks): 4 x [conv3x3-64, BN, activation, maxpool 2].

    ``width`` scales the 64 channels. At 84x84 the feature map is ``[64, 5, 5]``.

    Example:
        >>> conv4().features(torch.randn(1, 3, 84, 84)).shape
        torch.Size([1, 64, 5, 5])
    """
    return _four_block_net(4, pooling, embedding_dim, num_classes, activation, width, in_channels)


def conv4s8(
    *,
    pooling: PoolingKind = "avg",
    embedding_dim: int | None = None,
    num_classes: int | None = None,
    activation: ActivationKind = "leaky_relu",
    width: float = 1.0,
    in_channels: int = 3,
) -> EmbeddingNet:
    """Conv4-s8: Conv4 without the last maxpool, so the input is downsampled 8x, not 16x.

    Same parameters and nearly the same cost as :func:`conv4` (block4's convolution runs at the
    same resolution; only its pooling is gone), but the feature map is ``[64, 10, 10]`` at 84x84
    instead of 5x5: fine enough to tell a flower's centre from its petal ring.

    Example:
        >>> conv4s8().features(torch.randn(1, 3, 84, 84)).shape
        torch.Size([1, 64, 10, 10])
    """
    return _four_block_net(3, pooling, embedding_dim, num_classes, activation, width, in_channels)


def conv64f(
    *,
    pooling: PoolingKind = "avg",
    embedding_dim: int | None = None,
    num_classes: int | None = None,
    activation: ActivationKind = "leaky_relu",
    width: float = 1.0,
    in_channels: int = 3,
) -> EmbeddingNet:
    """Conv64F (DN4 / CovaMNet): 4 x [conv3x3-64, BN, activation], maxpool 2 after blocks 1, 2.

    The last feature map is larger than Conv4's: ``[64, 21, 21]`` at 84x84. ``width`` scales the
    64 channels. LeakyReLU uses slope 0.1 as in the FAM paper (DN4 used 0.2).

    Example:
        >>> conv64f().features(torch.randn(1, 3, 84, 84)).shape
        torch.Size([1, 64, 21, 21])
    """
    return _four_block_net(2, pooling, embedding_dim, num_classes, activation, width, in_channels)


def resnet12(
    *,
    pooling: PoolingKind = "avg",
    embedding_dim: int | None = None,
    num_classes: int | None = None,
    activation: ActivationKind = "leaky_relu",
    width: float = 1.0,
    in_channels: int = 3,
) -> EmbeddingNet:
    """Few-shot ResNet12 (MetaOptNet / FEAT, without DropBlock): 4 :class:`ResNet12Block`.

    Channels ``(64, 160, 320, 640)`` times ``width``; ``stem`` is an ``nn.Identity`` so that the
    stage names match :func:`resnet18`. At 84x84 the feature map is ``[640, 5, 5]``.

    Example:
        >>> resnet12().features(torch.randn(1, 3, 84, 84)).shape
        torch.Size([1, 640, 5, 5])
    """
    act = _activation_factory(activation)
    widths = [_scaled(c, width) for c in (64, 160, 320, 640)]
    _check_positive_int("in_channels", in_channels)
    stages: list[tuple[str, nn.Module]] = [("stem", nn.Identity())]
    for i, (cin, cout) in enumerate(zip([in_channels, *widths[:-1]], widths, strict=True)):
        stages.append((f"layer{i + 1}", ResNet12Block(cin, cout, act)))
    return _finish(stages, widths[-1], activation, pooling, embedding_dim, num_classes)


def resnet18(
    *,
    pooling: PoolingKind = "avg",
    embedding_dim: int | None = None,
    num_classes: int | None = None,
    activation: ActivationKind = "relu",
    width: float = 1.0,
    in_channels: int = 3,
) -> EmbeddingNet:
    """ResNet18 with the torchvision layout (11,689,512 parameters with ``num_classes=1000``).

    ``stem`` = conv7x7/2 (``conv1``), BN (``bn1``), activation, maxpool 3x3/2; ``layer1`` ..
    ``layer4`` = 2 :class:`BasicBlock` each with channels ``(64, 128, 256, 512)`` times ``width``.
    Parameter names equal torchvision's except that ``conv1`` / ``bn1`` live under ``stem.``.
    At 224x224 the feature map is ``[512, 7, 7]``; at 84x84 it is ``[512, 3, 3]``.

    Example:
        >>> resnet18().features(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 512, 7, 7])
    """
    act = _activation_factory(activation)
    widths = [_scaled(c, width) for c in (64, 128, 256, 512)]
    _check_positive_int("in_channels", in_channels)
    stem = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False),
            bn1=nn.BatchNorm2d(widths[0]),
            act=act(),
            maxpool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
    )
    stages: list[tuple[str, nn.Module]] = [("stem", stem)]
    for i, (cin, cout) in enumerate(zip([widths[0], *widths[:-1]], widths, strict=True)):
        stride = 1 if i == 0 else 2
        layer = nn.Sequential(
            BasicBlock(cin, cout, act, stride=stride), BasicBlock(cout, cout, act)
        )
        stages.append((f"layer{i + 1}", layer))
    return _finish(stages, widths[-1], activation, pooling, embedding_dim, num_classes)


_FACTORIES: dict[str, Callable[..., EmbeddingNet]] = {
    "conv4": conv4,
    "conv4s8": conv4s8,
    "conv64f": conv64f,
    "resnet12": resnet12,
    "resnet18": resnet18,
}


def build_backbone(name: str, **kwargs: object) -> EmbeddingNet:
    """Build the backbone called ``name`` (one of :data:`BACKBONES`) with factory ``kwargs``.

    Example:
        >>> build_backbone("resnet12", width=0.25, num_classes=5).output_dim
        5
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
    return _FACTORIES[name](**kwargs)


def _finish(
    stages: list[tuple[str, nn.Module]],
    feature_channels: int,
    activation: ActivationKind,
    pooling: PoolingKind,
    embedding_dim: int | None,
    num_classes: int | None,
) -> EmbeddingNet:
    """Wrap ``stages`` into an :class:`EmbeddingNet` and initialise its conv / BN layers."""
    net = EmbeddingNet(
        stages,
        feature_channels=feature_channels,
        pooling=pooling,
        embedding_dim=embedding_dim,
        num_classes=num_classes,
    )
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            if activation == "relu":
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.kaiming_normal_(
                    module.weight, a=LEAKY_RELU_SLOPE, mode="fan_out", nonlinearity="leaky_relu"
                )
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return net


def _conv3x3(in_channels: int, out_channels: int, *, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv_block(
    in_channels: int, out_channels: int, act: Callable[[], nn.Module], *, pool: bool
) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv=_conv3x3(in_channels, out_channels), bn=nn.BatchNorm2d(out_channels), act=act()
    )
    if pool:
        layers["pool"] = nn.MaxPool2d(2)
    return nn.Sequential(layers)


def _activation_factory(kind: str) -> Callable[[], nn.Module]:
    """Constructor of fresh, non-in-place activation modules (one per use, for clean hooks)."""
    if kind == "leaky_relu":
        return lambda: nn.LeakyReLU(LEAKY_RELU_SLOPE, inplace=False)
    if kind == "relu":
        return lambda: nn.ReLU(inplace=False)
    raise ValueError(f"unknown activation {kind!r}; expected one of {ACTIVATIONS}")


def _scaled(channels: int, width: float) -> int:
    valid = isinstance(width, int | float) and not isinstance(width, bool)
    if not (valid and math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a positive number, got {width!r}")
    return max(1, round(channels * width))


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
