"""Model sources behind one interface: what a served model runs on.

A :class:`Backend` predicts and explains a batch (:meth:`Backend.run`) and says which
methods it explains with. Two implement it:

- :class:`fam_core.pipeline.torch_backend.TorchBackend`: a torch module built from a
  ``backbone``, a ``factory`` or an ``exported_program`` config, explained by the registered
  torch explainers;
- :class:`fam_core.pipeline.onnx_backend.OnnxBackend`: an ONNX graph with its explanation head,
  run by onnxruntime.

Each backend module has a loader that returns a :class:`LoadedBackend`, from which
:class:`~fam_core.pipeline.models.ServedModel` is made. Backends depend on
:mod:`fam_core.pipeline.jobs` only, never on the served-model or engine modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from fam_core.explainers.default_method import MethodChoice
from fam_core.models.store import ModelConfig
from fam_core.pipeline.jobs import Computed, Job, Scoring


@dataclass(frozen=True)
class Batch:
    """One batch a backend runs (:meth:`Backend.run`): the inputs and what to explain.

    Example:
        >>> inputs = torch.rand(2, 3, 8, 8)
        >>> batch = Batch(inputs, Job(inputs=inputs, method="fam"), [None, 3])
        >>> len(batch.classes), batch.references is None
        (2, True)
    """

    inputs: torch.Tensor  # [B, C, H, W]
    job: Job  # the method and what to return, shared by the batch's jobs
    classes: list[int | None]  # per item, the class to explain (None: the predicted one)
    references: torch.Tensor | None = None  # [B, K, D] per-item references (embedding models)


class ServedView(Scoring, Protocol):
    """What a backend reads from the served model it runs for."""

    @property
    def name(self) -> str: ...

    @property
    def output_dim(self) -> int: ...


class Backend(Protocol):
    """One model source: runs batches and knows its explanation methods."""

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods this backend explains with."""
        ...

    @property
    def default_method(self) -> str:
        """The method used when a request names none."""
        ...

    @property
    def default_choice(self) -> MethodChoice:
        """:attr:`default_method` and why (:func:`fam_core.explainers.default_method.choose_method`)."""
        ...

    @property
    def baked(self) -> int:
        """Prototypes built into the model (0: none; scored against the config's instead)."""
        ...

    def check_method(self, method: str) -> None:
        """Raise :class:`~fam_core.pipeline.errors.NotFound` unless it explains with ``method``."""
        ...

    def run(self, served: ServedView, batch: Batch) -> Computed:
        """Predict (and, when ``batch.job.heatmap``, explain) ``batch.inputs``."""
        ...


@dataclass(frozen=True)
class LoadedBackend:
    """A backend with the config and probed shapes a served model is made of."""

    config: ModelConfig
    backend: Backend
    prototypes: torch.Tensor | None
    output_dim: int
    feature_shape: tuple[int, int]
