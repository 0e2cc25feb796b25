"""Served models: described by config files, listed in a registry, loaded once.

A :class:`ServedModel` is a config, a :class:`~fam_core.pipeline.backends.Backend` (torch or
ONNX) and the shapes probed at load, and the gallery index its config names (opened and
checked against the model at load). A model whose config fails to load, or whose index
cannot be reached or was built by another model, is kept in the registry as a
:class:`FailedModel`: the server starts the others and answers requests for it with
:class:`~fam_core.pipeline.errors.Unavailable` and the one-line reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fam_core.explainers.default_method import MethodChoice, choose_method
from fam_core.explainers.registry import method_name
from fam_core.messages import first_line
from fam_core.models.configfile import parse_config
from fam_core.models.store import TASKS, ModelConfig, find_config
from fam_core.package_data import DEFAULT_MODEL_NAMES
from fam_core.pipeline.backends import Backend, LoadedBackend
from fam_core.pipeline.errors import InvalidArgument, NotFound, Unavailable
from fam_core.pipeline.onnx_backend import OnnxBackend, load_onnx_backend
from fam_core.pipeline.torch_backend import TorchBackend, load_torch_backend

if TYPE_CHECKING:
    from fam_core.search import GalleryIndex

DEFAULT_MODELS: tuple[str, ...] = DEFAULT_MODEL_NAMES  # what a server serves when told nothing

__all__ = [
    "DEFAULT_MODELS",
    "FailedModel",
    "ModelRegistry",
    "MethodChoice",
    "ServedModel",
    "choose_method",
    "load_backend",
    "load_registry",
]


@dataclass
class ServedModel:
    """A loaded model with what the pipeline needs to predict and explain with it.

    The backend runs it (:mod:`fam_core.pipeline.backends`): a torch module explained by every
    registered method, or an ONNX graph explained by the method baked into it (a plain file:
    by every method the graft can put onto it).
    """

    config: ModelConfig
    backend: Backend
    prototypes: torch.Tensor | None  # [K, D] (embedding models)
    output_dim: int
    feature_shape: tuple[int, int]
    index: GalleryIndex | None = None  # the config's gallery index, opened

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def model(self) -> nn.Module | None:
        """The torch module (``None`` for an ONNX graph)."""
        return self.backend.module if isinstance(self.backend, TorchBackend) else None

    @property
    def onnx(self) -> OnnxBackend | None:
        """The onnxruntime backend (``None`` for a torch model)."""
        return self.backend if isinstance(self.backend, OnnxBackend) else None

    @property
    def default_method(self) -> str:
        """The method a request that names none is explained with (:attr:`default_choice`)."""
        return self.backend.default_method

    @property
    def default_choice(self) -> MethodChoice:
        """The default method and why: the config's ``method``, else FAM for embedding
        models, CAM for classifiers whose head CAM reads, Grad-CAM for the others."""
        return self.backend.default_choice

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods this model explains with."""
        return self.backend.methods

    @property
    def num_prototypes(self) -> int:
        """Prototypes scored against (built into the model, or from the config)."""
        if self.backend.baked:
            return self.backend.baked
        return 0 if self.prototypes is None else int(self.prototypes.shape[0])

    def method_name(self, method: str | None) -> str:
        """The registered name of ``method`` (matched ignoring case, spaces, ``-`` and ``_``;
        ``None``: :attr:`default_method`); :class:`InvalidArgument` naming the closest of
        this model's methods for a name that is no method."""
        if not method:
            return self.default_method
        try:
            return method_name(method, expected=self.methods)
        except (TypeError, ValueError) as error:
            raise InvalidArgument(f"model {self.name!r}: {error}") from None

    def check_method(self, method: str) -> None:
        """:class:`NotFound` unless this model explains with ``method``."""
        self.backend.check_method(method)

    def explainer(self, method: str):  # type: ignore[no-untyped-def]
        """The torch explainer registered as ``method`` (:class:`NotFound` for ONNX graphs)."""
        if not isinstance(self.backend, TorchBackend):
            raise NotFound(f"model {self.name!r} is an ONNX graph: it has no torch explainers")
        return self.backend.explainer(method)

    @property
    def labels(self) -> tuple[str, ...]:
        """Class names (classifiers) or prototype labels (embedding models)."""
        return self.config.class_names

    def label(self, index: int) -> str:
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)

    @classmethod
    def load(
        cls,
        name_or_path: str | Path,
        device: torch.device | str = "cpu",
        *,
        target_layer: str | None = None,
        open_index: bool = True,
    ) -> ServedModel:
        """Load a model by name, config path or ``.onnx`` path; probe its output and feature shapes.

        ``target_layer`` overrides the config's layer for every explainer of this model.
        ``open_index``: open the gallery index the config names and check that it holds this
        model's embeddings (``False``: leave :attr:`index` ``None``, e.g. to build that index;
        a ``knn`` model always opens it). Errors are one-line ``ValueError`` naming the config
        key at fault.

        Example:
            >>> ServedModel.load("default-classifier").feature_shape
            (5, 5)
        """
        loaded = load_backend(name_or_path, device, target_layer=target_layer)
        served = cls(
            config=loaded.config,
            backend=loaded.backend,
            prototypes=loaded.prototypes,
            output_dim=loaded.output_dim,
            feature_shape=loaded.feature_shape,
        )
        gallery = getattr(loaded.backend, "gallery", None)  # a knn backend opened it
        if gallery is not None:
            served.index = gallery
        elif open_index and served.config.index is not None:
            served.index = open_model_index(served)
        return served


def open_model_index(served: ServedModel) -> GalleryIndex:
    """The gallery index ``served``'s config names, reached and checked to hold ``served``'s
    embeddings; a one-line ``ValueError`` naming the model and the ``index`` key otherwise
    (a server that does not answer, a file holding no gallery, another model's gallery)."""
    from fam_core.search import model_card, open_index

    config = served.config
    index = open_index(str(config.index_uri), search_params=config.index_search)
    try:
        index.check_model(model_card(served))
        index.check_search_params()
    except (ValueError, TypeError) as error:
        index.close()
        raise ValueError(f"model {config.name!r}: index: {_one_line(error)}") from None
    return index


def load_backend(
    name_or_path: str | Path,
    device: torch.device | str = "cpu",
    *,
    target_layer: str | None = None,
) -> LoadedBackend:
    """The backend of a model name, config path or ``.onnx`` path, chosen by its source."""
    if str(name_or_path).endswith(".onnx"):
        if target_layer is not None:
            raise ValueError("an ONNX graph's target layer is fixed at export: drop the layer")
        return load_onnx_backend(Path(name_or_path))
    config = ModelConfig.from_file(find_config(name_or_path))
    if config.source == "onnx":
        if target_layer is not None:
            raise ValueError("an ONNX graph's target layer is fixed at export: drop the layer")
        return load_onnx_backend(config.directory / str(config.onnx), config)
    return load_torch_backend(config, device, target_layer=target_layer)


@dataclass(frozen=True)
class FailedModel:
    """A model that did not load: its name, where it came from and the one-line reason.

    ``task`` is the config's when it says (``""`` otherwise).
    """

    name: str
    source: str
    reason: str
    task: str = ""

    @classmethod
    def of(cls, source: str | Path, error: Exception) -> FailedModel:
        """The failure of loading ``source``, named as the config names it when it can be read
        (else after its folder, or file)."""
        name, task = _name_and_task(source)
        reason = _one_line(error).removeprefix(f"model {name!r}: ")
        return cls(name, str(source), reason, task)


def _name_and_task(source: str | Path) -> tuple[str, str]:
    path = Path(source)
    if path.suffix == ".onnx":
        return path.stem, ""
    try:
        config_path = find_config(source)
    except ValueError:
        return (path.parent.name if path.name == "config.yaml" else path.stem or str(source)), ""
    try:
        raw = parse_config(config_path.read_text(), config_path)
    except (OSError, ValueError):
        raw = None
    if not isinstance(raw, dict):
        return config_path.parent.name, ""
    name = raw.get("name") if isinstance(raw.get("name"), str) and raw["name"] else None
    task = raw.get("task") if raw.get("task") in TASKS else ""
    return name or config_path.parent.name, task


def _one_line(error: Exception) -> str:
    first = first_line(error)
    return first if isinstance(error, ValueError) else f"{type(error).__name__}: {first}"


class ModelRegistry:
    """The models a server serves, by name, each loaded once; and those that failed to load.

    Example:
        >>> registry = ModelRegistry.from_names(["default-classifier"])
        >>> registry.names()
        ['default-classifier']
        >>> registry = ModelRegistry.load(["default-classifier", "no-such-model"])
        >>> registry.names(), [failed.name for failed in registry.failed()]
        (['default-classifier'], ['no-such-model'])
    """

    def __init__(self, models: list[ServedModel], failed: list[FailedModel] | None = None) -> None:
        self._models: dict[str, ServedModel] = {}
        self._failed: dict[str, FailedModel] = {}
        for served in models:
            if served.name in self._models:
                raise ValueError(f"two models are named {served.name!r}")
            self._models[served.name] = served
        for failure in failed or ():
            if failure.name in self._models or failure.name in self._failed:
                raise ValueError(f"two models are named {failure.name!r}")
            self._failed[failure.name] = failure

    @classmethod
    def load(
        cls, sources: list[str | Path] | tuple[str | Path, ...], *, keep_going: bool = True
    ) -> ModelRegistry:
        """Load models by store name, folder, config path or ``.onnx`` path.

        With ``keep_going`` a model that fails to load becomes a :class:`FailedModel` (requests
        for it are :class:`~fam_core.pipeline.errors.Unavailable`); without it the first
        failure raises.
        """
        models: list[ServedModel] = []
        failed: list[FailedModel] = []
        for source in sources:
            try:
                models.append(ServedModel.load(_source(source)))
            except Exception as error:
                if not keep_going:
                    raise
                failed.append(FailedModel.of(source, error))
        return cls(models, failed)

    @classmethod
    def from_names(
        cls,
        names: list[str] | tuple[str, ...] = DEFAULT_MODELS,
        *,
        keep_going: bool = False,
    ) -> ModelRegistry:
        """Load models by store name or config path (default: :data:`DEFAULT_MODELS`)."""
        return cls.load(list(names), keep_going=keep_going)

    @classmethod
    def from_directory(cls, directory: str | Path, *, keep_going: bool = False) -> ModelRegistry:
        """Load every ``*/config.yaml`` and ``*.onnx`` (named after the file) in ``directory``."""
        return cls.load(directory_sources(directory), keep_going=keep_going)

    def names(self) -> list[str]:
        """The models that loaded (and serve)."""
        return sorted(self._models)

    def failed(self) -> list[FailedModel]:
        """The models that failed to load, by name."""
        return [self._failed[name] for name in sorted(self._failed)]

    def get(self, name: str) -> ServedModel:
        """The model ``name``: :class:`NotFound` if unknown, :class:`Unavailable` if it failed."""
        if name in self._models:
            return self._models[name]
        if name in self._failed:
            raise Unavailable(f"model {name!r} failed to load: {self._failed[name].reason}")
        raise NotFound(f"unknown model {name!r}; this server serves {self.names()}")

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._models[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._models)


def directory_sources(directory: str | Path) -> list[Path]:
    """The ``*/config.yaml`` and ``*.onnx`` files of a models folder, sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"models folder {directory} does not exist")
    sources = sorted(directory.glob("*/config.yaml")) + sorted(directory.glob("*.onnx"))
    if not sources:
        raise ValueError(f"models folder {directory} has no */config.yaml or *.onnx")
    return sources


def load_registry(models_dir: str | Path | None, models: list[str]) -> ModelRegistry:
    """The models of ``--models DIR`` and each ``--model CONFIG`` (default: the default models).

    A model that fails to load is reported not ready while the others serve; when none
    loads, the first reason is raised as a one-line ``ValueError``.

    Example:
        >>> load_registry(None, ["default-classifier", "no-such-model"]).names()
        ['default-classifier']
    """
    sources: list[str | Path] = []
    if models_dir:
        sources += directory_sources(models_dir)
    sources += models
    registry = ModelRegistry.load(sources or list(DEFAULT_MODELS), keep_going=True)
    if len(registry) == 0:
        failed = registry.failed()
        raise ValueError(f"no model loaded: {failed[0].name}: {failed[0].reason}")
    return registry


def _source(name: str | Path) -> str | Path:
    """An ``.onnx`` path as it is, else the config file of a name or path."""
    return name if str(name).endswith(".onnx") else find_config(name)
