"""Captum interop: fam_core explainers as Captum layer attributions, and Captum on embeddings.

Two directions:

- :class:`SimilarityForward` turns an embedding model plus reference embeddings into a
  forward function with one scalar per image, the mean similarity to the references
  (FAM eq. 11). Captum's own methods (``IntegratedGradients``, ``Occlusion``,
  ``LayerGradCam``, ``NoiseTunnel``...) then explain embedding models.
- ``<Method>Attribution(forward_func, layer)`` (:class:`FAMAttribution`,
  :class:`GradCAMAttribution`, ... or :func:`layer_attribution` by method name) is a
  Captum ``LayerAttribution``: ``.attribute(inputs, target=None,
  additional_forward_args=None)`` returns the map ``N x 1 x h x w`` at the layer's
  resolution, before normalisation (``Explanation.raw``), so
  ``LayerAttribution.interpolate(attr, (H, W), "bilinear")`` then min-max gives
  ``Explanation.maps``. Captum's ``infidelity`` and ``sensitivity_max`` take them as any
  Captum attribution.

Where the reference embeddings travel:

- ``target``: class index / list / tensor of ints (classifiers, as in Captum) or a float
  tensor of reference embeddings ``[D]``, ``[K, D]`` or ``[B, K, D]`` (fam_core's contract).
- With a :class:`SimilarityForward` as ``forward_func``: the references given to its
  constructor (shared by every image), or per image as ``additional_forward_args``
  (``[B, D]`` or ``[B, K, D]``), exactly as Captum's own methods receive them; ``target``
  must then be ``None``.

This module is ``fam_core.captum``; it imports the real ``captum`` package with absolute
imports (``from __future__ import annotations`` and no relative ``captum`` import).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
from torch import nn

import fam_core.explainers  # noqa: F401  (registers the methods the wrappers are made for)
from fam_core.anatomy.outputs import OutputSpec, check_output_spec, select_output
from fam_core.anatomy.pooling import PoolingKind, global_pool
from fam_core.explainers.base import Explainer, check_model_options
from fam_core.explainers.registry import captum_methods, get_explainer
from fam_core.explainers.targets import Target
from fam_core.extras import require
from fam_core.maths.similarity import SimilarityKind, similarity

LayerAttribution = require("captum", "captum.attr").LayerAttribution


def _per_image_references(references: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B, D]`` / ``[B, K, D]`` per-image references as ``[B, K, D]``."""
    if not isinstance(references, torch.Tensor) or not references.is_floating_point():
        raise TypeError(
            "additional_forward_args must be a float tensor of per-image references "
            f"[B, D] or [B, K, D], got {type(references).__name__}"
        )
    if references.dim() == 2:
        references = references.unsqueeze(1)
    if references.dim() != 3 or references.shape[0] != batch:
        raise ValueError(
            f"per-image references must be [B, D] or [B, K, D] with B = {batch}, got "
            f"{tuple(references.shape)}"
        )
    return references


class SimilarityForward(nn.Module):
    """``images -> mean_k s(model(images), R_k)``: one scalar per image (FAM eq. 11).

    Args:
        model: embedding model returning ``[B, D]`` (or a feature map, pooled with ``pooling``).
        references: shared references ``[D]`` or ``[K, D]``; ``None`` means per-image
            references must come with every call (``forward(images, references)``).
        similarity: ``"cosine"`` (default), ``"dot"`` or ``"euclidean"``.
        pooling: pooling of a feature-map output.
        output: which model output is the embedding (a key, an index or a callable; see
            :mod:`fam_core.anatomy.outputs`), for models returning a tuple, dict or ``ModelOutput``.

    ``forward(images, references=None)`` takes per-image references ``[B, D]`` or
    ``[B, K, D]`` (Captum passes them as ``additional_forward_args`` and expands them with
    the inputs, e.g. for ``IntegratedGradients`` steps or ``NoiseTunnel`` samples).

    Example:
        >>> from captum.attr import IntegratedGradients
        >>> from fam_core.models.backbones import conv4
        >>> model = conv4(width=0.25).eval()
        >>> forward = SimilarityForward(model, model(torch.rand(2, 3, 84, 84)).detach())
        >>> IntegratedGradients(forward).attribute(torch.rand(1, 3, 84, 84), n_steps=4).shape
        torch.Size([1, 3, 84, 84])
    """

    def __init__(
        self,
        model: nn.Module,
        references: torch.Tensor | None = None,
        *,
        similarity: SimilarityKind = "cosine",
        pooling: PoolingKind = "avg",
        output: OutputSpec = None,
    ) -> None:
        super().__init__()
        check_model_options(model, similarity, pooling)
        check_output_spec(output)
        self.output = output
        if references is not None:
            if not isinstance(references, torch.Tensor) or not references.is_floating_point():
                raise TypeError("references must be a float tensor [D] or [K, D]")
            if references.dim() == 1:
                references = references.unsqueeze(0)
            if references.dim() != 2 or references.shape[0] == 0:
                raise ValueError(
                    f"references must be [D] or [K, D] with K >= 1, got {tuple(references.shape)}"
                )
            references = references.detach()
        self.model = model
        self.references = references
        self.similarity: SimilarityKind = similarity
        self.pooling: PoolingKind = pooling

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The embeddings ``[B, D]``: the selected output (``output=``), pooled if a map."""
        outputs = select_output(self.model(images), self.output)
        return global_pool(outputs, self.pooling) if outputs.dim() == 4 else outputs

    def resolve(self, batch: int, references: torch.Tensor | None) -> torch.Tensor:
        """The references ``[B, K, D]`` of a batch of ``batch`` images."""
        if references is not None:
            return _per_image_references(references, batch)
        if self.references is None:
            raise ValueError(
                "SimilarityForward has no references: give them to the constructor or per "
                "image as additional_forward_args ([B, D] or [B, K, D])"
            )
        return self.references.unsqueeze(0).expand(batch, -1, -1)

    def forward(self, images: torch.Tensor, references: torch.Tensor | None = None) -> torch.Tensor:
        embeddings = self.embed(images)
        targets = self.resolve(embeddings.shape[0], references)
        if targets.shape[-1] != embeddings.shape[1]:
            raise ValueError(
                f"reference embeddings have dimension {targets.shape[-1]}, the model's "
                f"embeddings have {embeddings.shape[1]}"
            )
        targets = targets.to(device=embeddings.device, dtype=embeddings.dtype)
        return similarity(embeddings, targets, self.similarity).mean(dim=1)


class ExplainerAttribution(LayerAttribution):
    """A fam_core explainer behind Captum's ``LayerAttribution`` interface.

    Args:
        forward_func: the model (``nn.Module``: classifier or embedding model), or a
            :class:`SimilarityForward` wrapping an embedding model and its references.
        layer: the layer to explain (a module of the model).
        device_ids: accepted for Captum compatibility (unused: explainers run on the
            model's device).
        **explainer_options: passed to the explainer (e.g. ``batch_size`` for Score-CAM,
            ``similarity``; with a :class:`SimilarityForward` its similarity is the default).
    """

    explainer_class: ClassVar[type[Explainer]]

    def __init__(
        self,
        forward_func: nn.Module,
        layer: nn.Module,
        device_ids: list[int] | None = None,
        **explainer_options: Any,
    ) -> None:
        super().__init__(forward_func, layer, device_ids)
        if isinstance(forward_func, SimilarityForward):
            explainer_options.setdefault("similarity", forward_func.similarity)
            explainer_options.setdefault("pooling", forward_func.pooling)
            explainer_options.setdefault("output", forward_func.output)
            model = forward_func.model
        elif isinstance(forward_func, nn.Module):
            model = forward_func
        else:
            raise TypeError(
                "forward_func must be the model (an nn.Module) or a SimilarityForward; fam_core "
                f"explainers hook the model's layers, got {type(forward_func).__name__}"
            )
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer must be an nn.Module of the model, got {type(layer).__name__}")
        self.explainer = self.explainer_class(model, layer, **explainer_options)

    def attribute(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor],
        target: Target = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor]:
        """The map ``N x 1 x h x w`` at the layer's resolution (``Explanation.raw``).

        As in Captum, a tuple of inputs gives a tuple of attributions.

        Example:
            >>> from fam_core.models.backbones import conv4
            >>> model = conv4(num_classes=5, width=0.25).eval()
            >>> attribution = GradCAMAttribution(model, model.block4)
            >>> attribution.attribute(torch.rand(2, 3, 84, 84), target=[1, 4]).shape
            torch.Size([2, 1, 5, 5])
        """
        if attribute_to_layer_input:
            raise ValueError("fam_core explainers attribute to the layer output only")
        images = self._images(inputs)
        explanation = self.explainer(images, self._target(images, target, additional_forward_args))
        attribution = explanation.raw.unsqueeze(1)
        return (attribution,) if isinstance(inputs, tuple) else attribution

    @staticmethod
    def _images(inputs: torch.Tensor | tuple[torch.Tensor]) -> torch.Tensor:
        if isinstance(inputs, tuple):
            if len(inputs) != 1:
                raise ValueError(
                    f"fam_core explainers take one input tensor, got a tuple of {len(inputs)}"
                )
            (inputs,) = inputs
        return inputs

    def _target(self, images: torch.Tensor, target: Target, additional: Any) -> Target:
        if isinstance(additional, tuple):
            if len(additional) != 1:
                raise ValueError(
                    "additional_forward_args must be one tensor of per-image references, got "
                    f"a tuple of {len(additional)}"
                )
            (additional,) = additional
        forward = self.forward_func
        if not isinstance(forward, SimilarityForward):
            if additional is not None:
                raise ValueError(
                    "additional_forward_args carry references only with a SimilarityForward "
                    "forward_func; pass the references as target"
                )
            return target
        if target is not None:
            if isinstance(target, torch.Tensor) and target.is_floating_point():
                return target
            raise ValueError(
                "a SimilarityForward outputs one score per image: target must be None (or "
                "reference embeddings), got class indices"
            )
        if additional is None and forward.references is None:
            return None  # no references: the explainer explains each image's own embedding
        return forward.resolve(images.shape[0], additional)


# What a wrapper's generated docstring adds to the common text, by method name.
_NOTES = {
    "guided-gradcam": "Its map is at the input's resolution: ``attribute`` returns ``N x 1 x H x W``.",
}


@functools.cache
def layer_attribution(method: str) -> type[ExplainerAttribution]:
    """The Captum layer-attribution class of any registered fam_core method.

    One class per method (the same class on every call): ``<Explainer>Attribution``, a
    subclass of :class:`ExplainerAttribution` bound to the explainer, with a docstring made
    from the explainer's. The per-method names of this module (``FAMAttribution``,
    ``GradCAMAttribution``, ...: :data:`WRAPPERS`) are classes made here, one for each
    method whose capabilities declare ``captum``.

    Example:
        >>> layer_attribution("fam").explainer_class.__name__
        'FAM'
        >>> layer_attribution("gradcam") is GradCAMAttribution
        True
    """
    explainer_class = get_explainer(method)
    summary = (explainer_class.__doc__ or "").strip().partition("\n")[0]
    doc = (
        f":class:`~{explainer_class.__module__}.{explainer_class.__qualname__}` as a Captum "
        f"layer attribution (``layer_attribution({method!r})``).\n\n"
        + (f"{summary}\n\n" if summary else "")
        + "Arguments and ``attribute`` as in :class:`ExplainerAttribution`."
        + (f"\n\n{_NOTES[method]}" if method in _NOTES else "")
    )
    name = f"{explainer_class.__name__}Attribution"
    return type(
        name,
        (ExplainerAttribution,),
        {
            "explainer_class": explainer_class,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": doc,
        },
    )


def _wrapper_names() -> dict[str, type[ExplainerAttribution]]:
    """The module's per-method names: one wrapper for each method that declares ``captum``
    (:func:`fam_core.explainers.registry.captum_methods`)."""
    wrappers = (layer_attribution(method) for method in captum_methods())
    return {wrapper.__name__: wrapper for wrapper in wrappers}


WRAPPERS = _wrapper_names()
"""``FAMAttribution``, ``CAMAttribution``, ``GradCAMAttribution``, ...: the wrapper classes
this module names, by class name."""
globals().update(WRAPPERS)

__all__ = sorted(  # the wrappers are made from the capabilities
    ["ExplainerAttribution", "SimilarityForward", "layer_attribution", *WRAPPERS]
)
