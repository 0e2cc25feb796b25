"""Write any torch model the library explains, and its explanation head, as one ONNX file.

The graph is built from the explainer (:mod:`fam_core.explainers`: FAM, Grad-FAM, CAM,
Grad-CAM) with the caller's ``task``, ``output``, ``target_layer`` and ``input_size``, so the
target layer (found from the dataflow when not given), the layout (tokens and channel-last
outputs become maps), the output selection and the head are exactly the library's.

Two ways to the file, chosen from the head the explainer finds
(:meth:`~fam_core.explainers.base.Explainer.head_for`):

- *linear and identity heads* (global pooling and affine layers, a functional or token mean,
  HF ResNet's pooler, MobileNetV2): the model and the analytic head of
  :mod:`fam_core.exporters.heads` (the head's matrix as a constant), traced by PyTorch's TorchScript
  exporter (``dynamo=False``, opset :data:`OPSET`);
- *other heads* (ConvNeXt's LayerNorm, a ViT's last block read through its class token, an
  MLP projector), and heads the analytic graph cannot express (GeM pooling for Grad-FAM):
  the explainer's own torch code, autograd included (the head's vector-Jacobian product),
  traced with ``make_fx`` into core ATen operators and exported by the ``torch.export``-based
  exporter (opset :data:`DYNAMO_OPSET`, needs the ``onnxscript`` package: the ``export``
  extra). Attention runs on the math SDPA kernel while tracing: the core-ATen decomposition
  rewrites the fused CPU flash-attention forward to math, while its backward stays the fused
  kernel, which then reads an incompatible log-sum-exp (gradients off by ~1e-2) and has no
  ONNX translation. The traced graph is checked against the eager explainer before writing.

The file holds every weight inline (no external-data side file), has a dynamic batch axis,
passes ``onnx.checker``, and carries metadata props (:mod:`fam_core.graphs.onnx_format`) so a server
can configure itself from the file alone.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fam_core.anatomy.adapters import Head, NonlinearHead
from fam_core.anatomy.outputs import OutputSpec
from fam_core.anatomy.pooling import global_pooling_kind
from fam_core.explainers.base import ChannelExplainer
from fam_core.explainers.cam.cam import CAM, is_average_pooling
from fam_core.explainers.cam.gradcam import GradCAM
from fam_core.explainers.fam.fam import FAM
from fam_core.explainers.fam.gradfam import GradFAM
from fam_core.explainers.postprocess import upsample
from fam_core.explainers.targets import ResolvedTarget, Task
from fam_core.exporters.analytic import ANALYTIC_POOLING
from fam_core.exporters.dynamo_program import UnsupportedOperatorError, export_program
from fam_core.exporters.heads import (
    CAMGraph,
    ExplainMode,
    ExplanationGraph,
    FAMGraph,
    GradFAMGraph,
    sample_images,
)
from fam_core.graphs import onnx_format as fmt
from fam_core.images.resize import as_size
from fam_core.maths.fam import one_hot_references
from fam_core.maths.similarity import SimilarityKind, similarity
from fam_core.models.store import IMAGENET_MEAN, IMAGENET_STD, ModelConfig

OPSET = 17
DYNAMO_OPSET = 18
# backward operators of core ATen that the torch.export-based ONNX exporter cannot translate
_NO_ONNX_BACKWARD = frozenset({"aten.convolution_backward.default"})


def _convolution_input_gradient(
    grad_output: torch.Tensor,
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias_sizes: object,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    transposed: bool,
    output_padding: list[int],
    groups: int,
    output_mask: list[bool],
) -> object:
    """``d loss / d input`` of a convolution as the transposed convolution of the gradient,
    so a head with convolutions has an ONNX form (``ConvTranspose``). Only the input's
    gradient is written: the explainers never ask for the weights'."""
    if transposed or output_mask[1] or output_mask[2]:
        return NotImplemented
    spatial = range(2, inputs.dim())
    extra = [  # what the strided forward dropped at the end of each axis
        int(inputs.shape[d])
        - (
            (int(grad_output.shape[d]) - 1) * stride[d - 2]
            - 2 * padding[d - 2]
            + dilation[d - 2] * (int(weight.shape[d]) - 1)
            + 1
        )
        for d in spatial
    ]
    grad_input = torch.ops.aten.convolution.default(
        grad_output, weight, None, stride, padding, dilation, True, extra, groups
    )
    return grad_input, None, None


_BACKWARD_DECOMPOSITIONS = {
    torch.ops.aten.convolution_backward.default: _convolution_input_gradient
}
Method = Literal["fam", "gradfam", "cam", "gradcam"]
EXPLAINERS: dict[str, type[ChannelExplainer]] = {
    "fam": FAM,
    "gradfam": GradFAM,
    "cam": CAM,
    "gradcam": GradCAM,
}


def make_explainer(
    model: nn.Module,
    method: Method,
    *,
    target_layer: str | None = None,
    task: Task | None = None,
    output: OutputSpec = None,
    input_size: int | tuple[int, int] | None = None,
    similarity: SimilarityKind = "cosine",
) -> ChannelExplainer:
    """The library's explainer ``method`` on ``model``: what an export runs and traces.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> make_explainer(conv4(width=0.25).eval(), "gradfam", input_size=(84, 96)).target_layer
        'block4'
    """
    fmt.check_exportable(method)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("put the model in eval mode (model.eval()) before exporting it")
    return EXPLAINERS[method](
        model,
        target_layer,
        task=task,
        output=output,
        input_size=input_size,
        similarity=similarity,
    )


def _check_method(method: str, task: str | None, class_input: bool, explain: str) -> None:
    if method in fmt.EMBEDDING_METHODS:
        if task == "classifier":
            raise ValueError(
                f"method {method!r} explains embedding models; this model is a classifier: "
                "use 'cam' or 'gradcam'"
            )
        if class_input:
            raise ValueError("class_input applies to 'cam' and 'gradcam' only")
        if method == "gradfam" and explain != "mean":
            raise ValueError("explain='best' applies to 'fam' only")
        return
    if task != "classifier":
        raise ValueError(
            f"method {method!r} explains classifiers; this model is an embedding model: "
            "use 'fam' or 'gradfam' (or pass task='classifier')"
        )


def analytic_head(method: str, head: Head) -> bool:
    """Whether the constant-matrix graphs of :mod:`fam_core.exporters.heads` express ``method`` on
    ``head``: a linear or identity head, with average or max pooling for the gradient
    methods and average pooling plus a matrix for CAM.

    Example:
        >>> from fam_core.anatomy.adapters import head_from_module
        >>> head = head_from_module(nn.Linear(4, 2), "max")
        >>> analytic_head("gradcam", head), analytic_head("cam", head)
        (True, False)
    """
    if head.kind == "jacobian":
        return False
    if method == "fam":
        return True
    if method == "cam":
        return head.matrix is not None and is_average_pooling(head.pooling)
    if global_pooling_kind(head.pooling) not in ANALYTIC_POOLING:
        return False
    return method == "gradfam" or head.matrix is not None


def build_graph(
    model: nn.Module,
    method: Method,
    *,
    target_layer: str | None = None,
    similarity: SimilarityKind = "cosine",
    references: torch.Tensor | None = None,
    explain: ExplainMode = "mean",
    class_input: bool = False,
    heatmap: bool = True,
    task: Task | None = None,
    output: OutputSpec = None,
    input_size: int | tuple[int, int] | None = None,
    explainer: ChannelExplainer | None = None,
) -> ExplanationGraph:
    """The constant-matrix ``nn.Module`` that :func:`export_model` traces for linear and
    identity heads (see :mod:`fam_core.exporters.heads`), built on the library's explainer.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> graph = build_graph(conv4(width=0.25).eval(), "fam", input_size=84)
        >>> graph.target_layer, graph.head.kind
        ('block4', 'identity')
    """
    if explainer is None:
        explainer = make_explainer(
            model,
            method,
            target_layer=target_layer,
            task=task,
            output=output,
            input_size=input_size,
            similarity=similarity,
        )
    if explainer.task is None:  # inferred from the first output
        size = as_size(input_size) if input_size is not None else (64, 64)
        with torch.no_grad():
            explainer.forward(sample_images(explainer.model, size), graph=False)
    _check_method(method, explainer.task, class_input, explain)
    if references is not None and method not in fmt.EMBEDDING_METHODS:
        raise ValueError(f"method {method!r} takes class indices, not references")
    options = {"explainer": explainer, "input_size": input_size}
    if method == "fam":
        return FAMGraph(
            None,
            similarity=similarity,
            references=references,
            explain=explain,
            heatmap=heatmap,
            **options,  # type: ignore[arg-type]
        )
    if method == "gradfam":
        return GradFAMGraph(
            None,
            similarity=similarity,
            references=references,
            heatmap=heatmap,
            **options,  # type: ignore[arg-type]
        )
    return CAMGraph(
        None,
        gradient=method == "gradcam",
        class_input=class_input,
        heatmap=heatmap,
        **options,  # type: ignore[arg-type]
    )


def export_model(
    model: nn.Module,
    config: ModelConfig | None = None,
    *,
    method: Method = "fam",
    path: str | Path,
    task: Task | None = None,
    target_layer: str | None = None,
    output: OutputSpec = None,
    references: torch.Tensor | Literal["prototypes"] | None = None,
    explain: ExplainMode = "mean",
    class_input: bool = False,
    heatmap: bool = True,
    input_size: int | tuple[int, int] | None = None,
    similarity: SimilarityKind | None = None,
    nonlinear_head: NonlinearHead = "jacobian",
) -> Path:
    """Export ``model`` with the explanation head ``method`` to the ONNX file ``path``.

    Args:
        model: any torch model the library explains, in eval mode.
        config: its :class:`~fam_core.models.store.ModelConfig`; supplies the task, target
            layer, output, input size, resize policy, preprocessing, similarity and class
            names unless given here.
        method: ``"fam"`` / ``"gradfam"`` (embedding models) or ``"cam"`` / ``"gradcam"``
            (classifiers).
        task: ``"embedding"`` or ``"classifier"``; default: the config's, else inferred as
            the explainers do (``model.is_classifier``, or an output named ``logits``).
        target_layer: the layer explained; ``None``: the config's, else found from the
            model's dataflow (:mod:`fam_core.anatomy.discovery`).
        output: which model output is explained (:mod:`fam_core.anatomy.outputs`: a key or index).
        references: ``[K, D]`` references baked into the graph as constants, or
            ``"prototypes"`` for the config's prototypes; ``None``: a ``references`` input.
        explain: ``"mean"`` over the references or ``"best"``: the top-scoring one (FAM).
        class_input: CAM / Grad-CAM graphs take a ``class_index`` input instead of top-1.
        heatmap: ``False`` exports the prediction alone (for measuring the heatmap's cost).
        input_size: ``H`` (a square) or ``(H, W)`` of the graph's input.
        nonlinear_head: ``"jacobian"`` (default) exports a head that is not linear through
            its per-sample vector-Jacobian product; ``"error"`` refuses it.

    Returns the path written.

    Example:
        >>> import tempfile
        >>> from fam_core.models.backbones import conv4
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     export_model(conv4().eval(), path=f"{folder}/fam.onnx", input_size=(84, 96)).name
        'fam.onnx'
    """
    import onnx

    if config is not None and not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig or None, got {type(config).__name__}")
    if nonlinear_head not in ("jacobian", "error"):
        raise ValueError(f"nonlinear_head must be 'jacobian' or 'error', got {nonlinear_head!r}")
    if isinstance(references, str):
        if references != "prototypes":
            raise ValueError(
                f"references must be a tensor, 'prototypes' or None, got {references!r}"
            )
        references = config.load_prototypes() if config is not None else None
        if references is None:
            raise ValueError("references='prototypes' needs a config with prototypes")
    raw_size = input_size if input_size is not None else getattr(config, "input_size", None)
    if raw_size is None:
        raise ValueError("input_size is needed (an int or (H, W)) when no config gives it")
    size = as_size(raw_size)
    if config is not None:
        task = task or config.task  # type: ignore[assignment]
        target_layer = target_layer or config.target_layer
        output = output if output is not None else config.output
    kind = similarity or (config.similarity if config is not None else "cosine")
    if _unflattened(model) and isinstance(output, str):
        output = _flat_output(model, output, size)
    # the explainer build_graph would make, made here first: its head decides the export path
    explainer = make_explainer(
        model,
        method,
        target_layer=target_layer,
        task=task,
        output=output,
        input_size=size,
        similarity=kind,  # type: ignore[arg-type]
    )
    sample_image = sample_images(model, size)
    with torch.no_grad():
        forward = explainer.forward(sample_image, graph=False)
    head = explainer.head_for(forward, sample_image)
    _check_method(method, explainer.task, class_input, explain)
    if references is not None and method not in fmt.EMBEDDING_METHODS:
        raise ValueError(f"method {method!r} takes class indices, not references")
    if head.kind == "jacobian" and nonlinear_head == "error":
        raise ValueError(
            f"cannot export {method}: the head after {explainer.target_layer!r} is not linear "
            f"(layer {head.nonlinear_layer!r}); pass nonlinear_head='jacobian' to export its "
            "per-sample Jacobian"
        )
    if references is not None:
        references = _check_references(references)
    if analytic_head(method, head) and not _unflattened(model):
        graph = build_graph(
            model,
            method,
            similarity=kind,  # type: ignore[arg-type]
            references=references,
            explain=explain,
            class_input=class_input,
            heatmap=heatmap,
            input_size=size,
            explainer=explainer,
        ).eval()
        try:
            proto, input_names, output_names = _export_analytic(graph, sample_image)
        except torch.onnx.errors.UnsupportedOperatorError as error:
            operator = _OPERATOR.search(str(error))
            raise _refusal(
                method, explainer.target_layer, operator[1] if operator else ""
            ) from None
        opset, baked = OPSET, _baked(graph)
    else:
        traced = TracedExplanation(
            explainer,
            method,
            references=references,
            explain=explain,
            class_input=class_input,
            heatmap=heatmap,
        )
        proto, input_names, output_names = traced.export(sample_image)
        opset, baked = DYNAMO_OPSET, traced.baked
    document(
        proto,
        method=method,
        target_layer=explainer.target_layer,
        task="classifier" if method in fmt.CLASSIFIER_METHODS else "embedding",
        model_name=config.name if config is not None else type(model).__name__,
        input_size=size,
        mean=config.mean if config is not None else IMAGENET_MEAN,
        std=config.std if config is not None else IMAGENET_STD,
        class_names=list(config.class_names) if config is not None else [],
        input_names=input_names,
        output_names=output_names,
        opset=opset,
        similarity=kind,
        explain=explain,
        baked_references=baked,
        class_input=class_input and method in fmt.CLASSIFIER_METHODS,
        resize=config.resize if config is not None else None,
        head=head.kind or "linear",
    )
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise OSError(f"output folder {path.parent} does not exist")
    onnx.save_model(proto, str(path), save_as_external_data=False)
    return path


_OPERATOR = re.compile(r"operator '([^']+)'")  # the TorchScript exporter's refusal


def _refusal(method: str, target_layer: str, operator: str) -> UnsupportedOperatorError:
    """The one-line refusal of an export that meets an operator ONNX cannot express."""
    return UnsupportedOperatorError(
        operator,
        f"cannot export {method}: the ONNX exporter has no translation for {operator} (in the "
        f"model or in the backward of its head after {target_layer!r}); serve the torch model "
        "instead: fam serve and fam explain take its factory: or exported_program: config "
        "without ONNX",
    )


def _check_references(references: torch.Tensor) -> torch.Tensor:
    if not isinstance(references, torch.Tensor) or not references.is_floating_point():
        raise TypeError("references to bake must be a float tensor [K, D]")
    if references.dim() != 2 or references.shape[0] == 0:
        raise ValueError(
            f"references to bake must be [K, D] with K >= 1, got {tuple(references.shape)}"
        )
    return references.detach().float().clone()


def _baked(graph: ExplanationGraph) -> int | None:
    if isinstance(graph, FAMGraph | GradFAMGraph) and graph.baked_references is not None:
        return int(graph.baked_references.shape[0])
    return None


def _export_analytic(
    graph: ExplanationGraph, sample_image: torch.Tensor
) -> tuple[object, list[str], list[str]]:
    """The TorchScript export of a constant-matrix graph: ``(proto, inputs, outputs)``."""
    import onnx

    dimension = graph.check_head(sample_image)
    args, input_names, dynamic_axes = _inputs(graph, sample_image, dimension)
    with torch.no_grad():
        sample_outputs = graph(*args)
    output_names = _output_names(graph)
    dynamic_axes.update({name: {0: "batch"} for name in output_names})
    if isinstance(graph, FAMGraph | GradFAMGraph) and graph.has_reference_input:
        dynamic_axes[fmt.OUTPUT_SCORES] = {0: "batch", 1: "num_references"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            graph,
            args,
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    _set_output_shapes(proto, sample_outputs, dynamic_axes)
    return proto, input_names, output_names


class TracedExplanation:
    """The explainer's own torch code as one function of the graph's inputs, traced into
    core ATen operators (``make_fx``, symbolic batch) and exported by the ``torch.export``
    exporter: for heads that are not linear, whose vector-Jacobian product needs autograd.

    ``function(image[, references | class_index])`` returns the outputs of
    :mod:`fam_core.graphs.onnx_format` in their order, computed by
    :meth:`~fam_core.explainers.base.ChannelExplainer.explain_resolved`. ``heatmap_size``
    ``(H, W)`` sets the heatmap's size where the explainer's input is not the image: a
    grafted head's input is the target tensor (:func:`fam_core.exporters.graft.graft_onnx`);
    ``dynamic_batch=False`` exports the sample's batch size only (a head that fixes it).

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> traced = TracedExplanation(FAM(conv4(width=0.25).eval(), "block4"), "fam")
        >>> [tuple(t.shape) for t in traced.function(torch.rand(2, 3, 84, 84), torch.rand(3, 16))]
        [(2, 16), (2, 3), (2, 84, 84), (2, 5, 5), (2, 16)]
    """

    def __init__(
        self,
        explainer: ChannelExplainer,
        method: str,
        *,
        references: torch.Tensor | None = None,
        explain: ExplainMode = "mean",
        class_input: bool = False,
        heatmap: bool = True,
        heatmap_size: tuple[int, int] | None = None,
        dynamic_batch: bool = True,
    ) -> None:
        self.explainer = explainer
        self.heatmap_size = heatmap_size
        self.dynamic_batch = dynamic_batch
        self.method = method
        self.classifier = method in fmt.CLASSIFIER_METHODS
        self.references = references
        self.explain = explain
        self.class_input = class_input and self.classifier
        self.heatmap = heatmap

    @property
    def baked(self) -> int | None:
        """``K`` when the references are constants of the graph."""
        return None if self.references is None else int(self.references.shape[0])

    @property
    def takes_references(self) -> bool:
        return not self.classifier and self.references is None

    def output_names(self) -> list[str]:
        explanation = [fmt.OUTPUT_HEATMAP, fmt.OUTPUT_HEATMAP_LOWRES, fmt.OUTPUT_WEIGHTS]
        if not self.heatmap:
            explanation = []
        if self.classifier:
            first = [fmt.OUTPUT_LOGITS] + ([] if self.class_input else [fmt.OUTPUT_CLASS_INDEX])
            return first + explanation
        return [fmt.OUTPUT_EMBEDDING, fmt.OUTPUT_SCORES, *explanation]

    def function(
        self, image: torch.Tensor, extra: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The graph's outputs for ``image`` and a ``references`` or ``class_index`` input."""
        explainer = self.explainer
        forward = explainer.forward(image, graph=None if self.heatmap else False)
        outputs = forward.outputs
        if self.classifier:
            classes = outputs.argmax(dim=1) if extra is None else extra
            first = (outputs.detach(),) if self.class_input else (outputs.detach(), classes)
            if not self.heatmap:
                return first
            references = one_hot_references(classes, outputs.shape[1], outputs.dtype)
            target = ResolvedTarget(references, "dot")
        else:
            chosen = self.references if extra is None else extra
            assert chosen is not None
            references = chosen.to(outputs).unsqueeze(0).expand(outputs.shape[0], -1, -1)
            pair_scores = similarity(outputs.detach(), references, explainer.similarity)
            first = (outputs.detach(), pair_scores)
            if not self.heatmap:
                return first
            if self.explain == "best":
                best = pair_scores.argmax(dim=1).view(-1, 1, 1).expand(-1, 1, references.shape[2])
                references = references.gather(1, best)
            target = ResolvedTarget(references, explainer.similarity)
        explanation = explainer.explain_resolved(forward, target, image)
        maps = explanation.maps
        if self.heatmap_size is not None:  # the input is not the image (a grafted head)
            maps = upsample(explanation.raw, self.heatmap_size)
        return (*first, maps, explanation.raw, explanation.weights)

    def export(self, sample_image: torch.Tensor) -> tuple[object, list[str], list[str]]:
        """Trace, export and check: ``(proto, input names, output names)``."""
        from torch._decomp import core_aten_decompositions
        from torch.export import Dim
        from torch.fx.experimental import _config as fx_config
        from torch.fx.experimental.proxy_tensor import make_fx
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            import onnxscript  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "exporting a model whose head is not linear needs the onnxscript package: "
                "pip install 'fam-core[export]'"
            ) from error
        args, input_names = self._sample_inputs(sample_image)
        with torch.no_grad():
            expected = self.function(*args)  # eager, and every head fitted before tracing
        # no duck shapes: a dimension equal to another one by chance (3 references and 3
        # colour channels) must not be tied to it, or the weights would fix it
        with (
            sdpa_kernel(SDPBackend.MATH),
            fx_config.patch(use_duck_shape=False),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            graph_module = make_fx(
                lambda *inputs: self.function(*inputs),
                decomposition_table={**core_aten_decompositions(), **_BACKWARD_DECOMPOSITIONS},
                tracing_mode="symbolic",
                _allow_non_fake_inputs=True,
            )(*args)
        batch: dict[int, object] = {0: Dim("batch", min=1)} if self.dynamic_batch else {}
        shapes: list[dict[int, object]] = [batch]
        if self.takes_references:
            shapes.append({0: Dim("num_references", min=1)})
        elif self.class_input:
            shapes.append(batch)
        output_names = self.output_names()
        missing = sorted(
            {
                str(node.target)
                for node in graph_module.graph.nodes
                if node.op == "call_function" and str(node.target) in _NO_ONNX_BACKWARD
            }
        )
        if missing:
            raise ValueError(
                f"cannot export {self.method}: the head after {self.explainer.target_layer!r} "
                f"needs {', '.join(missing)}, which has no ONNX translation; choose a target "
                "layer after the model's last convolution (or one with a linear head)"
            )
        try:
            proto = export_program(
                (_WrappedPair if len(args) == 2 else _Wrapped)(graph_module),
                args,
                dynamic_shapes=tuple(shapes),
                input_names=input_names,
                output_names=output_names,
                opset=DYNAMO_OPSET,
            )
        except UnsupportedOperatorError as error:
            raise _refusal(self.method, self.explainer.target_layer, error.operator) from None
        axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
        if self.takes_references:
            axes[fmt.INPUT_REFERENCES] = {0: "num_references"}
            axes[fmt.OUTPUT_SCORES] = {0: "batch", 1: "num_references"}
        _set_output_shapes(proto, expected, axes)
        _set_input_shapes(proto, args, axes)
        self._check(proto, args, input_names, expected)
        return proto, input_names, output_names

    def _sample_inputs(self, image: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], list[str]]:
        if self.takes_references:
            with torch.no_grad():
                outputs = self.explainer.forward(image, graph=False).outputs
            generator = torch.Generator().manual_seed(1)
            noise = torch.randn(3, outputs.shape[1], generator=generator).to(outputs)
            references = outputs[:1].expand(3, -1) + 0.1 * noise
            return (image, references.detach()), [fmt.INPUT_IMAGE, fmt.INPUT_REFERENCES]
        if self.class_input:
            classes = torch.zeros(image.shape[0], dtype=torch.long, device=image.device)
            return (image, classes), [fmt.INPUT_IMAGE, fmt.INPUT_CLASS_INDEX]
        return (image,), [fmt.INPUT_IMAGE]

    def _check(
        self,
        proto: object,
        args: tuple[torch.Tensor, ...],
        input_names: list[str],
        expected: tuple[torch.Tensor, ...],
    ) -> None:
        """Run the ONNX graph with onnxruntime on the sample; raise ``RuntimeError`` unless it
        matches the eager explainer (a decomposition or a baked branch would show here)."""
        import onnxruntime

        session = onnxruntime.InferenceSession(
            proto.SerializeToString(),  # type: ignore[attr-defined]
            providers=["CPUExecutionProvider"],
        )
        feeds = {
            name: arg.detach().cpu().numpy() for name, arg in zip(input_names, args, strict=True)
        }
        for name, actual, wanted in zip(
            self.output_names(), session.run(None, feeds), expected, strict=True
        ):
            wanted = wanted.detach().cpu()
            got = torch.from_numpy(actual)
            scale = max(1.0, float(wanted.abs().max())) if wanted.numel() else 1.0
            difference = float((got.to(wanted.dtype) - wanted).abs().max()) / scale
            if difference > 1e-3:
                raise RuntimeError(
                    f"the exported {self.method} graph differs from the torch explainer on "
                    f"{name!r} by {difference:.2e} (relative): the model has an operator whose "
                    "traced form differs from eager; please report it"
                )


class _Wrapped(nn.Module):
    """A traced ``GraphModule`` of the image alone, as a module for ``torch.export``."""

    def __init__(self, graph_module: Callable[..., object]) -> None:
        super().__init__()
        self.graph_module = graph_module

    def forward(self, image: torch.Tensor) -> object:
        return self.graph_module(image)


class _WrappedPair(_Wrapped):
    """A traced ``GraphModule`` of the image and a references or class-index input."""

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> object:  # type: ignore[override]
        return self.graph_module(image, extra)


def _set_input_shapes(
    proto: object, args: tuple[torch.Tensor, ...], dynamic_axes: dict[str, dict[int, str]]
) -> None:
    """Name the dynamic input axes as :func:`_set_output_shapes` does for outputs."""
    _set_shapes(proto.graph.input, args, dynamic_axes)  # type: ignore[attr-defined]


def _unflattened(model: nn.Module) -> bool:
    """Whether ``model`` is an unflattened ``torch.export`` program (an ``exported_program:``
    config): the TorchScript tracer cannot trace it, ``make_fx`` can."""
    from torch.export.unflatten import UnflattenedModule

    return isinstance(model, UnflattenedModule)


def _flat_output(
    model: nn.Module, key: str, size: tuple[int, int]
) -> Callable[[Any], torch.Tensor]:
    """``output=key`` for an unflattened program: traced, it returns its outputs as a flat
    tuple, in the order of the keys of the object it returns when run eagerly."""
    from fam_core.anatomy.outputs import select_output

    with torch.no_grad():
        eager = model(sample_images(model, size))
    keys = list(eager.keys()) if hasattr(eager, "keys") else []
    if key not in keys:
        select_output(eager, key)  # the usual error naming what the model returns
    index = keys.index(key)

    def select(outputs: Any) -> torch.Tensor:
        return outputs[index] if isinstance(outputs, tuple) else select_output(outputs, key)

    return select


def _inputs(
    graph: ExplanationGraph, image: torch.Tensor, dimension: int
) -> tuple[tuple[torch.Tensor, ...], list[str], dict[str, dict[int, str]]]:
    axes: dict[str, dict[int, str]] = {fmt.INPUT_IMAGE: {0: "batch"}}
    if isinstance(graph, FAMGraph | GradFAMGraph) and graph.has_reference_input:
        references = torch.rand(3, dimension, device=image.device)
        axes[fmt.INPUT_REFERENCES] = {0: "num_references"}
        return (image, references), [fmt.INPUT_IMAGE, fmt.INPUT_REFERENCES], axes
    if isinstance(graph, CAMGraph) and graph.class_input:
        classes = torch.zeros(image.shape[0], dtype=torch.long, device=image.device)
        axes[fmt.INPUT_CLASS_INDEX] = {0: "batch"}
        return (image, classes), [fmt.INPUT_IMAGE, fmt.INPUT_CLASS_INDEX], axes
    return (image,), [fmt.INPUT_IMAGE], axes


def _set_output_shapes(
    proto: object, outputs: tuple[torch.Tensor, ...], dynamic_axes: dict[str, dict[int, str]]
) -> None:
    """Write the fixed sizes of every output into the graph, keeping the dynamic axes named."""
    _set_shapes(proto.graph.output, outputs, dynamic_axes)  # type: ignore[attr-defined]


def _set_shapes(
    values: object, tensors: tuple[torch.Tensor, ...], dynamic_axes: dict[str, dict[int, str]]
) -> None:
    """Each value's shape: the tensor's sizes, with the axes of ``dynamic_axes`` named."""
    for value, tensor in zip(values, tensors, strict=True):  # type: ignore[call-overload]
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for axis, extent in enumerate(tensor.shape):
            dim = dims.add()
            name = dynamic_axes.get(value.name, {}).get(axis)
            if name is None:
                dim.dim_value = int(extent)
            else:
                dim.dim_param = name


def _output_names(graph: ExplanationGraph) -> list[str]:
    explanation = [fmt.OUTPUT_HEATMAP, fmt.OUTPUT_HEATMAP_LOWRES, fmt.OUTPUT_WEIGHTS]
    if isinstance(graph, CAMGraph):
        first = [fmt.OUTPUT_LOGITS] + ([] if graph.class_input else [fmt.OUTPUT_CLASS_INDEX])
        return first + (explanation if graph.heatmap else [])
    return [fmt.OUTPUT_EMBEDDING, fmt.OUTPUT_SCORES] + (explanation if graph.heatmap else [])


_DOCS = {
    fmt.INPUT_IMAGE: "[B, 3, H, W] float32, normalised with metadata 'preprocessing'",
    fmt.INPUT_REFERENCES: "[K, D] float32 reference embeddings (e.g. class prototypes)",
    fmt.INPUT_CLASS_INDEX: "[B] int64 class to explain for each image",
    fmt.OUTPUT_EMBEDDING: "[B, D] the model's embeddings",
    fmt.OUTPUT_LOGITS: "[B, C] the classifier's logits",
    fmt.OUTPUT_SCORES: "[B, K] similarity of each image to each reference",
    fmt.OUTPUT_CLASS_INDEX: "[B] int64 the explained (top-1) class",
    fmt.OUTPUT_HEATMAP: "[B, H, W] heatmap in [0, 1] at input resolution",
    fmt.OUTPUT_HEATMAP_LOWRES: "[B, h, w] map at the target layer, before upsampling",
    fmt.OUTPUT_WEIGHTS: "[B, N] channel weights of the target layer's activation maps",
}


def document(
    proto: object,
    *,
    method: str,
    target_layer: str,
    task: str,
    model_name: str,
    input_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    input_names: list[str],
    output_names: list[str],
    opset: int,
    similarity: str = "cosine",
    explain: str = "mean",
    baked_references: int | None = None,
    class_input: bool = False,
    resize: str | None = None,
    head: str | None = None,
    channels: int = 3,
) -> None:
    """Write the metadata props and doc strings of :mod:`fam_core.graphs.onnx_format` into ``proto``.

    The one writer of the format's metadata: :func:`export_model` and
    :func:`fam_core.exporters.graft.graft_onnx` both call it. ``baked_references`` is ``K`` when the
    references are constants of the graph (``None``: an input); ``similarity``, ``explain``
    and ``baked_references`` apply to ``fam`` / ``gradfam``, ``class_input`` to ``cam`` /
    ``gradcam``. ``channels``: the image input's channels, written to the preprocessing
    metadata when not 3 (1: greyscale; readers take a missing entry as 3).

    Example:
        >>> import onnx
        >>> proto = onnx.ModelProto()
        >>> document(
        ...     proto, method="cam", target_layer="layer4", task="classifier", model_name="m",
        ...     input_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, class_names=["a", "b"],
        ...     input_names=[], output_names=[], opset=17,
        ... )
        >>> {p.key: p.value for p in proto.metadata_props}["class_target"]
        'top1'
    """
    import onnx

    import fam_core

    for value in (*proto.graph.input, *proto.graph.output):  # type: ignore[attr-defined]
        value.doc_string = _DOCS[value.name]
    height, width = input_size
    preprocessing: dict[str, object] = {
        "mean": list(mean),
        "std": list(std),
        "size": [int(height), int(width)],
        "range": [0, 1],
    }
    if resize is not None:
        preprocessing["resize"] = resize
    if channels != 3:
        preprocessing["channels"] = int(channels)
    props = {
        fmt.KEY_FORMAT: fmt.FORMAT_VERSION,
        fmt.KEY_VERSION: fam_core.__version__,
        fmt.KEY_METHOD: method,
        fmt.KEY_TARGET_LAYER: target_layer,
        fmt.KEY_PREPROCESSING: json.dumps(preprocessing),
        fmt.KEY_TASK: task,
        fmt.KEY_MODEL: model_name,
        fmt.KEY_CLASS_NAMES: json.dumps(list(class_names)),
        fmt.KEY_INPUTS: json.dumps(input_names),
        fmt.KEY_OUTPUTS: json.dumps(output_names),
        fmt.KEY_OPSET: str(opset),
    }
    if head is not None:
        props["head"] = head
    if method in fmt.EMBEDDING_METHODS:
        props[fmt.KEY_SIMILARITY] = similarity
        props[fmt.KEY_EXPLAIN] = explain
        props[fmt.KEY_REFERENCES] = "input" if baked_references is None else "baked"
        if baked_references is not None:
            props[fmt.KEY_NUM_REFERENCES] = str(baked_references)
    else:
        props[fmt.KEY_CLASS_TARGET] = "input" if class_input else "top1"
    onnx.helper.set_model_props(proto, props)  # type: ignore[arg-type]
    proto.doc_string = (  # type: ignore[attr-defined]
        f"fam-core {method} explanation graph; target layer {target_layer}"
    )
