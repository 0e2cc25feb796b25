"""Served models: described by config files, listed in a registry, loaded once."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fam_core.adapters import resolve_layer
from fam_core.explainers import Explainer, available_methods, get_explainer
from fam_core.explainers.fam import FAM
from fam_core.models.store import ModelConfig, find_config, load_model
from fam_core.pipeline.errors import NotFound

if TYPE_CHECKING:
    from fam_core.pipeline.onnx_backend import OnnxBackend

DEFAULT_MODELS: tuple[str, ...] = ("default-embedding", "default-classifier")


def default_method(task: str) -> str:
    """FAM for embedding models; for classifiers CAM when registered, else FAM (class target)."""
    if task == "classifier" and "cam" in available_methods():
        return "cam"
    return "fam"


@dataclass
class ServedModel:
    """A loaded model with what the pipeline needs to predict and explain with it.

    Explainers are built once per method and reused: they keep no state between calls.
    A model served from an exported ONNX graph has ``onnx`` set and no ``model``; it
    explains with its graph's method only (:mod:`fam_core.pipeline.onnx_backend`).
    """

    config: ModelConfig
    model: nn.Module | None
    prototypes: torch.Tensor | None  # [K, D] (embedding models)
    output_dim: int
    feature_shape: tuple[int, int]
    onnx: OnnxBackend | None = None
    _explainers: dict[str, Explainer] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def default_method(self) -> str:
        return self.onnx.method if self.onnx is not None else default_method(self.task)

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods this model explains with."""
        return (self.onnx.method,) if self.onnx is not None else tuple(available_methods())

    @property
    def num_prototypes(self) -> int:
        """Prototypes scored against (baked into an ONNX graph or from the config)."""
        if self.onnx is not None and self.onnx.baked:
            return self.onnx.baked
        return 0 if self.prototypes is None else int(self.prototypes.shape[0])

    def check_method(self, method: str) -> None:
        """:class:`NotFound` unless this model explains with ``method``."""
        if method not in self.methods:
            raise NotFound(
                f"unknown method {method!r} for model {self.name!r}; expected one of "
                f"{list(self.methods)}"
            )
        if self.onnx is None:
            self.explainer(method)

    @property
    def labels(self) -> tuple[str, ...]:
        """Class names (classifiers) or prototype labels (embedding models)."""
        return self.config.class_names

    def label(self, index: int) -> str:
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)

    def explainer(self, method: str) -> Explainer:
        """The explainer registered as ``method`` for this model (:class:`NotFound` if none)."""
        if self.model is None:
            raise NotFound(f"model {self.name!r} is an ONNX graph: it has no torch explainers")
        with self._lock:
            if method not in self._explainers:
                try:
                    cls = get_explainer(method)
                except ValueError as error:
                    raise NotFound(str(error)) from None
                self._explainers[method] = cls(
                    self.model,
                    self.config.target_layer,
                    similarity=self.config.similarity,  # type: ignore[arg-type]
                )
            return self._explainers[method]

    @classmethod
    def load(
        cls,
        name_or_path: str | Path,
        device: torch.device | str = "cpu",
        *,
        target_layer: str | None = None,
    ) -> ServedModel:
        """Load a model by name, config path or ``.onnx`` path; probe its output and feature shapes.

        ``target_layer`` overrides the config's layer for every explainer of this model.
        A config with an ``onnx`` key, or an ``.onnx`` file, is served by onnxruntime.
        """
        onnx_path, onnx_config = _onnx_source(name_or_path)
        if onnx_path is not None:
            from fam_core.pipeline.onnx_backend import load_onnx_model

            if target_layer is not None:
                raise ValueError("an ONNX graph's target layer is fixed at export: drop the layer")
            return load_onnx_model(onnx_path, onnx_config)
        model, config = load_model(name_or_path, device=device)
        if target_layer is not None:
            resolve_layer(model, target_layer)  # a clear error for an unknown name
            config = replace(config, target_layer=target_layer)
        prototypes = config.load_prototypes() if config.task == "embedding" else None
        probe = FAM(model, config.target_layer, similarity=config.similarity)  # type: ignore[arg-type]
        with torch.no_grad():
            forward = probe.forward(torch.zeros(1, 3, config.input_size, config.input_size))
        if prototypes is not None:
            prototypes = prototypes.to(device=forward.outputs.device, dtype=torch.float32)
            if prototypes.dim() != 2 or prototypes.shape[1] != forward.outputs.shape[1]:
                raise ValueError(
                    f"model {config.name!r}: prototypes have shape {tuple(prototypes.shape)}, "
                    f"expected [K, {forward.outputs.shape[1]}]"
                )
        height, width = forward.activations.shape[-2:]
        return cls(
            config=config,
            model=model,
            prototypes=prototypes,
            output_dim=int(forward.outputs.shape[1]),
            feature_shape=(int(height), int(width)),
        )


def _source(name: str | Path) -> str | Path:
    """An ``.onnx`` path as it is, else the config file of a name or path."""
    return name if str(name).endswith(".onnx") else find_config(name)


def _onnx_source(name_or_path: str | Path) -> tuple[Path | None, ModelConfig | None]:
    """``(graph file, config)`` when ``name_or_path`` is served from ONNX, else ``(None, None)``."""
    if str(name_or_path).endswith(".onnx"):
        return Path(name_or_path), None
    config = ModelConfig.from_file(find_config(name_or_path))
    if config.onnx is None:
        return None, None
    return config.directory / config.onnx, config


class ModelRegistry:
    """The models a server serves, by name, each loaded once.

    Example:
        >>> registry = ModelRegistry.from_names(["default-classifier"])
        >>> registry.names()
        ['default-classifier']
    """

    def __init__(self, models: list[ServedModel]) -> None:
        self._models: dict[str, ServedModel] = {}
        for served in models:
            if served.name in self._models:
                raise ValueError(f"two models are named {served.name!r}")
            self._models[served.name] = served

    @classmethod
    def from_names(cls, names: list[str] | tuple[str, ...] = DEFAULT_MODELS) -> ModelRegistry:
        """Load models by store name or config path (default: the two default models)."""
        return cls([ServedModel.load(_source(name)) for name in names])

    @classmethod
    def from_directory(cls, directory: str | Path) -> ModelRegistry:
        """Load every ``*/config.yaml`` and ``*.onnx`` (named after the file) in ``directory``."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"models folder {directory} does not exist")
        sources = sorted(directory.glob("*/config.yaml")) + sorted(directory.glob("*.onnx"))
        if not sources:
            raise ValueError(f"models folder {directory} has no */config.yaml or *.onnx")
        return cls([ServedModel.load(path) for path in sources])

    def names(self) -> list[str]:
        return sorted(self._models)

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            raise NotFound(f"unknown model {name!r}; this server serves {self.names()}") from None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._models[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._models)
