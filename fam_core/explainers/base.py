"""The shared base of every explainer, and the channel-weight template most methods follow.

:class:`Explainer` is what every method subclasses: it validates the model and options,
checks images, runs the hooked forward pass (:mod:`~fam_core.explainers.hooks`), resolves
targets into reference embeddings and scores them (:mod:`~fam_core.explainers.targets`) and
takes gradients. Every method is built the same way, ``Method(model, target_layer=...,
task=..., **options)``, its own options as keywords. A method implements
``__call__(images, target)`` and
returns an :class:`~fam_core.explanation.Explanation`; methods whose map is not a weighted
sum of the target layer's channels (L2-CAF's optimised filter, input-space backprop,
relevant features) subclass it directly.

:class:`ChannelExplainer` is the template of FAM eq. 13, ``L = sum_n w_n A^n``: one hooked
forward pass, the target resolved, the method's :meth:`~ChannelExplainer.channel_weights`
``w``, :meth:`~ChannelExplainer.combine` (eq. 13; methods override it for ``ReLU``), then
bilinear upsampling and min-max (:mod:`~fam_core.explainers.postprocess`). FAM, Grad-FAM,
Score-FAM and the CAM family subclass it.

Hooks live only for the duration of one call and are removed in ``finally``; nothing is kept
between calls.

Example:
    >>> from fam_core.models.backbones import conv4
    >>> class MeanMap(ChannelExplainer):  # equal weights: the channel mean of the layer
    ...     method = "mean-map"
    ...     def channel_weights(self, forward, target, images):
    ...         batch, channels = forward.activations.shape[:2]
    ...         weights = forward.activations.new_full((batch, channels), 1 / channels)
    ...         return weights, self.score(forward.outputs, target), {}
    >>> MeanMap(conv4(width=0.25).eval(), "block4")(torch.rand(2, 3, 84, 84)).raw.shape
    torch.Size([2, 5, 5])
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from fam_core.anatomy.adapters import (
    Head,
    NonlinearHead,
    input_channels,
    resolve_layer,
)
from fam_core.anatomy.discovery import find_layers, probe_size
from fam_core.anatomy.head_rows import RowPlan, find_row_plan, pruned_rows
from fam_core.anatomy.layouts import FeatureLayout, as_layout, check_layout_spec
from fam_core.anatomy.outputs import OutputSpec, check_output_spec, is_logits, select_output
from fam_core.anatomy.pooling import POOLING_KINDS, PoolingKind, global_pool
from fam_core.explainers.heads import (
    HeadSpec,
    fit_layer_head,
    head_from_spec,
    is_auto,
    jacobian_product,
)
from fam_core.explainers.hooks import layer_hook
from fam_core.explainers.postprocess import build_explanation
from fam_core.explainers.targets import TASKS, ResolvedTarget, Target, Task, resolve_target, score
from fam_core.explanation import Explanation
from fam_core.maths.fam import weighted_sum
from fam_core.maths.similarity import SIMILARITIES, SimilarityKind


@dataclass(frozen=True)
class ForwardPass:
    """What one hooked forward pass yields."""

    outputs: torch.Tensor  # [B, D] embeddings or logits
    activations: torch.Tensor  # [B, N, h, w] at the target layer (as maps, any layout)
    layout: FeatureLayout = FeatureLayout("channels_first")  # how the layer holds them


class Explainer(ABC):
    """Base of every explainer: validation, the hooked forward pass, targets and scores.

    Subclasses set ``method`` (the registered name), ``needs_gradients`` when they take
    ``d score / d activations`` through :meth:`gradients`, ``needs_fitting`` when they must
    be fitted on labelled images (a ``fit(images, labels, **options)`` method) before they
    explain, and implement :meth:`__call__`. Front doors read ``needs_fitting`` through
    :func:`fam_core.explainers.registry.available_methods` and offer only runnable methods.

    Args:
        model: a ``torch.nn.Module`` returning embeddings ``[B, D]`` (or a feature map,
            pooled with ``pooling``) or class logits ``[B, num_classes]``. Use it in eval
            mode; the explainer does not change the mode.
        target_layer: name or module of a layer whose output holds feature maps
            (``[B, N, h, w]``, tokens ``[B, T, N]`` or channel-last ``[B, h, w, N]``, see
            :mod:`fam_core.anatomy.layouts`); ``None`` takes ``model.default_target_layer``, else
            the layer found from the model's dataflow (:mod:`fam_core.anatomy.discovery`).
        similarity: ``"cosine"`` (default), ``"dot"`` or ``"euclidean"`` (negative distance).
        pooling: pooling ``p`` of eq. 11 used where the model does not pool itself.
        head: ``"auto"`` finds the layers after ``target_layer`` from the dataflow
            (:mod:`fam_core.anatomy.head_fit`); an ``nn.Module`` or a ``[J, N]`` matrix gives them;
            ``None`` means the embedding is the pooled layer.
        nonlinear_head: ``"jacobian"`` (default: the exact per-sample linearisation of a
            head that is not linear, recorded as ``extras["head"]``) or ``"error"``.
        task: ``"embedding"`` or ``"classifier"``; ``None`` infers it: a classifier when
            the model says so (``model.is_classifier``) or its selected output is called
            ``logits``. Class-index targets work on any model whose output is
            ``[B, num_classes]``; ``target=None`` explains the top class of a classifier.
        output: which model output is explained (:mod:`fam_core.anatomy.outputs`): a key, an index
            or a callable; ``None`` takes the documented default.
        layout: how the target layer holds its maps: ``"auto"`` (default), a
            :class:`~fam_core.anatomy.layouts.FeatureLayout` or one of its kinds.
        input_size: ``(H, W)`` used to find the target layer when ``target_layer`` is
            ``None`` (default: the model's ``config.image_size``, else 224).
        classifier: the older spelling of ``task="classifier"``.

    Example:
        >>> from fam_core.explainers.postprocess import upsample
        >>> from fam_core.models.backbones import conv4
        >>> class StrongestChannel(Explainer):  # the map: the layer's maximum over channels
        ...     method = "strongest-channel"
        ...     def __call__(self, images, target=None):
        ...         images = self._check_images(images)
        ...         forward = self.forward(images)
        ...         resolved = self.resolve_target(target, forward.outputs)
        ...         raw = forward.activations.amax(dim=1)
        ...         return Explanation(upsample(raw, images.shape[-2:]), raw,
        ...             forward.activations.amax(dim=(2, 3)), self.score(forward.outputs, resolved),
        ...             self.method, self.target_layer)
        >>> explainer = StrongestChannel(conv4(width=0.25).eval(), "block4")
        >>> explainer(torch.rand(2, 3, 84, 84)).maps.shape
        torch.Size([2, 84, 84])
    """

    method: ClassVar[str]
    needs_gradients: ClassVar[bool] = False
    needs_fitting: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        similarity: SimilarityKind = "cosine",
        pooling: PoolingKind = "avg",
        head: HeadSpec = "auto",
        nonlinear_head: NonlinearHead = "jacobian",
        task: Task | None = None,
        output: OutputSpec = None,
        layout: FeatureLayout | str | None = "auto",
        input_size: int | tuple[int, int] | None = None,
        classifier: bool | None = None,
    ) -> None:
        check_model_options(model, similarity, pooling)
        if nonlinear_head not in ("error", "jacobian"):
            raise ValueError(
                f"nonlinear_head must be 'error' or 'jacobian', got {nonlinear_head!r}"
            )
        if task is not None and task not in TASKS:
            raise ValueError(f"task must be one of {TASKS} or None, got {task!r}")
        check_output_spec(output)
        check_layout_spec(layout)
        self.model = model
        self.output = output
        self.layout_spec = layout
        self._input_channels = input_channels(model)
        if target_layer is None and getattr(model, "default_target_layer", None) is None:
            target_layer = _found_layer(
                model, probe_size(model, input_size), output, self._input_channels or 3, pooling
            )
        self.target_layer, self.layer = resolve_layer(model, target_layer)
        self.similarity: SimilarityKind = similarity
        self.pooling: PoolingKind = pooling
        self.nonlinear_head: NonlinearHead = nonlinear_head
        self._head_spec = head
        self._fitted_heads: dict[tuple[int, ...], Head] = {}
        self._layouts: dict[object, FeatureLayout] = {}
        self._row_plans: dict[tuple[int, int], RowPlan] = {}
        if task is None and classifier is not None:
            task = "classifier" if classifier else "embedding"
        if task is None and getattr(model, "is_classifier", None) is not None:
            task = "classifier" if model.is_classifier else "embedding"
        self._task_given: Task | None = task
        self._task_inferred: Task | None = None

    @property
    def task(self) -> Task | None:
        """``"embedding"`` or ``"classifier"``: as given, else inferred from the first
        output (``logits`` means a classifier); ``None`` before the first call."""
        return self._task_given or self._task_inferred

    @property
    def classifier(self) -> bool:
        """Whether the explained output is class logits (``task == "classifier"``)."""
        return self.task == "classifier"

    # -- context manager: hooks never outlive a call (fam_core.explainers.hooks), so leaving
    # has nothing to undo; kept because callers write ``with FAM(...) as explainer``
    def __enter__(self) -> Explainer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target_layer={self.target_layer!r}, similarity={self.similarity!r})"

    # -- public API
    @abstractmethod
    def __call__(self, images: torch.Tensor, target: Target = None) -> Explanation:
        """Explain ``images`` ``[B, C, H, W]`` for ``target`` (see :data:`Target`)."""

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The model's outputs ``[B, D]`` for ``images``: the references other images use."""
        images = self._check_images(images)
        return self._as_vectors(self.model(images))

    def pair(
        self, query_images: torch.Tensor, reference_images: torch.Tensor
    ) -> tuple[Explanation, Explanation]:
        """Explain both sides of each pair ``(query_images[i], reference_images[i])``."""
        queries = self._check_images(query_images)
        references = self._check_images(reference_images)
        if queries.shape[0] != references.shape[0]:
            raise ValueError(
                f"pair needs as many references as queries, got {references.shape[0]} "
                f"and {queries.shape[0]}"
            )
        query_embeddings, reference_embeddings = self.embed(queries), self.embed(references)
        return (
            self(queries, target=reference_embeddings.unsqueeze(1)),
            self(references, target=query_embeddings.unsqueeze(1)),
        )

    # -- the steps every method shares
    def forward(self, images: torch.Tensor, *, graph: bool | None = None) -> ForwardPass:
        """Run the model once, capturing the target layer's maps with a temporary hook.

        With ``graph`` (default: the method ``needs_gradients``, or the head is not linear
        and the method maps weights through it) the autograd graph starts at the target
        layer: the layers before it run without recording (no saved activations, as in a
        plain forward), and the captured maps are the graph's leaf, so
        ``d score / d activations`` is exact whether or not the weights require grad.
        """
        if graph is None:
            graph = self.needs_gradients or self._head_needs_graph()
        captured: list[tuple[torch.Tensor, FeatureLayout]] = []
        size = (int(images.shape[-2]), int(images.shape[-1]))

        def capture(tensor: torch.Tensor) -> torch.Tensor | None:
            layout = self._layout(tensor, size)
            maps = layout.to_map(tensor)
            if not graph:
                captured.append((maps, layout))
                return None
            torch.set_grad_enabled(True)  # for the layers after this one; restored below
            leaf = maps.detach().requires_grad_(True)
            captured.append((leaf, layout))
            # a copy: later in-place ops (ReLU(inplace=True)) must not touch the leaf
            return layout.from_map(leaf, tensor).clone()

        with (
            layer_hook(self.layer, capture),
            torch.no_grad(),
            pruned_rows(self.model, self._row_plans.get(size, {})),
        ):
            raw_outputs = self.model(images)
        if not captured:
            raise ValueError(f"target layer {self.target_layer!r} did not run in the forward pass")
        activations, layout = captured[-1]
        # selecting the output may take a view ([B, D, 1, 1] -> [B, D]): it must stay in the
        # graph even when the caller runs under no_grad
        with torch.set_grad_enabled(graph):
            outputs = self._as_vectors(raw_outputs)
        if size not in self._row_plans and get_proxy_mode() is None:
            if layout.kind != "tokens":  # only token heads carry rows to leave out
                self._row_plans[size] = {}
            elif graph:  # the probe needs the head recorded, as this pass did
                self._plan_rows(images[:1], outputs[:1].detach(), size)
        return ForwardPass(outputs, activations, layout)

    def _plan_rows(self, image: torch.Tensor, outputs: torch.Tensor, size: tuple[int, int]) -> None:
        """Find, once per input size, the token rows of the head that reach the output
        (:mod:`fam_core.anatomy.head_rows`): later passes leave the others uncomputed."""
        self._row_plans[size] = {}  # the probe's own graph pass runs without a plan

        def run_graph() -> torch.Tensor:
            return self.forward(image, graph=True).outputs

        self._row_plans[size] = find_row_plan(self.model, run_graph, outputs)

    def run_with(self, images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """The outputs ``[B, D]`` with the target layer's maps replaced by ``maps``.

        ``images`` may be one image for a batch of ``maps`` (it is repeated). Runs the whole
        model; gradients flow into ``maps`` when grad mode is on.
        """
        if images.shape[0] != maps.shape[0]:
            images = images[:1].expand(maps.shape[0], *images.shape[1:])
        size = (int(images.shape[-2]), int(images.shape[-1]))

        def replace(tensor: torch.Tensor) -> torch.Tensor:
            layout = self._layout(tensor, size)
            return layout.from_map(maps.to(tensor.dtype), tensor).clone()

        with (
            layer_hook(self.layer, replace),
            pruned_rows(self.model, self._row_plans.get(size, {})),
        ):
            return self._as_vectors(self.model(images))

    def _layout(self, tensor: torch.Tensor, size: tuple[int, int]) -> FeatureLayout:
        """The layout of the target layer's output, detected once per shape and input size
        (this runs in every forward pass)."""
        # int(): the sizes after the batch axis are fixed (a traced input's are symbolic)
        key = (
            (tuple(int(d) for d in tensor.shape[1:]), size)
            if isinstance(tensor, torch.Tensor)
            else None
        )
        if key in self._layouts:
            return self._layouts[key]
        layout = as_layout(self.layout_spec, tensor, size)
        if layout is None:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else "?"
            raise ValueError(
                f"target layer {self.target_layer!r} is not spatial: its output has shape "
                f"{shape}, expected feature maps [B, N, h, w], tokens [B, T, N] or "
                f"[B, h, w, N] covering a {size[0]}x{size[1]} input"
            )
        self._layouts[key] = layout
        return layout

    # -- the head between the target layer and the outputs
    uses_head: ClassVar[bool] = False  # the method maps embedding weights through the head

    def head_for(self, forward: ForwardPass, images: torch.Tensor) -> Head:
        """The head after the target layer for maps like ``forward``'s (found once per
        map shape, from the dataflow: :func:`fam_core.anatomy.head_fit.fit_head`)."""
        if not is_auto(self._head_spec):
            return self.head
        key = tuple(forward.activations.shape[1:])
        if key not in self._fitted_heads:

            def run(maps: torch.Tensor) -> torch.Tensor:
                return self.run_with(images[:1], maps)

            self._fitted_heads[key] = fit_layer_head(
                self.model,
                self.target_layer,
                self.pooling,
                forward.activations,
                forward.outputs,
                run,
            )
        return self._fitted_heads[key]

    def _head_needs_graph(self) -> bool:
        """Whether this method's forward must record the head (a Jacobian head, or one not
        yet analysed for this input size)."""
        if not self.uses_head or self.nonlinear_head == "error":
            return False
        if not is_auto(self._head_spec):
            return False
        fitted = list(self._fitted_heads.values())
        return not fitted or any(head.kind == "jacobian" for head in fitted)

    def head_jacobian_product(
        self, forward: ForwardPass, weights: torch.Tensor, images: torch.Tensor
    ) -> torch.Tensor:
        """``sum_ij d(weights . Z')/dA[:, n, i, j]`` ``[B, N]``: ``weights`` ``[B, J]`` mapped
        through the head's Jacobian at each sample (eq. 18 with ``W`` the local Jacobian;
        equal to ``weights @ W`` for a linear head after average pooling)."""
        if not forward.activations.requires_grad:  # recorded without the head: once more
            forward = self.forward(images, graph=True)
        return jacobian_product(forward.outputs, forward.activations, weights)

    def resolve_target(self, target: Target, outputs: torch.Tensor) -> ResolvedTarget:
        """Turn any accepted target into references ``[B, K, D]``
        (:func:`fam_core.explainers.targets.resolve_target` with this explainer's task and
        similarity)."""
        return resolve_target(
            target, outputs, similarity=self.similarity, task=self.task, task_given=self._task_given
        )

    def score(self, outputs: torch.Tensor, target: ResolvedTarget) -> torch.Tensor:
        """The explained score ``[B]``: the mean similarity to the references (eq. 11).

        For class targets this is the logit ``y_c`` (one-hot reference, dot product).
        """
        return score(outputs, target)

    def gradients(self, forward: ForwardPass, scores: torch.Tensor) -> torch.Tensor:
        """``d scores / d activations`` ``[B, N, h, w]`` (needs ``needs_gradients = True``)."""
        if not forward.activations.requires_grad:
            raise RuntimeError(f"{type(self).__name__} must set needs_gradients = True")
        (grads,) = torch.autograd.grad(scores.sum(), forward.activations)
        return grads

    @cached_property
    def head(self) -> Head:
        """The layers between the target layer and the outputs (resolved on first use)."""
        return head_from_spec(self._head_spec, self.model, self.target_layer, self.pooling)

    # -- helpers
    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                f"images must be a torch.Tensor [B, C, H, W], got {type(images).__name__}"
            )
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch: expected at least one image")
        if self._input_channels is not None and images.shape[1] != self._input_channels:
            raise ValueError(
                f"images have {images.shape[1]} channels, the model expects {self._input_channels}"
            )
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {images.dtype}")
        parameter = next(self.model.parameters(), None)
        if parameter is None:
            return images
        dtype = parameter.dtype if parameter.is_floating_point() else images.dtype
        return images.to(device=parameter.device, dtype=dtype)

    def _as_vectors(self, raw_outputs: object) -> torch.Tensor:
        outputs = select_output(raw_outputs, self.output)
        if self._task_given is None and self._task_inferred is None:
            logits = is_logits(raw_outputs, self.output)
            self._task_inferred = "classifier" if logits else "embedding"
        if outputs.dim() == 4:
            return global_pool(outputs, self.pooling)
        if outputs.dim() != 2:
            raise ValueError(
                f"the model output must be [B, D] or [B, C, h, w], got {tuple(outputs.shape)}"
            )
        return outputs


class ChannelExplainer(Explainer):
    """The eq.-13 template: the map is a weighted sum of the target layer's channels.

    ``__call__`` runs one hooked forward pass and :meth:`explain_forward`: the target is
    resolved, :meth:`channel_weights` gives ``w [B, N]`` (with gradients enabled when
    ``needs_gradients``), :meth:`combine` gives ``L = sum_n w_n A^n`` (eq. 13) at the
    layer's resolution, and :func:`upsample` the map at the input's. A method implements
    :meth:`channel_weights` and overrides :meth:`combine` when its map is not the plain
    sum (``ReLU`` for the CAM family).

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> class FirstChannel(ChannelExplainer):  # w = (1, 0, ..., 0): the map is A^0
        ...     method = "first-channel"
        ...     def channel_weights(self, forward, target, images):
        ...         weights = forward.activations.new_zeros(forward.activations.shape[:2])
        ...         weights[:, 0] = 1.0
        ...         return weights, self.score(forward.outputs, target), {}
        >>> explainer = FirstChannel(conv4(width=0.25).eval(), "block4")
        >>> images = torch.rand(1, 3, 84, 84)
        >>> torch.equal(explainer(images).raw, explainer.forward(images).activations[:, 0])
        True
    """

    def __call__(self, images: torch.Tensor, target: Target = None) -> Explanation:
        """Explain ``images`` ``[B, C, H, W]`` for ``target`` (see :data:`Target`)."""
        images = self._check_images(images)
        return self.explain_forward(self.forward(images), target, images)

    def explain_forward(
        self, forward: ForwardPass, target: Target, images: torch.Tensor
    ) -> Explanation:
        """The template's steps after the forward pass, for callers that already ran it.

        Front doors use it to predict and explain from one pass: they read the prediction
        from ``forward.outputs``, choose the target from it, then call this. A method whose
        map needs more than the channel weights (LayerCAM's pixel weights) overrides this,
        never ``__call__``, so both paths give the same explanation.
        """
        return self.explain_resolved(forward, self.resolve_target(target, forward.outputs), images)

    def explain_resolved(
        self, forward: ForwardPass, resolved: ResolvedTarget, images: torch.Tensor
    ) -> Explanation:
        """The template's steps after the target is resolved: weights, eq. 13, upsampling.

        Traced as it is into ONNX by :mod:`fam_core.exporters` for heads that are not linear (the
        caller builds ``resolved`` with :func:`fam_core.maths.fam.one_hot_references` or
        from references, since a traced graph cannot branch on index checks).
        """
        with torch.set_grad_enabled(self.needs_gradients):
            weights, scores, extras = self.channel_weights(forward, resolved, images)
        raw = self.combine(weights, forward.activations)
        return build_explanation(self, images, raw, weights, scores, extras)

    # -- the steps a method implements or overrides
    @abstractmethod
    def channel_weights(
        self, forward: ForwardPass, target: ResolvedTarget, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(weights [B, N], scores [B], extras)``."""

    def combine(self, weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        """``L = sum_n w_n A^n`` (eq. 13), ``[B, h, w]``."""
        return weighted_sum(weights, activations)


def check_model_options(model: object, similarity: object, pooling: object) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``model`` is a module and ``similarity`` and
    ``pooling`` are known kinds (the options every explainer and forward wrapper take)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; expected one of {SIMILARITIES}")
    if pooling not in POOLING_KINDS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLING_KINDS}")


_FOUND_LAYERS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, str]] = weakref.WeakKeyDictionary()


def _found_layer(
    model: nn.Module, size: tuple[int, int], output: OutputSpec, channels: int, pooling: str
) -> str:
    """The target layer found from the dataflow (:func:`find_layers`), searched once per
    model, input size and output: every explainer of a served model shares the search."""
    key = (size, output, channels, pooling)  # a callable output is keyed by itself
    found = _FOUND_LAYERS.setdefault(model, {})
    if key not in found:
        search = find_layers(model, size, output=output, channels=channels, pooling=pooling)
        if search.chosen is None:
            raise ValueError(
                "found no layer with feature maps that reach the model's output; pass "
                f"target_layer (candidates: {[c.name for c in search.candidates]})"
            )
        found[key] = search.chosen
    return found[key]
