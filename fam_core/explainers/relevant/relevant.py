"""Relevant features (Oramas, Wang, Tuytelaars, ICLR 2019, sections 3.1-3.2).

Descriptor (sec. 3.1; details settled from the authors' demo). For an image, every channel
``q`` of every chosen layer ``p`` gives the sum of squares of its response; the values of one
layer are L1-normalised, the layers concatenated and the whole vector L2-normalised: ``x``.

Relevance (eq. 1). With the descriptors ``X`` of ``N`` training images and their one-hot
labels ``L``, the mu-Lasso ``W* = argmin ||X^T W - L^T||_F^2  s.t. ||w_j||_1 <= mu`` selects a
sparse set of (layer, channel) pairs per class (:func:`~fam_core.explainers.relevant.mu_lasso.solve_mu_lasso`).

Explanation (sec. 3.2). For the predicted class ``j`` the response is ``r = w_j * x``
(element-wise), normalised by ``|sum(w_j)|`` (authors' demo); the top-k (default 3) positive
entries are the features that explain the prediction. Each is visualised by guided
backpropagation from that single channel of that layer to the input (with the stride fix of
sec. 3.3, :func:`~fam_core.explainers.backprop.deconvnet.input_signal`); the heatmaps are min-max
normalised and combined by a pixel-wise maximum.

Example:
    >>> from fam_core.models.backbones import conv4
    >>> net = conv4(width=0.25, num_classes=3).eval()
    >>> explainer = RelevantFeatures(net).fit(torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2] * 2))
    >>> explanation = explainer(torch.rand(2, 3, 32, 32))
    >>> explanation.maps.shape, explanation.extras["feature_channels"].shape
    (torch.Size([2, 32, 32]), torch.Size([2, 3]))
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fam_core.explainers.backprop.deconvnet import BackpropRule, heatmap, input_signal
from fam_core.explainers.base import Explainer
from fam_core.explainers.hooks import layer_responses
from fam_core.explainers.postprocess import min_max
from fam_core.explainers.registry import register
from fam_core.explainers.relevant.mu_lasso import solve_mu_lasso
from fam_core.explainers.relevant.relevant_interpretation import (
    Interpretation,
    interpret_features,
)
from fam_core.explainers.relevant.relevant_interpretation import (
    render_interpretation as render_interpretation,  # re-exported
)
from fam_core.explainers.targets import Target, class_indices
from fam_core.explanation import Explanation

FEATURE_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
"""Module types whose channels are candidate features (convolutional AND linear layers)."""

FORMAT = "fam-core/relevant-features"
Feature = tuple[str, int, float]
"""``(layer name, channel, value)``: a response (explanations) or a relevance weight."""


def default_feature_layers(model: nn.Module) -> list[str]:
    """Names of every ``Conv2d`` / ``Linear`` module in registration order, but the last.

    The last one is the classifier, whose output is the class scores themselves (sec. 3.1).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
        >>> default_feature_layers(net)
        ['0']
    """
    names = [name for name, module in model.named_modules() if isinstance(module, FEATURE_LAYERS)]
    if len(names) < 2:
        raise ValueError(
            f"the model has {len(names)} Conv2d/Linear layers; relevant features need at least "
            "two (every such layer but the last one is a feature layer): pass layers"
        )
    return names[:-1]


def channel_energy(response: torch.Tensor) -> torch.Tensor:
    """``[B, N]``: the sum of squares of each channel's response ``[B, N, ...]``."""
    if response.dim() < 2:
        raise ValueError(f"a layer response must be [B, N, ...], got {tuple(response.shape)}")
    return response.reshape(response.shape[0], response.shape[1], -1).square().sum(dim=2)


def descriptor_from_responses(responses: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x`` ``[B, m]``: per-channel energies, L1 per layer, concatenated, L2 overall (sec. 3.1).

    Example:
        >>> descriptor_from_responses([torch.tensor([[3.0, 1.0]]), torch.tensor([[[2.0]]])])
        tensor([[0.6671, 0.0741, 0.7412]])
    """
    if not responses:
        raise ValueError("descriptor needs at least one layer response")
    per_layer = []
    for response in responses:
        energy = channel_energy(response)
        per_layer.append(energy / energy.sum(dim=1, keepdim=True).clamp_min(1e-12))
    descriptor = torch.cat(per_layer, dim=1)
    return descriptor / descriptor.norm(dim=1, keepdim=True).clamp_min(1e-12)


@register
class RelevantFeatures(Explainer):
    """Explanation by the relevant features of the predicted class (Oramas et al. 2019).

    Args:
        model: a classifier returning logits ``[B, C]`` (or, with ``classifier=False``, any
            model; the class is then the argmax of ``x W``).
        target_layer: the feature layers: a layer's name or a list of names; default every
            ``Conv2d`` / ``Linear`` but the last (:func:`default_feature_layers`).
        layers: the same, as a keyword (give one of the two).
        top_k: number of features per explanation (default 3).
        stride_fix: resample-then-stride-1 backward pass of sec. 3.3 (default on).
        rule: ``"guided"`` (default: deconvnet with guided backprop), ``"deconvnet"`` or
            ``"gradient"``.
        task, classifier and the other options: as in
            :class:`~fam_core.explainers.base.Explainer`.

    Call :meth:`fit` (or :meth:`load`) before explaining. ``Explanation`` fields:
    ``maps`` ``[B, H, W]`` the pixel-wise max of the features' min-max normalised heatmaps;
    ``raw`` the same before the final min-max; ``weights`` ``[B, m]`` the response vector
    ``r``; ``target_layer`` the feature layers joined by commas; ``scores`` ``[B]`` the logit of the explained class (``x w_j`` without a classifier).
    ``extras`` (``[B, k]`` each, padded with ``-1`` / ``0`` when fewer than k responses are
    positive): ``feature_layers`` (index into :attr:`layer_names`), ``feature_channels``,
    ``feature_responses``; ``feature_maps`` ``[B, k, H, W]``; ``classes`` ``[B]``.
    :func:`features` turns them back into ``(layer, channel, response)`` tuples.
    """

    method = "relevant-features"
    needs_fitting = True  # the mu-Lasso of eq. 1 on labelled images comes first

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | Sequence[str] | None = None,
        *,
        layers: Sequence[str] | None = None,
        top_k: int = 3,
        stride_fix: bool = True,
        rule: BackpropRule = "guided",
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if target_layer is not None and layers is not None:
            raise ValueError("pass the feature layers once: target_layer or layers, not both")
        if layers is None:
            layers = [target_layer] if isinstance(target_layer, str) else target_layer
        names = default_feature_layers(model) if layers is None else list(layers)
        if not names or not all(isinstance(name, str) for name in names):
            raise ValueError(f"layers must be a non-empty list of layer names, got {layers!r}")
        modules = dict(model.named_modules())
        unknown = [name for name in names if name not in modules or name == ""]
        if unknown:
            raise ValueError(f"unknown feature layers {unknown}; expected names of model modules")
        if len(set(names)) != len(names):
            raise ValueError(f"feature layers must be unique, got {names}")
        super().__init__(model, names[-1], **options)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        if not isinstance(stride_fix, bool):
            raise TypeError(f"stride_fix must be a bool, got {stride_fix!r}")
        if rule not in ("guided", "deconvnet", "gradient"):
            raise ValueError(f"rule must be 'guided', 'deconvnet' or 'gradient', got {rule!r}")
        self.layer_names: list[str] = names
        self.modules = [modules[name] for name in names]
        self.top_k, self.stride_fix, self.rule = top_k, stride_fix, rule
        self.layer_sizes: list[int] | None = None  # channels per layer, known after a pass
        self.relevance: torch.Tensor | None = None  # W [m, C], sparse in values (eq. 1)
        self.mu: float | None = None
        self._output_dim = 0

    # -- sec. 3.1: descriptors and the mu-Lasso
    @torch.no_grad()
    def descriptors(self, images: torch.Tensor) -> torch.Tensor:
        """The descriptors ``x`` ``[B, m]`` of ``images`` (sec. 3.1)."""
        return self._describe(self._check_images(images))[0]

    def _describe(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        responses, outputs = layer_responses(self.model, images, self.layer_names)
        sizes = [int(response.shape[1]) for response in responses]
        if self.layer_sizes is not None and sizes != self.layer_sizes:
            raise ValueError(f"feature layers have {sizes} channels, expected {self.layer_sizes}")
        self.layer_sizes = sizes
        outputs = self._as_vectors(outputs)
        self._output_dim = int(outputs.shape[1])
        return descriptor_from_responses(responses), outputs

    @property
    def feature_index(self) -> list[tuple[str, int]]:
        """The ``(layer, channel)`` pair of every descriptor entry, in order."""
        if self.layer_sizes is None:
            raise ValueError("feature sizes are unknown: call fit, load or descriptors first")
        return [
            (name, channel)
            for name, size in zip(self.layer_names, self.layer_sizes, strict=True)
            for channel in range(size)
        ]

    def fit(
        self,
        images: torch.Tensor | Iterable[tuple[torch.Tensor, torch.Tensor]],
        labels: torch.Tensor | Sequence[int] | None = None,
        mu: float = 10.0,
        *,
        num_classes: int | None = None,
        batch_size: int = 64,
        iterations: int = 2000,
    ) -> RelevantFeatures:
        """Solve eq. 1 on training images; returns ``self``.

        Args:
            images: ``[N, 3, H, W]`` model inputs with ``labels``, or an iterable (e.g. a
                ``DataLoader``) of ``(images, labels)`` batches with ``labels=None``.
            labels: ``[N]`` class indices or ``[N, C]`` binary label vectors.
            mu: the L1 budget per class (sparsity; the paper uses 10).
            num_classes: ``C``; default the model's output size for a classifier, else
                ``max(label) + 1``.
        """
        if isinstance(mu, bool) or not isinstance(mu, int | float) or not mu > 0:
            raise ValueError(f"mu must be a positive number, got {mu!r}")
        descriptors, targets = [], []
        with torch.no_grad():
            for batch, batch_labels in self._batches(images, labels, batch_size):
                descriptors.append(self._describe(batch)[0])
                targets.append(batch_labels)
        x = torch.cat(descriptors)
        label_matrix = self._label_matrix(torch.cat(targets), x.shape[0], num_classes)
        self.relevance = solve_mu_lasso(x, label_matrix.to(x), float(mu), iterations=iterations)
        self.mu = float(mu)
        return self

    def relevant_features(self, class_index: int | None = None) -> list[Feature]:
        """``(layer, channel, weight)`` of the non-zero entries of ``w_j`` (all classes: any)."""
        relevance = self._fitted()
        if class_index is None:
            weights = relevance.abs().amax(dim=1)
        else:
            if not 0 <= class_index < relevance.shape[1]:
                raise ValueError(f"class_index must be in [0, {relevance.shape[1]})")
            weights = relevance[:, class_index]
        index = self.feature_index
        return [(*index[i], float(weights[i])) for i in weights.nonzero().flatten().tolist()]

    def interpret(
        self,
        images: torch.Tensor,
        *,
        top_n: int = 100,
        features: Sequence[tuple[str, int] | Feature] | None = None,
        class_index: int | None = None,
        display_images: torch.Tensor | None = None,
        shown: int = 4,
        batch_size: int = 64,
    ) -> Interpretation:
        """Interpretation of sec. 3.2: per feature, the average of its top-N receptive-field crops.

        Args:
            images: ``[N, C, H, W]`` model inputs (e.g. the training images).
            top_n: images per feature (the paper uses 100).
            features: ``(layer, channel)`` pairs (or the tuples of :meth:`relevant_features`);
                default the relevant features of ``class_index`` (all classes when ``None``).
            display_images: ``[N, 3, H, W]`` images in [0, 1] to crop from; default ``images``.
            shown: best crops kept per feature for :func:`render_interpretation`.

        Crops reaching outside an image are filled with that image's per-channel mean.
        See :mod:`fam_core.explainers.relevant.relevant_interpretation`.

        Example:
            >>> result = explainer.interpret(images, top_n=10)  # doctest: +SKIP
            >>> figure = render_interpretation(result)  # doctest: +SKIP
        """
        images = self._check_images(images)
        if features is None:
            features = self.relevant_features(class_index)
            if not features:
                raise ValueError("no relevant features to interpret: the relevance is all zero")
        else:
            features = list(features)
            unknown = [
                f for f in features if isinstance(f, tuple | list) and f[0] not in self.layer_names
            ]
            if unknown:
                raise ValueError(
                    f"features {unknown} are not in this explainer's layers {self.layer_names}"
                )
        pairs = [(f[0], f[1]) if isinstance(f, tuple | list) else f for f in features]
        if display_images is not None and isinstance(display_images, torch.Tensor):
            display_images = display_images.to(images.device)
        return interpret_features(
            self.model,
            images,
            pairs,  # type: ignore[arg-type]
            top_n=top_n,
            shown=shown,
            display_images=display_images,
            batch_size=batch_size,
        )

    # -- persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the sparse relevance matrix and its (layer, channel) index with ``torch.save``."""
        relevance = self._fitted()
        sparse = relevance.detach().cpu().to_sparse_coo().coalesce()
        torch.save(
            {
                "format": FORMAT,
                "layers": list(self.layer_names),
                "layer_sizes": list(self.layer_sizes or []),
                "shape": list(relevance.shape),
                "indices": sparse.indices(),
                "values": sparse.values(),
                "mu": self.mu,
            },
            path,
        )

    def load(self, path: str | os.PathLike[str]) -> RelevantFeatures:
        """Read what :meth:`save` wrote (``weights_only=True``); returns ``self``."""
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not a saved relevant-features file")
        if state["layers"] != self.layer_names:
            raise ValueError(
                f"the file was fitted on layers {state['layers']}, this explainer uses "
                f"{self.layer_names}"
            )
        if self.layer_sizes is not None and state["layer_sizes"] != self.layer_sizes:
            raise ValueError(f"layer sizes {state['layer_sizes']} != {self.layer_sizes}")
        dense = torch.sparse_coo_tensor(
            state["indices"], state["values"], state["shape"], check_invariants=True
        )
        device = next(self.model.parameters(), torch.empty(0)).device
        self.relevance = dense.to_dense().to(device)
        self.layer_sizes = list(state["layer_sizes"])
        self.mu = state["mu"]
        return self

    # -- sec. 3.2: the explanation
    def __call__(self, images: torch.Tensor, target: Target = None) -> Explanation:
        """Explain the predicted class (or the class indices in ``target``)."""
        relevance = self._fitted()
        images = self._check_images(images)
        if isinstance(target, torch.Tensor) and target.is_floating_point():
            raise TypeError("RelevantFeatures explains classes: target must be class indices")
        with torch.no_grad():
            x, outputs = self._describe(images)
            w = relevance.to(x)
            if target is not None:
                classes = self._class_indices_for(target, x.shape[0], w.shape[1])
            elif self.classifier:
                classes = outputs.argmax(dim=1)
            else:
                classes = (x @ w).argmax(dim=1)
            classes = classes.to(x.device)
            w_j = w[:, classes].T  # [B, m]
            responses = x * w_j / w_j.sum(dim=1, keepdim=True).abs().clamp_min(1e-12)
            scores = (
                outputs.gather(1, classes.unsqueeze(1)).squeeze(1)
                if self.classifier
                else (x * w_j).sum(dim=1)
            )
        values, order = top_positive(responses, self.top_k)
        feature_maps = self._feature_maps(images, order, values)
        raw = feature_maps.amax(dim=1)
        layer_of, channel_of = self._index_tensors(x.device)
        picked = order.clamp_min(0)
        valid = order >= 0
        return Explanation(
            maps=min_max(raw, dim=(1, 2)).float(),
            raw=raw,
            weights=responses,
            scores=scores,
            method=self.method,
            target_layer=",".join(self.layer_names),
            extras={
                "feature_layers": torch.where(valid, layer_of[picked], -1),
                "feature_channels": torch.where(valid, channel_of[picked], -1),
                "feature_responses": values,
                "feature_maps": feature_maps,
                "classes": classes,
            },
        )

    def _feature_maps(
        self, images: torch.Tensor, order: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """``[B, k, H, W]``: min-max heatmap of each selected feature (zeros for padding)."""
        batch, k = order.shape
        maps = images.new_zeros(batch, k, *images.shape[-2:])
        index = self.feature_index
        for feature in order[order >= 0].unique().tolist():
            rows, slots = (order == feature).nonzero(as_tuple=True)
            layer, channel = index[feature]
            source = self.modules[self.layer_names.index(layer)]
            signal = input_signal(
                self.model,
                images[rows],
                source,
                channel,
                rule=self.rule,
                stride_fix=self.stride_fix,
            )
            maps[rows, slots] = min_max(heatmap(signal), dim=(1, 2)).to(maps)
        return maps

    # -- helpers
    def _fitted(self) -> torch.Tensor:
        if self.relevance is None:
            raise ValueError("RelevantFeatures is not fitted: call fit(...) or load(path) first")
        return self.relevance

    def _index_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        sizes = torch.tensor(self.layer_sizes or [], device=device)
        layer_of = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)
        starts = torch.cumsum(sizes, 0) - sizes
        channel_of = torch.arange(int(sizes.sum()), device=device) - starts[layer_of]
        return layer_of, channel_of

    def _class_indices_for(self, target: Target, batch: int, num_classes: int) -> torch.Tensor:
        classes = class_indices(target, batch)  # indices into the fitted classes, any task
        if (classes < 0).any() or (classes >= num_classes).any():
            raise ValueError(
                f"class index out of range: expected 0 <= target < {num_classes}, "
                f"got {classes.tolist()}"
            )
        return classes

    def _batches(
        self,
        images: torch.Tensor | Iterable[tuple[torch.Tensor, torch.Tensor]],
        labels: torch.Tensor | Sequence[int] | None,
        batch_size: int,
    ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(images, torch.Tensor):
            if labels is None:
                raise ValueError("fit(images, labels): labels are required with an image tensor")
            labels = torch.as_tensor(labels)
            if labels.shape[0] != images.shape[0]:
                raise ValueError(f"got {labels.shape[0]} labels for {images.shape[0]} images")
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
            for start in range(0, images.shape[0], batch_size):
                chunk = slice(start, start + batch_size)
                yield self._check_images(images[chunk]), labels[chunk]
            return
        if labels is not None:
            raise ValueError("fit(dataloader): labels come from the batches; pass labels=None")
        if not isinstance(images, Iterable):
            raise TypeError(
                "fit expects an image tensor [N, 3, H, W] with labels, or an iterable of "
                f"(images, labels) batches; got {type(images).__name__}"
            )
        for item in images:
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise ValueError("every batch of the data loader must be (images, labels)")
            yield self._check_images(item[0]), torch.as_tensor(item[1])

    def _label_matrix(
        self, labels: torch.Tensor, count: int, num_classes: int | None
    ) -> torch.Tensor:
        if count == 0:
            raise ValueError("fit needs at least one image")
        if labels.dim() == 2:  # binary label vectors l_i (eq. 1)
            if num_classes is not None and labels.shape[1] != num_classes:
                raise ValueError(f"labels have {labels.shape[1]} columns, expected {num_classes}")
            return labels.float()
        if labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(
                f"labels must be [N] class indices or [N, C] binary vectors, got "
                f"{labels.dtype} {tuple(labels.shape)}"
            )
        if num_classes is None:
            num_classes = self._output_dim if self.classifier else int(labels.max()) + 1
        if (labels < 0).any() or (labels >= num_classes).any():
            raise ValueError(
                f"labels must be in [0, {num_classes}), got {labels.unique().tolist()}"
            )
        return F.one_hot(labels.long(), num_classes).float()


def top_positive(responses: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest positive entries per row: ``(values, indices)`` ``[B, k]``.

    Rows with fewer positive entries are padded with value 0 and index -1.

    Example:
        >>> top_positive(torch.tensor([[0.1, -2.0, 0.5, 0.0]]), 3)
        (tensor([[0.5000, 0.1000, 0.0000]]), tensor([[ 2,  0, -1]]))
    """
    k_eff = min(k, responses.shape[1])
    values, indices = responses.topk(k_eff, dim=1)
    positive = values > 0
    values = torch.where(positive, values, torch.zeros_like(values))
    indices = torch.where(positive, indices, torch.full_like(indices, -1))
    if k_eff < k:
        pad = k - k_eff
        values = F.pad(values, (0, pad))
        indices = F.pad(indices, (0, pad), value=-1)
    return values, indices


def features(explanation: Explanation) -> list[list[Feature]]:
    """Per image, the ``(layer, channel, response)`` features a RelevantFeatures map used.

    Example:
        >>> e = Explanation(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.zeros(1, 3),
        ...     torch.zeros(1), "relevant-features", "a,b", {"feature_layers": torch.tensor([[1, -1]]),
        ...     "feature_channels": torch.tensor([[4, -1]]), "feature_responses": torch.tensor([[0.5, 0.0]])})
        >>> features(e)
        [[('b', 4, 0.5)]]
    """
    extras = explanation.extras
    if "feature_layers" not in extras:
        raise ValueError(f"a {explanation.method!r} explanation has no relevant features")
    layer_names = explanation.target_layer.split(",")
    result = []
    for layers, channels, responses in zip(
        extras["feature_layers"].tolist(),
        extras["feature_channels"].tolist(),
        extras["feature_responses"].tolist(),
        strict=True,
    ):
        result.append(
            [
                (layer_names[layer], channel, response)
                for layer, channel, response in zip(layers, channels, responses, strict=True)
                if layer >= 0
            ]
        )
    return result
