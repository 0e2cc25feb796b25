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

from fam_core.images.read import CHANNEL_COUNTS, to_channels
from fam_core.images.resize import DEFAULT_POLICY, ResizePolicy, as_size, fit_image
from fam_core.models.config_schema import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    KEYS,
    SOURCES,
    TORCH_SOURCES,
    channel_mismatch,
    value_problem,
)
from fam_core.models.configfile import dump_config, parse_config
from fam_core.models.model_check import check_torch_model
from fam_core.models.sources import build_module, load_module
from fam_core.package_data import MODEL_STORE

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SOURCES",
    "TORCH_SOURCES",
    "LoadedModel",
    "ModelConfig",
    "available_models",
    "channel_mismatch",
    "find_config",
    "load_model",
    "model_store_paths",
    "normalize_images",
]


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
        task: ``"embedding"``, ``"classifier"``, or ``"knn"`` (an embedding model that
            classifies by NPID's weighted vote of its ``k`` nearest labelled images in
            ``index``: :mod:`fam_core.search.knn`).
        target_layer: the layer explainers use (``None``: the explainer's default).
        output: which part of the model's output is the embedding or the logits (a key or an
            index; ``None``: the explainers' default); for ``onnx``, the name of the graph
            output the grafted head explains (``None``: the first ``[B, D]`` output).
        input_size: input side in pixels, or ``(H, W)``.
        resize: how images are fitted to ``input_size`` (:mod:`fam_core.images.resize`).
        mean, std: per-channel normalisation of ``[0, 1]`` images: one value per input
            channel, or one value for all of them.
        channels: the model's input channels: 3 (RGB) or 1 (greyscale: images become their
            ITU-R BT.601 luminance, :func:`fam_core.images.read.to_channels`). An ``onnx`` graph's
            input says it; a config value other than 3 must match it.
        method: the explanation method when a request names none; ``None``: the one rule
            of :func:`fam_core.explainers.default_method.choose_method` (FAM for embedding models, CAM
            for classifiers whose head CAM reads, Grad-CAM for other classifiers).
        layout: ``onnx`` only: the graph input's layout, ``NCHW`` or ``NHWC``; ``None``:
            detected from the input's shape and its first ``Transpose``
            (:mod:`fam_core.exporters.onnx_normalise`).
        class_names: the classifier's classes, or the labels of ``prototypes``.
        prototypes: optional ``[K, D]`` tensor file of class prototypes (embedding models).
        similarity: the similarity the embedding model was trained for.
        index: the gallery index of an embedding or ``knn`` model: a Milvus Lite ``.db``
            path (relative to the config's folder) or ``http(s)://HOST:PORT[#NAME]``
            (:mod:`fam_core.search`); :attr:`index_uri` resolves it.
        index_search: search parameters replacing those the index was built with (``ef`` of
            an ``HNSW`` index, ``nprobe`` of an ``IVF_FLAT`` one; checked when it is opened).
        top_k: neighbours a search returns when a request names none.
        explain: the maps a search draws when a request names none: ``"none"``,
            ``"query"`` or ``"both"``.
        k, temperature: ``knn`` models: the neighbours that vote and the vote's temperature
            (NPID: 200 and 0.07).
        metrics: what the training script measured (accuracy, interval, ...).
        directory: the folder the config was read from.

    Example:
        >>> config = ModelConfig(name="mine", task="classifier", factory="torchvision.models:resnet18")
        >>> config.source, config.image_size, config.resize
        ('factory', (84, 84), 'crop')
    """

    name: str
    task: Literal["embedding", "classifier", "knn"]
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
    index: str | None = None
    index_search: dict[str, int] = field(default_factory=dict)
    top_k: int = 10
    explain: str = "query"
    k: int = 200
    temperature: float = 0.07
    directory: Path = Path(".")

    def __post_init__(self) -> None:
        for key, value in self._problems():
            raise ValueError(f"{key}: {value}")
        if not isinstance(self.input_size, int):
            object.__setattr__(self, "input_size", as_size(self.input_size))

    def _problems(self) -> list[tuple[str, str]]:
        """``(key, what was expected)`` for each thing wrong with this config (first one wins):
        each value against its :data:`~fam_core.models.config_schema.KEYS` entry, then the
        rules between keys."""
        named = [s for s in SOURCES if getattr(self, s) not in (None, "")]
        if len(named) != 1:
            what = f"got {named}" if named else "got none"
            return [("source", f"expected exactly one of {list(SOURCES)}, {what}")]
        source = named[0]
        problems: list[tuple[str, str]] = []
        for spec in KEYS:
            value = getattr(self, spec.name)
            if spec.name == "task" and value not in spec.choices:
                problems.append(("task", f"task must be one of {list(TASKS)}, got {value!r}"))
                continue
            problem = value_problem(spec, value)
            if problem is not None:
                problems.append((spec.name, problem))
            elif spec.sources and value not in (None, "", {}) and source not in spec.sources:
                problems.append(
                    (spec.name, f"is not used with {source}: (it goes with {list(spec.sources)})")
                )
        problems.extend(_search_problems(self, source))
        if source == "backbone" and not self.weights:
            problems.append(("weights", "expected a state-dict file for the backbone"))
        if source == "factory" and (
            isinstance(self.factory, str) and not re.fullmatch(_FACTORY, self.factory)
        ):
            problems.append(
                ("factory", f"expected 'package.module:callable', got {self.factory!r}")
            )
        if source == "onnx" and self.output is not None and not isinstance(self.output, str):
            problems.append(
                ("output", f"expected the name of a graph output (a string), got {self.output!r}")
            )
        if self.method is not None and not self.method:
            problems.append(("method", f"expected a method name, got {self.method!r}"))
        for key in ("mean", "std"):
            value = getattr(self, key)
            if (
                isinstance(value, tuple)
                and self.channels in CHANNEL_COUNTS
                and len(value) not in (1, self.channels)
            ):
                problems.append((key, channel_mismatch(len(value), self.channels)))
        if isinstance(self.std, tuple) and any(v == 0 for v in self.std):
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
    def index_uri(self) -> str | None:
        """``index`` with a relative file path taken from the config's folder.

        Example:
            >>> ModelConfig(name="m", task="knn", backbone="conv4", weights="w.pt",
            ...             index="g.db", directory=Path("/models/m")).index_uri
            '/models/m/g.db'
        """
        if self.index is None or "://" in self.index or Path(self.index).is_absolute():
            return self.index
        return (self.directory / self.index).as_posix()

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
        known = {spec.name for spec in KEYS}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(
                f"model config {path} has unknown keys {sorted(unknown)}; expected keys among "
                f"{sorted(known)} (docs/config.md)"
            )
        for spec in KEYS:
            if spec.required and spec.name not in raw:
                raise ValueError(f"model config {path} lacks the key {spec.name!r}")
        if raw.get("onnx") is not None and raw.get("target_layer") is not None:
            raise ValueError(
                f"model config {path}: target_layer: an ONNX graph's layer is fixed in the graph; "
                "expected target_tensor: (the feature-map value) for a graph fam export did not write"
            )
        for spec in KEYS:
            value = raw.get(spec.name)
            if isinstance(value, list) and spec.kind in ("numbers", "strings", "size"):
                raw[spec.name] = tuple(value)
            if spec.kind == "strings" and isinstance(value, list):  # YAML reads `[1, 2]` as ints
                raw[spec.name] = tuple(
                    str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
                    for v in value
                )
            if spec.kind == "mapping" and spec.name in raw and value is None:
                raw[spec.name] = {}
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
            "index",
            "index_search",
        ):
            if data[key] in (None, {}) and key != self.source:
                data.pop(key)
        if self.index is None:
            for key in SEARCH_KEYS:
                data.pop(key, None)  # index_search may have gone above
        if data["channels"] == 3:
            data.pop("channels")
        if self.source != "backbone":
            data.pop("backbone_kwargs")
        Path(path).write_text(dump_config(data))

    def build(self) -> nn.Module:
        """The architecture with freshly initialised weights (``backbone`` and ``factory``)."""
        return build_module(self)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` images in ``[0, 1]`` to the model's input distribution: its
        ``channels`` (:func:`fam_core.images.read.to_channels`), then ``(x - mean) / std``.

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


TASKS: tuple[str, ...] = ("embedding", "classifier", "knn")
SEARCH_KEYS: tuple[str, ...] = ("index_search", "top_k", "explain", "k", "temperature")
"""The keys that go with ``index`` (left out of a written config that has none)."""


def _search_problems(config: ModelConfig, source: str) -> list[tuple[str, str]]:
    """What is wrong with the search keys: ``index``, ``top_k``, ``explain``, ``k``,
    ``temperature`` (an index serves embedding and ``knn`` models of torch sources)."""
    problems: list[tuple[str, str]] = []
    if config.index is not None and (not isinstance(config.index, str) or not config.index):
        problems.append(
            ("index", f"expected a .db path or http(s)://HOST:PORT, got {config.index!r}")
        )
    if config.task == "knn" and not config.index:
        problems.append(("index", "task knn needs an index: the labelled gallery it votes over"))
    if config.index and config.task == "classifier":
        problems.append(("index", "a gallery index needs an embedding model, not a classifier"))
    search = config.index_search
    if search and not config.index:
        problems.append(("index_search", "search parameters need an index"))
    if isinstance(search, dict) and not all(
        isinstance(name, str) and isinstance(value, int) and not isinstance(value, bool)
        and value >= 1
        for name, value in search.items()
    ):  # fmt: skip
        problems.append(("index_search", f"expected names and ints >= 1, got {search!r}"))
    if config.task == "knn" and source not in TORCH_SOURCES:
        problems.append(("task", f"task knn needs a torch model (one of {list(TORCH_SOURCES)})"))
    for key in ("top_k", "k"):  # their kinds are checked with the other keys'
        value = getattr(config, key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            problems.append((key, f"expected an int >= 1, got {value!r}"))
    value = config.temperature
    if isinstance(value, int | float) and not isinstance(value, bool) and not value > 0:
        problems.append(("temperature", f"expected a number > 0, got {value!r}"))
    return problems


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
    """Load a torch model (``backbone``, ``factory`` or ``exported_program``) in eval mode,
    checked against its config (:mod:`fam_core.models.model_check`).

    Errors in the config or its files raise a one-line ``ValueError`` naming the key.

    Example:
        >>> model, config = load_model("default-embedding")
        >>> config.target_layer
        'block4'
    """
    config = ModelConfig.from_file(find_config(name_or_path))
    if config.onnx is not None:
        raise ValueError(
            f"model {config.name!r} is an ONNX graph ({config.onnx}): serve it with `fam serve` "
            "or run it with fam_core.graphs.onnx_runtime.OnnxExplainer"
        )
    try:
        model = load_module(config)
    except ValueError as error:
        raise ValueError(f"model {config.name!r}: {error}") from None
    model = model.to(device).eval()
    check_torch_model(model, config)
    return LoadedModel(model, config)
