"""The torch backend: a module from a ``backbone``, ``factory`` or ``exported_program`` config.

For a :class:`~fam_core.explainers.base.ChannelExplainer` the template's steps
(:meth:`~fam_core.explainers.base.Explainer.forward`, then
:meth:`~fam_core.explainers.base.ChannelExplainer.explain_forward`) run here with the target
chosen from the same forward pass (the predicted class, the nearest prototype), so a heatmap
costs one forward pass plus the method's own work. Other explainers (and channel explainers
that override ``__call__``) run as a whole after a separate prediction pass.

Example:
    >>> from fam_core.models.store import ModelConfig, find_config
    >>> loaded = load_torch_backend(ModelConfig.from_file(find_config("default-classifier")))
    >>> loaded.output_dim, loaded.feature_shape, loaded.backend.default_method
    (48, (5, 5), 'cam')
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any, TypeGuard

import torch
from torch import nn

from fam_core.anatomy.discovery import ModelDoesNotRun
from fam_core.explainers import Explainer, available_methods
from fam_core.explainers.base import ChannelExplainer
from fam_core.explainers.cam.cam import CAM
from fam_core.explainers.default_method import MethodChoice, choose_method
from fam_core.explainers.fam.fam import FAM
from fam_core.explainers.registry import check_runnable
from fam_core.extras import MissingExtraError
from fam_core.messages import first_line
from fam_core.models.model_check import check_torch_model
from fam_core.models.sources import load_module
from fam_core.models.store import ModelConfig
from fam_core.pipeline.backends import Batch, LoadedBackend, ServedView
from fam_core.pipeline.errors import InvalidArgument, NotFound
from fam_core.pipeline.jobs import Computed, Job, predict


def explainer_options(config: ModelConfig) -> dict[str, Any]:
    """The keyword arguments a config gives every explainer (they all take the same
    construction options, :class:`~fam_core.explainers.base.Explainer`): ``similarity``,
    ``task``, ``input_size``, and ``output`` where the config selects one.

    Example:
        >>> from fam_core.models.store import find_config
        >>> config = ModelConfig.from_file(find_config("default-classifier"))
        >>> sorted(explainer_options(config))
        ['input_size', 'similarity', 'task']
    """
    options: dict[str, Any] = {
        "similarity": config.similarity,
        "task": "embedding" if config.task == "knn" else config.task,
        "input_size": config.input_size,
    }
    if config.output is not None:
        options["output"] = config.output
    return options


@dataclass
class TorchBackend:
    """Predicts with a torch module and explains with the registered torch explainers.

    Explainers are built once per method and reused: they keep no state between calls.
    """

    module: nn.Module
    config: ModelConfig
    gallery: Any = None  # task knn: the GalleryIndex it votes over (fam_core.search)
    _explainers: dict[str, Explainer] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _default: MethodChoice | None = field(default=None, repr=False)

    @property
    def methods(self) -> tuple[str, ...]:
        """The registered methods that explain without fitting (``needs_fitting`` is off)."""
        return tuple(available_methods(runnable_only=True))

    @property
    def default_method(self) -> str:
        return self.default_choice.method

    @property
    def default_choice(self) -> MethodChoice:
        """The config's ``method``, else FAM (embedding models), CAM where CAM reads the
        classifier's head on a probe input, Grad-CAM otherwise; decided once."""
        if self._default is None:
            self._default = self._choose_default()
        return self._default

    def _choose_default(self) -> MethodChoice:
        config = self.config
        if config.method is not None or config.task != "classifier":
            return choose_method(config.task, configured=config.method)
        cam = self.explainer("cam")
        assert isinstance(cam, CAM)
        parameter = next(self.module.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(1, config.channels, *config.image_size, generator=generator)
        try:
            refusal = cam.refusal(images.to(device))
        except (ValueError, TypeError) as error:
            refusal = first_line(error)
        return choose_method("classifier", cam_refusal=refusal)

    @property
    def baked(self) -> int:
        return 0

    def check_method(self, method: str) -> None:
        """:class:`NotFound` unless ``method`` is registered and runs without fitting."""
        if method not in self.methods:
            try:
                check_runnable(method)
            except ValueError as error:
                raise NotFound(f"model {self.config.name!r}: {error}") from None
        self.explainer(method)

    def explainer(self, method: str) -> Explainer:
        """The explainer registered as ``method`` for this model (:class:`NotFound` if none)."""
        with self._lock:
            if method not in self._explainers:
                try:
                    cls = check_runnable(method)
                except ValueError as error:
                    raise NotFound(str(error)) from None
                try:
                    self._explainers[method] = cls(
                        self.module,
                        target_layer=self.config.target_layer,
                        **explainer_options(self.config),
                    )
                except MissingExtraError as error:  # e.g. LIFT-CAM without captum
                    raise NotFound(f"method {method!r}: {error}") from None
            return self._explainers[method]

    def run(self, served: ServedView, batch: Batch) -> Computed:
        inputs, job, classes, references = batch.inputs, batch.job, batch.classes, batch.references
        if self.gallery is not None:
            return self._run_knn(inputs, job, classes)
        if not job.heatmap:
            with torch.no_grad():
                outputs = self.explainer("fam").embed(inputs)
            scores, predicted = predict(served, outputs, references)
            return Computed(outputs=outputs, scores=scores, predicted=predicted)
        explainer = self.explainer(job.method)
        try:
            if _explains_in_one_pass(explainer):
                return _explain_in_one_pass(served, explainer, inputs, classes, references)
            with torch.no_grad():
                outputs = explainer.embed(inputs)
            scores, predicted = predict(served, outputs, references)
            explanation = explainer(inputs, _target(served, predicted, classes, references))
        except (ValueError, TypeError) as error:
            raise InvalidArgument(
                f"method {job.method!r} on model {served.name!r}: {error}"
            ) from None
        return Computed.explained_by(outputs, scores, predicted, explanation)

    def _run_knn(self, inputs: torch.Tensor, job: Job, classes: list[int | None]) -> Computed:
        """Task knn: NPID's vote over the gallery; the map explains the predicted class (or
        the requested one) with the paper's kNN target, from the same forward pass."""
        from fam_core.search.knn import knn_classify, knn_targets

        config = self.config
        names = config.class_names
        explainer = self.explainer(job.method if job.heatmap else "fam")
        forward = explainer.forward(inputs) if _explains_in_one_pass(explainer) else None
        if forward is not None:
            outputs = forward.outputs.detach()
        else:
            with torch.no_grad():
                outputs = explainer.embed(inputs)
        try:
            voted = knn_classify(
                self.gallery, outputs, k=config.k, temperature=config.temperature, classes=names
            )
            scores = voted.probabilities.to(outputs.device)
            predicted = voted.predicted.to(outputs.device)
            if not job.heatmap:
                return Computed(outputs=outputs, scores=scores, predicted=predicted)
            chosen = [
                p if c is None else c
                for c, p in zip(classes, voted.predicted.tolist(), strict=True)
            ]
            targets = knn_targets(self.gallery, outputs, [names[c] for c in chosen])
            if forward is not None:
                explanation = explainer.explain_forward(forward, targets, inputs)  # type: ignore[attr-defined]
            else:
                explanation = explainer(inputs, targets)
        except (ValueError, TypeError) as error:
            raise InvalidArgument(f"model {config.name!r}: {error}") from None
        return Computed.explained_by(outputs, scores, predicted, explanation)


def load_torch_backend(
    config: ModelConfig,
    device: torch.device | str = "cpu",
    *,
    target_layer: str | None = None,
) -> LoadedBackend:
    """Build the config's module, probe one ``[1, C, H, W]`` input (``C``: the config's
    ``channels``) for the output and feature shapes; ``target_layer`` overrides the config's.
    Errors are one-line ``ValueError``."""
    try:
        module = load_module(config).to(device).eval()
    except ValueError as error:
        raise ValueError(f"model {config.name!r}: {error}") from None
    check_torch_model(module, config)
    if target_layer is not None:
        config = replace(config, target_layer=target_layer)
    options = explainer_options(config)
    try:
        probe = FAM(module, target_layer=config.target_layer, **options)
    except ModelDoesNotRun as error:  # the layer search's input (the probe above ran)
        raise ValueError(
            f"model {config.name!r}: input_size: {error.reason}; set input_size: (or "
            "target_layer:) in the config"
        ) from None
    except (ValueError, TypeError) as error:
        raise ValueError(f"model {config.name!r}: target_layer: {first_line(error)}") from None
    height, width = config.image_size
    channels = config.channels
    try:
        with torch.no_grad():
            forward = probe.forward(torch.zeros(1, channels, height, width, device=device))
    except Exception as error:  # noqa: BLE001 - the user's model may raise anything
        raise ValueError(
            f"model {config.name!r}: input_size: a [1, {channels}, {height}, {width}] input "
            f"failed: {type(error).__name__}: {first_line(error)}"
        ) from None
    outputs, activations = forward.outputs, forward.activations
    config = replace(config, target_layer=probe.target_layer)
    prototypes = config.load_prototypes() if config.task == "embedding" else None
    if prototypes is not None:
        prototypes = prototypes.to(device=outputs.device, dtype=torch.float32)
    feature_height, feature_width = activations.shape[-2:]
    backend = TorchBackend(module, config)
    backend._explainers["fam"] = probe
    if config.task == "knn":
        backend.gallery, config = _open_gallery(backend, int(outputs.shape[1]))
        backend.config = config
    if config.method is not None:
        try:
            backend.check_method(config.method)
        except ValueError as error:
            text = first_line(error).removeprefix(f"model {config.name!r}: ")
            raise ValueError(f"model {config.name!r}: method: {text}") from None
    backend.default_choice  # noqa: B018 - decided at load, not on the first request
    return LoadedBackend(
        config=config,
        backend=backend,
        prototypes=prototypes,
        output_dim=int(outputs.shape[1]),
        feature_shape=(int(feature_height), int(feature_width)),
    )


def _open_gallery(backend: TorchBackend, output_dim: int) -> tuple[Any, ModelConfig]:
    """The gallery of a knn model, checked against the model; its labels become the
    config's class names. One-line ``ValueError`` when it cannot be reached or is another
    model's."""
    from fam_core.search import model_card, open_index

    config = backend.config
    gallery = open_index(str(config.index_uri), search_params=config.index_search)
    view = LoadedBackend(config, backend, None, output_dim, (0, 0))
    try:
        gallery.check_model(model_card(view))
        gallery.check_search_params()
        labels = tuple(gallery.labels())
    except ValueError as error:
        raise ValueError(f"model {config.name!r}: index: {first_line(error)}") from None
    if not labels:
        raise ValueError(f"model {config.name!r}: index: {config.index} has no labelled image")
    return gallery, replace(config, class_names=labels)


def _target(
    served: ServedView,
    predicted: torch.Tensor,
    classes: list[int | None],
    references: torch.Tensor | None,
) -> torch.Tensor | list[int] | None:
    if served.task == "classifier":
        return [
            int(p) if c is None else c for c, p in zip(classes, predicted.tolist(), strict=True)
        ]
    if references is not None:
        return references
    if served.prototypes is not None:
        return served.prototypes[predicted].unsqueeze(1)  # the nearest prototype, [B, 1, D]
    return None  # explains the embedding itself


def _explains_in_one_pass(explainer: Explainer) -> TypeGuard[ChannelExplainer]:
    """Whether ``explainer(images, target)`` is ``explain_forward`` after its own forward."""
    return (
        isinstance(explainer, ChannelExplainer)
        and type(explainer).__call__ is ChannelExplainer.__call__
    )


def _explain_in_one_pass(
    served: ServedView,
    explainer: ChannelExplainer,
    inputs: torch.Tensor,
    classes: list[int | None],
    references: torch.Tensor | None,
) -> Computed:
    """``ChannelExplainer.__call__`` with the target taken from the same forward pass."""
    forward = explainer.forward(inputs)
    scores, predicted = predict(served, forward.outputs, references)
    target = _target(served, predicted, classes, references)
    explanation = explainer.explain_forward(forward, target, inputs)
    return Computed.explained_by(forward.outputs.detach(), scores, predicted, explanation)
