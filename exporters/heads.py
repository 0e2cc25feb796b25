"""A model and its explanation head as one ``nn.Module``: what gets traced into ONNX.

Every graph runs the model once, takes the target layer's activations ``A`` ``[B, N, h, w]``
with a forward hook (registered per call, removed in ``finally``), and computes the
explanation from them in the same pass with plain tensor operators:

- :class:`FAMGraph` (FAM, Liao et al. section IV): contributions (eq. 14-15), mean over the
  references (eq. 11) or the best-scoring one, ``C = W C'^T`` (eq. 18), min-max (eq. 12),
  ``sum_n c_n A^n`` (eq. 13), bilinear upsampling and min-max.
- :class:`GradFAMGraph`: weights are the spatial mean of ``dS/dA`` written analytically
  (:mod:`exporters.analytic`), ``ReLU(sum_n w_n A^n)``.
- :class:`CAMGraph`: CAM (eq. 1: the linear head's row of the class) or Grad-CAM (the spatial
  mean of ``d y_c / dA``, analytic), for the top-1 class or a ``class_index`` input.

The head maths exist once, as the functions :func:`fam_explanation`,
:func:`gradfam_explanation` and :func:`cam_explanation` of ``(outputs, activations,
references or classes, matrix)``: the graphs above call them after their forward pass, and
:class:`ExplanationHead` calls them on activations and outputs that another graph computed
(:mod:`exporters.graft` exports it alone and grafts it onto a foreign ONNX graph).

The pieces are fam_core's: :func:`fam_core.similarity.channel_contributions`,
:func:`fam_core.adapters.find_head` (``Head.matrix``) and
:func:`fam_core.explainers.base.min_max` / :func:`~fam_core.explainers.base.upsample`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from exporters.analytic import pooling_kind, similarity_gradient
from fam_core.adapters import Head, find_head, resolve_layer
from fam_core.explainers.base import min_max, upsample
from fam_core.pooling import PoolingKind, global_pool
from fam_core.similarity import SIMILARITIES, SimilarityKind, channel_contributions

ExplainMode = Literal["mean", "best"]
EXPLAIN_MODES = ("mean", "best")


class ExplanationGraph(nn.Module):
    """Base: the model, its target layer, and the linear head after it.

    Args:
        model: the model in eval mode; outputs ``[B, D]`` (or a feature map, pooled).
        target_layer: name of a layer with a spatial output.
        method: the method name, used in error messages.
        pooling: pooling used where the model ends with a feature map.
    """

    method = "?"

    def __init__(
        self, model: nn.Module, target_layer: str | None, *, pooling: PoolingKind = "avg"
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if model.training:
            raise ValueError("put the model in eval mode (model.eval()) before exporting it")
        self.model = model
        self.target_layer, self._layer = resolve_layer(model, target_layer)
        self.pooling: PoolingKind = pooling
        self.heatmap_size: tuple[int, int] | None = None  # constant size for the traced Resize
        self.head: Head = find_head(model, self.target_layer, pooling)
        if self.head.nonlinear_layer is not None:
            raise ValueError(
                f"cannot export {self.method}: the head after {self.target_layer!r} is not "
                f"linear (layer {self.head.nonlinear_layer!r}); an ONNX explanation head needs "
                "global pooling followed by Linear / BatchNorm1d / Dropout / Flatten layers"
            )
        matrix = self.head.matrix
        self.register_buffer("matrix", None if matrix is None else matrix.detach().clone())

    def run(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(outputs [B, D], activations [B, N, h, w])`` from one forward pass."""
        captured: list[torch.Tensor] = []

        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            captured.append(output)

        handle = self._layer.register_forward_hook(hook)
        try:
            outputs = self.model(image)
        finally:
            handle.remove()
        if not captured or captured[-1].dim() != 4:
            raise ValueError(
                f"target layer {self.target_layer!r} must produce a feature map [B, N, h, w]"
            )
        if outputs.dim() == 4:
            outputs = global_pool(outputs, self.pooling)
        return outputs, captured[-1]

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
                "output (the model must run its layers in the order it registers them)"
            )
        return outputs.shape[1]


def combine(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """``sum_n w_n A^n`` (eq. 13) as one batched matmul: ``[B, N] x [B, N, h, w] -> [B, h, w]``."""
    flat = activations.flatten(2)  # [B, N, hw]
    raw = torch.matmul(weights.unsqueeze(1), flat).squeeze(1)  # [B, hw]
    return raw.reshape(-1, activations.shape[2], activations.shape[3])


# -- The head maths, once: the traced full-model graphs above and the grafted head
# (:class:`ExplanationHead`, :mod:`exporters.graft`) both call these functions.


def to_channels(embedding_weights: torch.Tensor, matrix: torch.Tensor | None) -> torch.Tensor:
    """``C = W x C'^T`` (eq. 18): weights on the outputs ``[B, J]`` to channels ``[B, N]``.

    ``matrix`` is the head's linear map ``W`` ``[J, N]``; ``None`` is the identity.

    Example:
        >>> to_channels(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
        tensor([[1., 2., 3.]])
    """
    return embedding_weights if matrix is None else embedding_weights @ matrix


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
    scores = contributions.sum(dim=2)  # s(Z', R_k), [B, K]
    per_pair = contributions / scores.abs().clamp_min(1e-12).unsqueeze(2)  # eq. 15
    if explain == "mean":
        embedding_weights = per_pair.mean(dim=1)  # eq. 11
    else:
        best = scores.argmax(dim=1, keepdim=True).unsqueeze(2)  # [B, 1, 1]
        index = best.expand(-1, -1, per_pair.shape[2])
        embedding_weights = per_pair.gather(1, index).squeeze(1)
    weights = min_max(to_channels(embedding_weights, matrix), dim=1)  # eq. 18, eq. 12
    return scores, weights, combine(weights, activations)  # eq. 13


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
    return scores, weights, torch.relu(combine(weights, activations))


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
    raw = combine(weights, activations)
    return weights, torch.relu(raw) if gradient else raw


class _ReferenceGraph(ExplanationGraph):
    """Shared by FAM and Grad-FAM: references as an input or baked constants."""

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | None,
        *,
        similarity: SimilarityKind = "cosine",
        references: torch.Tensor | None = None,
        heatmap: bool = True,
        pooling: PoolingKind = "avg",
    ) -> None:
        super().__init__(model, target_layer, pooling=pooling)
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

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | None,
        *,
        similarity: SimilarityKind = "cosine",
        references: torch.Tensor | None = None,
        explain: ExplainMode = "mean",
        heatmap: bool = True,
        pooling: PoolingKind = "avg",
    ) -> None:
        super().__init__(
            model,
            target_layer,
            similarity=similarity,
            references=references,
            heatmap=heatmap,
            pooling=pooling,
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
        model: nn.Module,
        target_layer: str | None,
        *,
        gradient: bool = False,
        class_input: bool = False,
        heatmap: bool = True,
        pooling: PoolingKind = "avg",
    ) -> None:
        self.method = "gradcam" if gradient else "cam"
        super().__init__(model, target_layer, pooling=pooling)
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
    [B]])`` returns the outputs of :mod:`fam_core.onnx_format` in its order: ``(embedding,
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
        if method not in ("fam", "gradfam", "cam", "gradcam"):
            raise ValueError(f"unknown method {method!r}; expected fam, gradfam, cam or gradcam")
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}; expected one of {SIMILARITIES}")
        if explain not in EXPLAIN_MODES or (explain == "best" and method != "fam"):
            raise ValueError(f"explain must be 'mean' (or 'best' for fam), got {explain!r}")
        classifier = method in ("cam", "gradcam")
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
        return self.method in ("cam", "gradcam")

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
