"""A model and its explanation head as one ``nn.Module``: what gets traced into ONNX.

Every graph runs the model once, takes the target layer's activations ``A`` ``[B, N, h, w]``
with a forward hook (registered per call, removed in ``finally``), and computes the
explanation from them in the same pass with plain tensor operators:

- :class:`FAMGraph` (FAM, Liao et al. section IV): contributions (eq. 14-15), mean over the
  references (eq. 11) or the best-scoring one, ``C = W C'^T`` (eq. 18), min-max (eq. 12),
  ``sum_n c_n A^n`` (eq. 13), bilinear upsampling and min-max.
- :class:`GradFAMGraph`: weights are the spatial mean of ``dS/dA`` written analytically
  (:mod:`fam_core.exporters.analytic`), ``ReLU(sum_n w_n A^n)``.
- :class:`CAMGraph`: CAM (eq. 1: the linear head's row of the class) or Grad-CAM (the spatial
  mean of ``d y_c / dA``, analytic), for the top-1 class or a ``class_index`` input.

The head maths exist once, as the functions :func:`fam_explanation`,
:func:`gradfam_explanation` and :func:`cam_explanation` of ``(outputs, activations,
references or classes, matrix)``: the graphs above call them after their forward pass, and
:class:`ExplanationHead` calls them on activations and outputs that another graph computed
(:mod:`fam_core.exporters.graft` exports it alone and grafts it onto a foreign ONNX graph).

The pieces are fam_core's: :func:`fam_core.maths.similarity.channel_contributions`,
:func:`fam_core.anatomy.adapters.find_head` (``Head.matrix``) and
:func:`fam_core.explainers.postprocess.min_max` / :func:`~fam_core.explainers.postprocess.upsample`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from fam_core.anatomy.adapters import Head
from fam_core.anatomy.discovery import probe_size
from fam_core.anatomy.pooling import PoolingKind
from fam_core.explainers.base import ChannelExplainer
from fam_core.explainers.cam.cam import CAM
from fam_core.explainers.cam.gradcam import GradCAM
from fam_core.explainers.fam.fam import FAM
from fam_core.explainers.fam.gradfam import GradFAM
from fam_core.explainers.hooks import captured_outputs
from fam_core.explainers.postprocess import min_max, upsample
from fam_core.exporters.analytic import pooling_kind, similarity_gradient
from fam_core.graphs import onnx_format as fmt
from fam_core.maths.fam import (
    EXPLAIN_MODES,
    ExplainMode,
    fam_embedding_weights,
    rectified_sum,
    to_channels,
    weighted_sum,
)
from fam_core.maths.similarity import SIMILARITIES, SimilarityKind, channel_contributions

__all__ = [
    "EXPLAIN_MODES",
    "CAMGraph",
    "ExplainMode",
    "ExplanationGraph",
    "ExplanationHead",
    "FAMGraph",
    "GradFAMGraph",
    "cam_explanation",
    "combine",
    "fam_explanation",
    "gradfam_explanation",
    "reference_scores",
    "to_channels",
]

combine = weighted_sum  # eq. 13, the name the export heads have always used


class ExplanationGraph(nn.Module):
    """Base: an explainer's model, target layer, layout and output, and the linear head.

    Everything the graph needs is the library's: the explainer (:mod:`fam_core.explainers`)
    finds the target layer from the dataflow, reads its output through its layout (tokens
    and channel-last outputs become maps ``[B, N, h, w]``), selects the explained output
    (``output=``) and finds the head (:meth:`~fam_core.explainers.base.Explainer.head_for`).
    The graph keeps the head's matrix ``W`` ``[J, N]`` as a constant: it exists for linear and
    identity heads only (other heads are exported by tracing the explainer itself, see
    :func:`fam_core.exporters.export.export_model`).

    Args:
        model: the model in eval mode (ignored when ``explainer`` is given), or an explainer.
        target_layer: name of a layer with feature maps; ``None``: found from the dataflow.
        pooling: pooling used where the model ends with a feature map.
        explainer: the explainer whose choices the graph takes (default: the graph's
            method built on ``model``).
        input_size: ``(H, W)`` (or one side) of the inputs the graph is exported for.
    """

    method = "?"
    explainer_class: ClassVar[type[ChannelExplainer]]

    def __init__(
        self,
        model: nn.Module | None,
        target_layer: str | None = None,
        *,
        pooling: PoolingKind = "avg",
        explainer: ChannelExplainer | None = None,
        input_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if explainer is None:
            if not isinstance(model, nn.Module):
                raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
            _check_eval(model)
            explainer = self.explainer_class(
                model, target_layer, pooling=pooling, input_size=input_size
            )
        model = explainer.model
        _check_eval(model)
        self.model = model
        self.explainer = explainer
        self.target_layer, self._layer = explainer.target_layer, explainer.layer
        self.pooling: PoolingKind = explainer.pooling
        size = probe_size(model, input_size)
        # a constant size for the traced Resize when exported for one; else the image's
        self.heatmap_size: tuple[int, int] | None = size if input_size is not None else None
        sample = sample_images(model, size)
        with torch.no_grad():
            forward = explainer.forward(sample, graph=False)
        self.layout = forward.layout
        self.head: Head = explainer.head_for(forward, sample)
        if self.head.kind == "jacobian":
            raise ValueError(
                f"cannot export {self.method}: the head after {self.target_layer!r} is not "
                f"linear (layer {self.head.nonlinear_layer!r}); an ONNX explanation head with a "
                "constant matrix needs a linear head (export_model traces the Jacobian instead "
                "unless nonlinear_head='error')"
            )
        matrix = self.head.matrix
        self.register_buffer("matrix", None if matrix is None else matrix.detach().clone())

    def run(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(outputs [B, D], activations [B, N, h, w])`` from one forward pass."""
        raw_outputs, captured = captured_outputs(self._layer, lambda: self.model(image))
        if not captured:
            raise ValueError(f"target layer {self.target_layer!r} did not run in the forward pass")
        tensor = captured[-1]
        return self.explainer._as_vectors(raw_outputs), self.layout.to_map(tensor)

    def upsample(self, raw: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Bilinear upsampling to the input size, then min-max per map."""
        return upsample(raw, self.heatmap_size or image.shape[-2:])

    def to_channels(self, embedding_weights: torch.Tensor) -> torch.Tensor:
        """``C = W x C'^T`` (eq. 18): weights on the outputs ``[B, J]`` to channels ``[B, N]``."""
        return to_channels(embedding_weights, self.matrix)

    def check_head(self, image: torch.Tensor) -> int:
        """Raise ``ValueError`` unless the head found reproduces the model's outputs.

        Returns the output dimension ``D``.
        """
        with torch.no_grad():
            outputs, activations = self.run(image)
            predicted = self.head.transform(self.head.pool(activations))
        channels = activations.shape[1]
        if self.matrix is None and outputs.shape[1] != channels:
            raise ValueError(
                f"the outputs have {outputs.shape[1]} dimensions but layer {self.target_layer!r} "
                f"has {channels} channels and no linear head follows it"
            )
        if predicted.shape != outputs.shape or not torch.allclose(
            predicted, outputs, rtol=1e-3, atol=1e-4
        ):
            raise ValueError(
                f"the head found after {self.target_layer!r} does not reproduce the model's "
                "output: pass target_layer, or check that the model is deterministic in eval mode"
            )
        return outputs.shape[1]


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise ValueError("put the model in eval mode (model.eval()) before exporting it")


def sample_images(model: nn.Module, size: tuple[int, int], batch: int = 2) -> torch.Tensor:
    """Random images ``[batch, C, H, W]`` on the model's device, ``C`` from its first
    convolution (3 without one): what the exporters trace and check with.

    Example:
        >>> sample_images(nn.Conv2d(1, 2, 3), (4, 6)).shape
        torch.Size([2, 1, 4, 6])
    """
    from fam_core.anatomy.adapters import input_channels

    parameter = next(model.parameters(), None)
    device = None if parameter is None else parameter.device
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, input_channels(model) or 3, *size, generator=generator)
    return images.to(device)


# -- The head maths: the traced full-model graphs above and the grafted head
# (:class:`ExplanationHead`, :mod:`fam_core.exporters.graft`) call these functions, which are
# compositions of :mod:`fam_core.maths.fam`, the functions the torch explainers call.


def reference_scores(
    outputs: torch.Tensor, references: torch.Tensor, similarity: SimilarityKind
) -> torch.Tensor:
    """``s(Z', R_k)`` ``[B, K]`` for outputs ``[B, D]`` and references ``[B, K, D]``."""
    return channel_contributions(outputs, references, similarity).sum(dim=2)


def fam_explanation(
    outputs: torch.Tensor,
    activations: torch.Tensor,
    references: torch.Tensor,
    matrix: torch.Tensor | None,
    similarity: SimilarityKind,
    explain: ExplainMode = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FAM (eq. 11-18) from one forward pass: ``(scores [B, K], weights [B, N], raw [B, h, w])``.

    ``outputs`` ``[B, D]``, ``activations`` ``[B, N, h, w]``, ``references`` ``[B, K, D]``,
    ``matrix`` the head's ``W`` ``[D, N]`` (``None``: identity). ``explain="best"`` explains
    only each image's best-scoring reference.

    Example:
        >>> activations = torch.rand(2, 4, 3, 3)
        >>> outputs = activations.mean(dim=(2, 3))
        >>> scores, weights, raw = fam_explanation(
        ...     outputs, activations, torch.rand(2, 5, 4), None, "cosine"
        ... )
        >>> scores.shape, weights.shape, raw.shape
        (torch.Size([2, 5]), torch.Size([2, 4]), torch.Size([2, 3, 3]))
    """
    contributions = channel_contributions(outputs, references, similarity)  # eq. 14, [B, K, D]
    scores, embedding_weights = fam_embedding_weights(contributions, explain)  # eq. 15, 11
    weights = min_max(to_channels(embedding_weights, matrix), dim=1)  # eq. 18, eq. 12
    return scores, weights, weighted_sum(weights, activations)  # eq. 13


def gradfam_explanation(
    outputs: torch.Tensor,
    activations: torch.Tensor,
    references: torch.Tensor,
    matrix: torch.Tensor | None,
    similarity: SimilarityKind,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Analytic Grad-FAM for global pooling + linear head: ``(scores, weights, raw)``.

    ``w = (1 / hw) W^T dS/dz'`` (the spatial mean of ``dS/dA``), ``raw = ReLU(sum_n w_n A^n)``.

    Example:
        >>> activations = torch.rand(1, 4, 2, 2)
        >>> scores, weights, raw = gradfam_explanation(
        ...     activations.mean(dim=(2, 3)), activations, torch.rand(1, 3, 4), None, "dot"
        ... )
        >>> bool((raw >= 0).all())
        True
    """
    scores = reference_scores(outputs, references, similarity)  # [B, K]
    area = activations.shape[2] * activations.shape[3]
    gradient = similarity_gradient(outputs, references, similarity)  # dS/dz', [B, J]
    weights = to_channels(gradient, matrix) / area  # spatial mean of dS/dA, [B, N]
    return scores, weights, rectified_sum(weights, activations)


def cam_explanation(
    activations: torch.Tensor, classes: torch.Tensor, matrix: torch.Tensor, gradient: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """CAM (eq. 1) or analytic Grad-CAM for classes ``[B]``: ``(weights [B, N], raw [B, h, w])``.

    CAM: ``w = W[c]``, ``raw = sum_n w_n A^n``; Grad-CAM: ``w = W[c] / hw``, ReLU.

    Example:
        >>> weights, raw = cam_explanation(
        ...     torch.ones(1, 2, 2, 2), torch.tensor([1]), torch.eye(2), gradient=False
        ... )
        >>> weights, raw[0, 0, 0].item()
        (tensor([[0., 1.]]), 1.0)
    """
    weights = matrix[classes]  # [B, N]: the class's row of the linear head
    if gradient:
        weights = weights / (activations.shape[2] * activations.shape[3])
    if gradient:
        return weights, rectified_sum(weights, activations)
    return weights, weighted_sum(weights, activations)


class _ReferenceGraph(ExplanationGraph):
    """Shared by FAM and Grad-FAM: references as an input or baked constants."""

    def __init__(
        self,
        model: nn.Module | None,
        target_layer: str | None = None,
        *,
        similarity: SimilarityKind = "cosine",
        references: torch.Tensor | None = None,
        heatmap: bool = True,
        pooling: PoolingKind = "avg",
        explainer: ChannelExplainer | None = None,
        input_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__(
            model, target_layer, pooling=pooling, explainer=explainer, input_size=input_size
        )
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}; expected one of {SIMILARITIES}")
        if references is not None:
            if not isinstance(references, torch.Tensor) or not references.is_floating_point():
                raise TypeError("references to bake must be a float tensor [K, D]")
            if references.dim() != 2 or references.shape[0] == 0:
                raise ValueError(
                    f"references to bake must be [K, D] with K >= 1, got {tuple(references.shape)}"
                )
            references = references.detach().float().clone()
        self.similarity: SimilarityKind = similarity
        self.heatmap = heatmap
        self.register_buffer("baked_references", references)
        self._check_head()

    def _check_head(self) -> None:
        """Raise ``ValueError`` naming the layer when this head cannot be expressed."""

    @property
    def has_reference_input(self) -> bool:
        return self.baked_references is None

    def references_for(
        self, outputs: torch.Tensor, references: torch.Tensor | None
    ) -> torch.Tensor:
        """References ``[B, K, D]`` broadcast over the batch."""
        chosen = self.baked_references if references is None else references
        if chosen is None:
            raise ValueError("this graph takes references [K, D] as an input")
        return chosen.unsqueeze(0).expand(outputs.shape[0], -1, -1)

    def finish(
        self,
        outputs: torch.Tensor,
        scores: torch.Tensor,
        weights: torch.Tensor,
        raw: torch.Tensor,
        image: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        if not self.heatmap:
            return outputs, scores
        return outputs, scores, self.upsample(raw, image), raw, weights


class FAMGraph(_ReferenceGraph):
    """Embedding model + FAM head.

    ``forward(image[, references])`` returns ``(embedding, scores, heatmap, heatmap_lowres,
    weights)``; with ``heatmap=False`` only ``(embedding, scores)``.

    Args:
        explain: ``"mean"`` explains the mean similarity to the K references (eq. 11);
            ``"best"`` explains only the best-scoring reference of each image.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> graph = FAMGraph(conv4().eval(), "block4")
        >>> [t.shape[1:] for t in graph(torch.rand(2, 3, 84, 84), torch.rand(3, 64))][:3]
        [torch.Size([64]), torch.Size([3]), torch.Size([84, 84])]
    """

    method = "fam"
    explainer_class = FAM

    def __init__(
        self,
        model: nn.Module | None,
        target_layer: str | None = None,
        *,
        similarity: SimilarityKind = "cosine",
        references: torch.Tensor | None = None,
        explain: ExplainMode = "mean",
        heatmap: bool = True,
        pooling: PoolingKind = "avg",
        explainer: ChannelExplainer | None = None,
        input_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__(
            model,
            target_layer,
            similarity=similarity,
            references=references,
            heatmap=heatmap,
            pooling=pooling,
            explainer=explainer,
            input_size=input_size,
        )
        if explain not in EXPLAIN_MODES:
            raise ValueError(f"explain must be one of {EXPLAIN_MODES}, got {explain!r}")
        self.explain = explain

    def forward(
        self, image: torch.Tensor, references: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        outputs, activations = self.run(image)
        refs = self.references_for(outputs, references)
        if not self.heatmap:
            return outputs, reference_scores(outputs, refs, self.similarity)
        scores, weights, raw = fam_explanation(
            outputs, activations, refs, self.matrix, self.similarity, self.explain
        )
        return self.finish(outputs, scores, weights, raw, image)


class GradFAMGraph(_ReferenceGraph):
    """Embedding model + analytic Grad-FAM head (global avg / max pooling + linear head).

    Weights ``w_n`` are the spatial mean of ``dS/dA^n`` with ``S = mean_k s(z', r_k)``
    (eq. 11), computed without autograd; the map is ``ReLU(sum_n w_n A^n)``.
    """

    method = "gradfam"
    explainer_class = GradFAM

    def _check_head(self) -> None:
        pooling_kind(self.head.pooling, self.target_layer)  # analytic: avg or max pooling only

    def forward(
        self, image: torch.Tensor, references: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        outputs, activations = self.run(image)
        refs = self.references_for(outputs, references)
        if not self.heatmap:
            return outputs, reference_scores(outputs, refs, self.similarity)
        scores, weights, raw = gradfam_explanation(
            outputs, activations, refs, self.matrix, self.similarity
        )
        return self.finish(outputs, scores, weights, raw, image)


class CAMGraph(ExplanationGraph):
    """Classifier + CAM or analytic Grad-CAM head.

    ``forward(image[, class_index])`` returns ``(logits, [class_index,] heatmap,
    heatmap_lowres, weights)``; the class index is an output only for the top-1 graph.

    - CAM (eq. 1): ``w = W[c]`` (the head's composed matrix), ``L = sum_n w_n A^n``.
    - Grad-CAM (eq. 2-3), analytic: ``w = W[c] / hw``, ``L = ReLU(sum_n w_n A^n)``.
    """

    def __init__(
        self,
        model: nn.Module | None,
        target_layer: str | None = None,
        *,
        gradient: bool = False,
        class_input: bool = False,
        heatmap: bool = True,
        pooling: PoolingKind = "avg",
        explainer: ChannelExplainer | None = None,
        input_size: int | tuple[int, int] | None = None,
    ) -> None:
        self.method = "gradcam" if gradient else "cam"
        self.explainer_class = GradCAM if gradient else CAM  # type: ignore[misc]
        super().__init__(
            model, target_layer, pooling=pooling, explainer=explainer, input_size=input_size
        )
        if self.matrix is None:
            raise ValueError(
                f"cannot export {self.method}: no linear classifier follows {self.target_layer!r}"
            )
        pooling_kind(self.head.pooling, self.target_layer)
        self.gradient = gradient
        self.class_input = class_input
        self.heatmap = heatmap

    def forward(
        self, image: torch.Tensor, class_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        logits, activations = self.run(image)
        classes = logits.argmax(dim=1) if class_index is None else class_index
        if not self.heatmap:
            return (logits,) if class_index is not None else (logits, classes)
        weights, raw = cam_explanation(activations, classes, self.matrix, self.gradient)
        explanation = (self.upsample(raw, image), raw, weights)
        if class_index is not None:
            return (logits, *explanation)
        return (logits, classes, *explanation)


class ExplanationHead(nn.Module):
    """The explanation head alone, for a model that runs elsewhere (a grafted ONNX graph).

    ``forward(activations [B, N, h, w], outputs [B, J][, references [K, D] | class_index
    [B]])`` returns the outputs of :mod:`fam_core.graphs.onnx_format` in its order: ``(embedding,
    scores, heatmap, heatmap_lowres, weights)`` for ``fam`` / ``gradfam``; ``(logits,
    [class_index,] heatmap, heatmap_lowres, weights)`` for ``cam`` / ``gradcam``. The maths
    are :func:`fam_explanation`, :func:`gradfam_explanation` and :func:`cam_explanation`,
    the functions the traced full-model graphs call.

    Args:
        method: ``"fam"``, ``"gradfam"``, ``"cam"`` or ``"gradcam"``.
        matrix: the head's linear map ``W`` ``[J, N]`` between the pooled activations and the
            outputs (``None``: the identity; required by ``cam`` / ``gradcam``).
        heatmap_size: ``(H, W)`` of the ``heatmap`` output (the model's input size).
        similarity: how ``fam`` / ``gradfam`` score outputs against references.
        references: ``[K, D]`` references baked in as constants (``None``: an input).
        explain: ``"mean"`` over the references or ``"best"`` (``fam`` only).
        class_input: ``cam`` / ``gradcam`` take a ``class_index`` input instead of top-1.

    Example:
        >>> head = ExplanationHead("fam", matrix=None, heatmap_size=(8, 8))
        >>> activations = torch.rand(2, 4, 2, 2)
        >>> outputs = head(activations, activations.mean(dim=(2, 3)), torch.rand(3, 4))
        >>> [tuple(t.shape) for t in outputs]
        [(2, 4), (2, 3), (2, 8, 8), (2, 2, 2), (2, 4)]
    """

    def __init__(
        self,
        method: str,
        *,
        matrix: torch.Tensor | None,
        heatmap_size: tuple[int, int],
        similarity: SimilarityKind = "cosine",
        references: torch.Tensor | None = None,
        explain: ExplainMode = "mean",
        class_input: bool = False,
    ) -> None:
        super().__init__()
        if method not in fmt.METHODS:
            expected = ", ".join(fmt.METHODS[:-1]) + f" or {fmt.METHODS[-1]}"
            raise ValueError(f"unknown method {method!r}; expected {expected}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}; expected one of {SIMILARITIES}")
        if explain not in EXPLAIN_MODES or (explain == "best" and method != "fam"):
            raise ValueError(f"explain must be 'mean' (or 'best' for fam), got {explain!r}")
        classifier = method in fmt.CLASSIFIER_METHODS
        if classifier and matrix is None:
            raise ValueError(f"{method} needs the linear classifier's matrix [C, N]")
        if classifier and references is not None:
            raise ValueError(f"method {method!r} takes class indices, not references")
        if class_input and not classifier:
            raise ValueError("class_input applies to 'cam' and 'gradcam' only")
        if references is not None and (references.dim() != 2 or references.shape[0] == 0):
            raise ValueError(
                f"references to bake must be [K, D] with K >= 1, got {tuple(references.shape)}"
            )
        self.method = method
        self.similarity: SimilarityKind = similarity
        self.explain: ExplainMode = explain
        self.class_input = class_input
        self.heatmap_size = heatmap_size
        self.register_buffer("matrix", None if matrix is None else matrix.detach().float())
        self.register_buffer(
            "baked_references", None if references is None else references.detach().float()
        )

    @property
    def is_classifier(self) -> bool:
        return self.method in fmt.CLASSIFIER_METHODS

    def forward(
        self, activations: torch.Tensor, outputs: torch.Tensor, extra: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        if self.is_classifier:
            classes = outputs.argmax(dim=1) if extra is None else extra
            weights, raw = cam_explanation(
                activations, classes, self.matrix, self.method == "gradcam"
            )
            explanation = (upsample(raw, self.heatmap_size), raw, weights)
            return (outputs, *explanation) if self.class_input else (outputs, classes, *explanation)
        chosen = self.baked_references if extra is None else extra
        if chosen is None:
            raise ValueError("this head takes references [K, D] as an input")
        refs = chosen.unsqueeze(0).expand(outputs.shape[0], -1, -1)
        if self.method == "fam":
            scores, weights, raw = fam_explanation(
                outputs, activations, refs, self.matrix, self.similarity, self.explain
            )
        else:
            scores, weights, raw = gradfam_explanation(
                outputs, activations, refs, self.matrix, self.similarity
            )
        return outputs, scores, upsample(raw, self.heatmap_size), raw, weights
