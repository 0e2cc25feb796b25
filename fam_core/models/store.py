"""Model configs and the model store: ``load_model("default-embedding")``.

A model is a folder with ``config.yaml`` (see :class:`ModelConfig`) and its weights,
loaded with ``torch.load(..., weights_only=True)``. Named models are looked up in the
folders of ``$FAM_MODEL_STORE`` (``os.pathsep``-separated), then in the default models'
folder (:data:`fam_core.package_data.MODEL_STORE`: the repository's ``model-store/`` in a
checkout, the copy installed with the package otherwise).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from fam_core.configfile import dump_config, parse_config
from fam_core.imageio import CHANNEL_COUNTS, to_channels
from fam_core.package_data import MODEL_STORE
from fam_core.resizing import (
    DEFAULT_POLICY,
    RESIZE_POLICIES,
    ResizePolicy,
    as_size,
    fit_image,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(
    images: torch.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """``(images - mean) / std`` per channel of ``[B, 3, H, W]`` images in ``[0, 1]``."""
    shape = (1, len(mean), 1, 1)
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(shape)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(shape)
    return (images - mean_t) / std_t


SOURCES: tuple[str, ...] = ("backbone", "factory", "exported_program", "onnx")
"""The model sources a config may name: exactly one of them."""
TORCH_SOURCES: tuple[str, ...] = ("backbone", "factory", "exported_program")
_FILE_KEYS = ("weights", "exported_program", "onnx", "prototypes")
# keys only some sources take: key -> the sources that take it
_SOURCE_KEYS: dict[str, tuple[str, ...]] = {
    "backbone_kwargs": ("backbone",),
    "factory_kwargs": ("factory",),
    "weights": ("backbone", "factory"),
    "target_tensor": ("onnx",),
    "layout": ("onnx",),
    "output": (*TORCH_SOURCES, "onnx"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything a front door needs to run and explain a model.

    A config names exactly one model source (:data:`SOURCES`):

    - ``backbone`` (a name from :data:`fam_core.models.backbones.BACKBONES`) with
      ``backbone_kwargs`` and ``weights`` (a state dict);
    - ``factory``: ``"package.module:callable"`` called with ``factory_kwargs`` to build the
      module, then ``weights`` (optional) loaded into it. The module is imported from the
      installed packages, or from ``<module>.py`` next to the config;
    - ``exported_program``: a :func:`torch.export.save` file (nothing is unpickled);
    - ``onnx``: an ``.onnx`` file. Files ``fam export`` wrote carry their target layer and
      preprocessing; other graphs are grafted with an explanation head at ``target_tensor``.

    File names are relative to the config's folder; ``weights`` are loaded with
    ``torch.load(..., weights_only=True)``.

    Attributes:
        name: registry name, e.g. ``"default-embedding"``.
        task: ``"embedding"`` or ``"classifier"``.
        target_layer: the layer explainers use (``None``: the explainer's default).
        output: which part of the model's output is the embedding or the logits (a key or an
            index; ``None``: the explainers' default); for ``onnx``, the name of the graph
            output the grafted head explains (``None``: the first ``[B, D]`` output).
        input_size: input side in pixels, or ``(H, W)``.
        resize: how images are fitted to ``input_size`` (:mod:`fam_core.resizing`).
        mean, std: per-channel normalisation of ``[0, 1]`` images: one value per input
            channel, or one value for all of them.
        channels: the model's input channels: 3 (RGB) or 1 (greyscale: images become their
            ITU-R BT.601 luminance, :func:`fam_core.imageio.to_channels`). An ``onnx`` graph's
            input says it; a config value other than 3 must match it.
        method: the explanation method when a request names none; ``None``: the one rule
            of :func:`fam_core.default_method.choose_method` (FAM for embedding models, CAM
            for classifiers whose head CAM reads, Grad-CAM for other classifiers).
        layout: ``onnx`` only: the graph input's layout, ``NCHW`` or ``NHWC``; ``None``:
            detected from the input's shape and its first ``Transpose``
            (:mod:`fam_core.exporters.onnx_normalise`).
        class_names: the classifier's classes, or the labels of ``prototypes``.
        prototypes: optional ``[K, D]`` tensor file of class prototypes (embedding models).
        similarity: the similarity the embedding model was trained for.
        metrics: what the training script measured (accuracy, interval, ...).
        directory: the folder the config was read from.

    Example:
        >>> config = ModelConfig(name="mine", task="classifier", factory="torchvision.models:resnet18")
        >>> config.source, config.image_size, config.resize
        ('factory', (84, 84), 'crop')
    """

    name: str
    task: Literal["embedding", "classifier"]
    backbone: str | None = None
    weights: str | None = None
    target_layer: str | None = None
    input_size: int | tuple[int, int] = 84
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    class_names: tuple[str, ...] = ()
    prototypes: str | None = None
    similarity: str = "cosine"
    metrics: dict[str, Any] = field(default_factory=dict)
    onnx: str | None = None
    factory: str | None = None
    factory_kwargs: dict[str, Any] = field(default_factory=dict)
    exported_program: str | None = None
    target_tensor: str | None = None
    output: str | int | None = None
    resize: ResizePolicy = DEFAULT_POLICY
    channels: int = 3
    method: str | None = None
    layout: str | None = None
    directory: Path = Path(".")

    def __post_init__(self) -> None:
        for key, value in self._problems():
            raise ValueError(f"{key}: {value}")
        if not isinstance(self.input_size, int):
            object.__setattr__(self, "input_size", as_size(self.input_size))

    def _problems(self) -> list[tuple[str, str]]:
        """``(key, what was expected)`` for each thing wrong with this config (first one wins)."""
        named = [s for s in SOURCES if getattr(self, s) not in (None, "")]
        if len(named) != 1:
            what = f"got {named}" if named else "got none"
            return [("source", f"expected exactly one of {list(SOURCES)}, {what}")]
        source = named[0]
        problems: list[tuple[str, str]] = []
        for key in ("name", "task"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                problems.append((key, f"expected a non-empty string, got {getattr(self, key)!r}"))
        if self.task not in ("embedding", "classifier"):
            problems.append(
                ("task", f"task must be 'embedding' or 'classifier', got {self.task!r}")
            )
        if not isinstance(getattr(self, source), str):
            problems.append((source, f"expected a string, got {getattr(self, source)!r}"))
        for key, takers in _SOURCE_KEYS.items():
            value = getattr(self, key)
            if value not in (None, "", {}) and source not in takers:
                problems.append((key, f"is not used with {source}: (it goes with {list(takers)})"))
        if source == "backbone" and not self.weights:
            problems.append(("weights", "expected a state-dict file for the backbone"))
        if source == "factory" and (
            not isinstance(self.factory, str) or not re.fullmatch(_FACTORY, self.factory)
        ):
            problems.append(
                ("factory", f"expected 'package.module:callable', got {self.factory!r}")
            )
        for key in ("backbone_kwargs", "factory_kwargs", "metrics"):
            if not isinstance(getattr(self, key), dict):
                problems.append((key, f"expected a mapping, got {getattr(self, key)!r}"))
        for key in (*_FILE_KEYS, "target_layer", "target_tensor"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                problems.append((key, f"expected a string, got {value!r}"))
        if self.output is not None and (
            isinstance(self.output, bool) or not isinstance(self.output, str | int)
        ):
            problems.append(
                ("output", f"expected a key (string) or an index (int), got {self.output!r}")
            )
        elif source == "onnx" and self.output is not None and not isinstance(self.output, str):
            problems.append(
                ("output", f"expected the name of a graph output (a string), got {self.output!r}")
            )
        try:
            as_size(self.input_size)
        except (TypeError, ValueError):
            problems.append(("input_size", f"expected an int or [H, W], got {self.input_size!r}"))
        if self.resize not in RESIZE_POLICIES:
            problems.append(
                ("resize", f"expected one of {list(RESIZE_POLICIES)}, got {self.resize!r}")
            )
        if isinstance(self.channels, bool) or self.channels not in CHANNEL_COUNTS:
            problems.append(
                ("channels", f"expected 1 (greyscale) or 3 (RGB), got {self.channels!r}")
            )
        if self.layout not in (None, "NCHW", "NHWC"):
            problems.append(("layout", f"expected NCHW or NHWC, got {self.layout!r}"))
        if self.method is not None and (not isinstance(self.method, str) or not self.method):
            problems.append(("method", f"expected a method name, got {self.method!r}"))
        for key in ("mean", "std"):
            value = getattr(self, key)
            if not (
                isinstance(value, tuple)
                and value
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            ):
                problems.append(
                    (key, f"expected a list of numbers (one per channel), got {value!r}")
                )
            elif self.channels in CHANNEL_COUNTS and len(value) not in (1, self.channels):
                problems.append((key, channel_mismatch(len(value), self.channels)))
        if any(v == 0 for v in self.std if isinstance(v, int | float)):
            problems.append(("std", f"expected non-zero values, got {self.std!r}"))
        return problems

    @property
    def source(self) -> str:
        """The model source this config names: one of :data:`SOURCES`."""
        return next(s for s in SOURCES if getattr(self, s) not in (None, ""))

    @property
    def architecture(self) -> str:
        """A short description of the source, e.g. ``"conv4"`` or ``"factory pkg.mod:build"``."""
        if self.source == "backbone":
            return str(self.backbone)
        return f"{self.source} {getattr(self, self.source)}"

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the model's input."""
        return as_size(self.input_size)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read a ``config.yaml``; a bad config raises a one-line ``ValueError`` naming the key.

        Example:
            >>> ModelConfig.from_file(find_config("default-embedding")).source
            'backbone'
        """
        path = Path(path)
        try:
            raw = parse_config(path.read_text(), path)
        except (OSError, ValueError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"cannot read model config {path}: {first}") from error
        if not isinstance(raw, dict):
            raise ValueError(f"model config {path} must be a mapping")
        known = {f for f in cls.__dataclass_fields__ if f != "directory"}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(
                f"model config {path} has unknown keys {sorted(unknown)}; expected keys among "
                f"{sorted(known)}"
            )
        for key in ("name", "task"):
            if key not in raw:
                raise ValueError(f"model config {path} lacks the key {key!r}")
        if raw.get("onnx") is not None and raw.get("target_layer") is not None:
            raise ValueError(
                f"model config {path}: target_layer: an ONNX graph's layer is fixed in the graph; "
                "expected target_tensor: (the feature-map value) for a graph fam export did not write"
            )
        for key in ("mean", "std", "class_names"):
            if isinstance(raw.get(key), list):
                raw[key] = tuple(raw[key])
        if isinstance(raw.get("input_size"), list):
            raw["input_size"] = tuple(raw["input_size"])
        for key in ("backbone_kwargs", "factory_kwargs", "metrics"):
            if key in raw and raw[key] is None:
                raw[key] = {}
        try:
            return cls(**raw, directory=path.parent)
        except ValueError as error:
            raise ValueError(f"model config {path}: {error}") from None

    def to_file(self, path: str | Path) -> None:
        """Write this config as YAML, in its JSON form (``directory`` is implied by the file's
        location).

        Keys of sources it does not use are left out.
        """
        data = asdict(self)
        data.pop("directory")
        for key in ("mean", "std", "class_names"):
            data[key] = list(data[key])
        if isinstance(data["input_size"], tuple):
            data["input_size"] = list(data["input_size"])
        for key in (
            *SOURCES,
            "factory_kwargs",
            "target_tensor",
            "layout",
            "output",
            "weights",
            "method",
        ):
            if data[key] in (None, {}) and key != self.source:
                data.pop(key)
        if data["channels"] == 3:
            data.pop("channels")
        if self.source != "backbone":
            data.pop("backbone_kwargs")
        Path(path).write_text(dump_config(data))

    def build(self) -> nn.Module:
        """The architecture with freshly initialised weights (``backbone`` and ``factory``)."""
        from fam_core.models.sources import build_module

        return build_module(self)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` images in ``[0, 1]`` to the model's input distribution: its
        ``channels`` (:func:`fam_core.imageio.to_channels`), then ``(x - mean) / std``.

        Example:
            >>> grey = ModelConfig(name="g", task="classifier", onnx="g.onnx", channels=1,
            ...                    mean=(0.5,), std=(0.25,))
            >>> grey.normalize(torch.ones(2, 3, 4, 4)).shape
            torch.Size([2, 1, 4, 4])
        """
        return normalize_images(to_channels(images, self.channels), self.mean, self.std)

    def fit(self, images: torch.Tensor) -> torch.Tensor:
        """``[3, h, w]`` (or ``[B, 3, h, w]``) images in ``[0, 1]`` fitted to ``input_size`` by
        the config's ``resize`` policy (letterbox padding in the ``mean`` colour)."""
        return fit_image(images, self.image_size, self.resize, fill=self.mean)

    def load_prototypes(self) -> torch.Tensor | None:
        """The ``[K, D]`` prototypes, or ``None`` when the model has none."""
        if self.prototypes is None:
            return None
        path = self.directory / self.prototypes
        if not path.is_file():
            raise ValueError(f"prototypes: file {path} does not exist")
        from fam_core.models.safe_load import load_weights_only

        values = load_weights_only(path, "prototypes")
        if not isinstance(values, torch.Tensor):
            raise ValueError(f"prototypes: {path} holds {type(values).__name__}, expected a tensor")
        return values


def channel_mismatch(values: int, channels: int) -> str:
    """What a ``mean`` / ``std`` of ``values`` numbers for a ``channels``-channel model lacks.

    Example:
        >>> channel_mismatch(3, 1)
        'got 3 values for a 1-channel (greyscale) model: expected one value, e.g. [0.5]'
    """
    if channels == 1:
        return (
            f"got {values} values for a 1-channel (greyscale) model: expected one value, e.g. [0.5]"
        )
    return f"got {values} values for a {channels}-channel model: expected 1 or {channels}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


_FACTORY = r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*"


class LoadedModel(NamedTuple):
    """``model, config = load_model(...)``."""

    model: nn.Module
    config: ModelConfig


def model_store_paths() -> list[Path]:
    """Folders searched for named models, in order."""
    extra = os.environ.get("FAM_MODEL_STORE", "")
    return [Path(p) for p in extra.split(os.pathsep) if p] + [MODEL_STORE]


def available_models() -> list[str]:
    """Names of the models found in the model store folders."""
    names = {
        config.parent.name for root in model_store_paths() for config in root.glob("*/config.yaml")
    }
    return sorted(names)


def find_config(name_or_path: str | Path) -> Path:
    """The ``config.yaml`` of a model name, a model folder, or a config file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    if path.is_dir() and (path / "config.yaml").is_file():
        return path / "config.yaml"
    for root in model_store_paths():
        candidate = root / str(name_or_path) / "config.yaml"
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"unknown model {str(name_or_path)!r}: expected a config file, a model folder, or one "
        f"of {available_models()}"
    )


def load_model(
    name_or_path: str | Path = "default-embedding", device: torch.device | str = "cpu"
) -> LoadedModel:
    """Load a torch model (``backbone``, ``factory`` or ``exported_program``) in eval mode.

    Errors in the config or its files raise a one-line ``ValueError`` naming the key.

    Example:
        >>> model, config = load_model("default-embedding")
        >>> config.target_layer
        'block4'
    """
    from fam_core.models.sources import load_module

    config = ModelConfig.from_file(find_config(name_or_path))
    if config.onnx is not None:
        raise ValueError(
            f"model {config.name!r} is an ONNX graph ({config.onnx}): serve it with `fam serve` "
            "or run it with fam_core.onnx_runtime.OnnxExplainer"
        )
    try:
        model = load_module(config)
    except ValueError as error:
        raise ValueError(f"model {config.name!r}: {error}") from None
    return LoadedModel(model.to(device).eval(), config)
