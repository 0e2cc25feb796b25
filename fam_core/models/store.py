"""Model configs and the model store: ``load_model("default-embedding")``.

A model is a folder with ``config.yaml`` (see :class:`ModelConfig`) and its weights,
loaded with ``torch.load(..., weights_only=True)``. Named models are looked up in the
folders of ``$FAM_MODEL_STORE`` (``os.pathsep``-separated), then in the repository's
``model-store/``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import yaml
from torch import nn

from fam_core.models.backbones import build_backbone

REPO_MODEL_STORE = Path(__file__).resolve().parents[2] / "model-store"
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


@dataclass(frozen=True)
class ModelConfig:
    """Everything a front door needs to run and explain a model.

    Attributes:
        name: registry name, e.g. ``"default-embedding"``.
        task: ``"embedding"`` or ``"classifier"``.
        backbone: a name from :data:`fam_core.models.backbones.BACKBONES`.
        backbone_kwargs: keyword arguments of the backbone factory.
        weights: weights file, relative to the config's folder.
        target_layer: the layer explainers use by default.
        input_size: square input side in pixels.
        mean, std: per-channel normalisation of ``[0, 1]`` images.
        class_names: the classifier's classes, or the labels of ``prototypes``.
        prototypes: optional ``[K, D]`` tensor file of class prototypes (embedding models).
        similarity: the similarity the embedding model was trained for.
        metrics: what the training script measured (accuracy, interval, ...).
        onnx: optional exported ``.onnx`` file (relative to the config's folder) that serves
            this model instead of the weights; its metadata supplies the target layer and
            preprocessing (``backbone``, ``weights`` and ``target_layer`` may then be omitted).
        directory: the folder the config was read from.
    """

    name: str
    task: Literal["embedding", "classifier"]
    backbone: str
    weights: str
    target_layer: str
    input_size: int = 84
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    class_names: tuple[str, ...] = ()
    prototypes: str | None = None
    similarity: str = "cosine"
    metrics: dict[str, Any] = field(default_factory=dict)
    onnx: str | None = None
    directory: Path = Path(".")

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read a ``config.yaml``; unknown or missing keys raise ``ValueError``."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(f"cannot read model config {path}: {error}") from error
        if not isinstance(raw, dict):
            raise ValueError(f"model config {path} must be a mapping")
        known = {f for f in cls.__dataclass_fields__ if f != "directory"}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"model config {path} has unknown keys {sorted(unknown)}")
        if raw.get("onnx") is not None:  # an exported graph: the file's metadata fills the rest
            if not isinstance(raw["onnx"], str):
                raise ValueError(f"model config {path}: onnx must be a file name")
            raw.setdefault("backbone", "onnx")
            raw.setdefault("weights", raw["onnx"])
            raw.setdefault("target_layer", "")
        for key in ("name", "task", "backbone", "weights", "target_layer"):
            if key not in raw:
                raise ValueError(f"model config {path} lacks the key {key!r}")
        if raw["task"] not in ("embedding", "classifier"):
            raise ValueError(f"model config {path}: task must be 'embedding' or 'classifier'")
        for key in ("mean", "std", "class_names"):
            if key in raw:
                raw[key] = tuple(raw[key])
        return cls(**raw, directory=path.parent)

    def to_file(self, path: str | Path) -> None:
        """Write this config as YAML (``directory`` is implied by the file's location)."""
        data = asdict(self)
        data.pop("directory")
        for key in ("mean", "std", "class_names"):
            data[key] = list(data[key])
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))

    def build(self) -> nn.Module:
        """The architecture with freshly initialised weights."""
        return build_backbone(self.backbone, **self.backbone_kwargs)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` images in ``[0, 1]`` to the model's input distribution."""
        return normalize_images(images, self.mean, self.std)

    def load_prototypes(self) -> torch.Tensor | None:
        """The ``[K, D]`` prototypes, or ``None`` when the model has none."""
        if self.prototypes is None:
            return None
        return torch.load(self.directory / self.prototypes, map_location="cpu", weights_only=True)


class LoadedModel(NamedTuple):
    """``model, config = load_model(...)``."""

    model: nn.Module
    config: ModelConfig


def model_store_paths() -> list[Path]:
    """Folders searched for named models, in order."""
    extra = os.environ.get("FAM_MODEL_STORE", "")
    return [Path(p) for p in extra.split(os.pathsep) if p] + [REPO_MODEL_STORE]


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
    """Load a model in eval mode with its config.

    Example:
        >>> model, config = load_model("default-embedding")
        >>> config.target_layer
        'block4'
    """
    config = ModelConfig.from_file(find_config(name_or_path))
    if config.onnx is not None:
        raise ValueError(
            f"model {config.name!r} is an ONNX graph ({config.onnx}): serve it with `fam serve` "
            "or run it with fam_core.onnx_runtime.OnnxExplainer"
        )
    model = config.build()
    weights_path = config.directory / config.weights
    if not weights_path.is_file():
        raise ValueError(f"model {config.name!r}: weights file {weights_path} is missing")
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return LoadedModel(model.to(device).eval(), config)
