"""Graft an explanation head onto ANY ONNX graph: files that fam-core did not write.

A model exported by someone else (``torch.onnx.export`` with default names, another
framework) has no hook and no metadata. :func:`graft_onnx` runs the stages of the ONNX
path, one module each:

1. **Load** (:mod:`~fam_core.exporters.onnx_load`): the graph and its image input.
2. **Dataflow** (:mod:`~fam_core.exporters.onnx_dataflow`): the candidate target tensors,
   the automatic target (the torch explainers' rule) and the head between it and the output.
3. **Head** (:mod:`~fam_core.exporters.onnx_head`): global average pooling + an affine map
   ``z = W mean(A) + b`` probed with onnxruntime, or a head interpreted in torch
   (:mod:`~fam_core.exporters.onnx_torch`, :mod:`~fam_core.exporters.interpreted`): a linear
   head found from the dataflow, or the head's exact per-sample Jacobian
   (``nonlinear_head="jacobian"``, the default; ``"error"`` refuses it, naming the first
   non-affine node).
4. **Graft** (this module): FAM eq. 16-18 with that ``W`` (or Grad-FAM, CAM, Grad-CAM),
   :class:`~fam_core.exporters.heads.ExplanationHead` exported from torch on its own and
   merged after the target and the output with :func:`onnx.compose.merge_models`; or the
   interpreted explanation, traced and exported as
   :func:`~fam_core.exporters.export.export_model` exports non-linear heads, merged after the
   target (the foreign head is dropped). The metadata key ``head`` says which:
   ``identity``, ``linear`` or ``jacobian``.
5. **Verify** (:mod:`~fam_core.exporters.onnx_verify`): the grafted graph runs a batch, or
   keeps the batch its graph fixes; onnxslim and the rewrites of
   :mod:`~fam_core.exporters.onnx_lean` make it cheap under onnxruntime, each kept only
   where the outputs stay the same.

The result follows :mod:`fam_core.graphs.onnx_format` (input ``image``, outputs ``embedding`` /
``logits``, ``scores``, ``heatmap``...; the same metadata as
:func:`fam_core.exporters.export_model`) so :class:`~fam_core.graphs.onnx_runtime.OnnxExplainer`
and the servers run it unchanged. :func:`inspect_onnx` (``fam inspect``) reports what the
stages find.

Example:
    >>> import io, warnings
    >>> from fam_core.models.backbones import conv4
    >>> from fam_core.graphs.onnx_runtime import OnnxExplainer
    >>> buffer = io.BytesIO()
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     torch.onnx.export(conv4(width=0.25).eval(), (torch.rand(1, 3, 32, 32),), buffer,
    ...                       dynamo=False)
    >>> foreign = onnx.load_from_string(buffer.getvalue())
    >>> inspect_onnx(foreign).chosen.shape
    (16, 2, 2)
    >>> grafted = graft_onnx(foreign, method="fam")
    >>> [value.name for value in grafted.graph.output]
    ['embedding', 'scores', 'heatmap', 'heatmap_lowres', 'weights']
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import helper

from fam_core.exporters.export import _set_output_shapes, document
from fam_core.exporters.graft_plan import (
    GraftPlan,
    check_task,
    checked_normalisation,
    interpreted_head,
    plan_graft,
)
from fam_core.exporters.heads import ExplainMode, ExplanationHead
from fam_core.exporters.onnx_dataflow import (
    Candidate,
    Graph,
    choose_target,
    find_target_tensors,
)
from fam_core.exporters.onnx_graph import default_opset, prune_graph, rename_value
from fam_core.exporters.onnx_head import AffineHead, analyse_head
from fam_core.exporters.onnx_inspect import Inspection, inspect_onnx
from fam_core.exporters.onnx_load import fixed_batch, input_channels
from fam_core.exporters.onnx_normalise import InputLayout
from fam_core.exporters.onnx_verify import leaned, runs_batched, slimmed
from fam_core.graphs import onnx_format as fmt
from fam_core.maths.similarity import SimilarityKind
from fam_core.models.store import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "AffineHead",
    "Candidate",
    "GraftPlan",
    "Inspection",
    "analyse_head",
    "choose_target",
    "find_target_tensors",
    "graft_onnx",
    "inspect_onnx",
    "plan_graft",
]


Task = Literal["embedding", "classifier"]

_PREFIX = "model/"  # the foreign graph's names, so they cannot clash with the format's

_HEAD_INPUTS = ("activations", "outputs")


def _head_module(
    head: AffineHead,
    method: str,
    *,
    size: tuple[int, int],
    similarity: SimilarityKind,
    references: torch.Tensor | None,
    explain: ExplainMode,
    class_input: bool,
) -> ExplanationHead:
    matrix = torch.from_numpy(head.matrix.copy())
    if head.is_identity and method in fmt.EMBEDDING_METHODS:
        matrix = None  # type: ignore[assignment]  # eq. 18 with W = I: the weights themselves
    return ExplanationHead(
        method,
        matrix=matrix,
        heatmap_size=size,
        similarity=similarity,
        references=references,
        explain=explain,
        class_input=class_input,
    ).eval()


def _export_head(
    module: ExplanationHead, channels_hw: tuple[int, int, int], dimension: int, opset: int
) -> tuple[onnx.ModelProto, tuple[torch.Tensor, ...], dict[str, dict[int, str]], list[str]]:
    """The head alone as ONNX: inputs ``activations``, ``outputs`` (+ references/class_index)."""
    generator = torch.Generator().manual_seed(0)
    activations = torch.rand(2, *channels_hw, generator=generator)
    outputs = torch.randn(2, dimension, generator=generator)
    args: tuple[torch.Tensor, ...] = (activations, outputs)
    input_names = list(_HEAD_INPUTS)
    axes: dict[str, dict[int, str]] = {name: {0: "batch"} for name in input_names}
    if module.is_classifier:
        output_names = [fmt.OUTPUT_LOGITS, fmt.OUTPUT_CLASS_INDEX]
        if module.class_input:
            args += (torch.zeros(2, dtype=torch.long),)
            input_names.append(fmt.INPUT_CLASS_INDEX)
            axes[fmt.INPUT_CLASS_INDEX] = {0: "batch"}
            output_names = [fmt.OUTPUT_LOGITS]
    else:
        output_names = [fmt.OUTPUT_EMBEDDING, fmt.OUTPUT_SCORES]
        if module.baked_references is None:
            args += (torch.randn(3, dimension, generator=generator),)
            input_names.append(fmt.INPUT_REFERENCES)
            axes[fmt.INPUT_REFERENCES] = {0: "num_references"}
    output_names += [fmt.OUTPUT_HEATMAP, fmt.OUTPUT_HEATMAP_LOWRES, fmt.OUTPUT_WEIGHTS]
    axes.update({name: {0: "batch"} for name in output_names})
    if not module.is_classifier and module.baked_references is None:
        axes[fmt.OUTPUT_SCORES] = {0: "batch", 1: "num_references"}
    with torch.no_grad():
        sample = module(*args)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue()), sample, axes, input_names


def _set_batch(value: onnx.ValueInfoProto, batch: int | None) -> None:
    first = value.type.tensor_type.shape.dim[0]
    if batch is None:
        first.dim_param = "batch"
    else:
        first.dim_value = batch


def _merge(
    graph: Graph,
    target: Candidate,
    head_proto: onnx.ModelProto,
    output_names: Sequence[str],
    batch: int | None,
    *,
    interpreted: bool = False,
) -> onnx.ModelProto:
    """The foreign graph up to the target (and its output, for an affine head) with the
    head graph after it. An interpreted head recomputes the output from the target: the
    foreign graph's own head is dropped."""
    foreign = onnx.ModelProto()
    foreign.CopyFrom(graph.normalised.backbone)  # the file's own precision
    del foreign.graph.value_info[:]  # inferred for a fixed batch; the merged graph re-infers
    links = [(target.name, _HEAD_INPUTS[0])]
    if not interpreted:
        links.append((graph.output, _HEAD_INPUTS[1]))
    if graph.normalised.precision == "float16":  # the head computes in float32
        links = [(_cast_to_float(foreign.graph, name), head) for name, head in links]
    del foreign.graph.output[:]
    for name, _ in links:
        foreign.graph.output.append(helper.make_empty_tensor_value_info(name))
    foreign, head_proto = _same_opset(foreign, head_proto)
    version = max(foreign.ir_version, head_proto.ir_version)
    foreign.ir_version = head_proto.ir_version = version
    merged = onnx.compose.merge_models(
        foreign,
        head_proto,
        io_map=links,
        prefix1=_PREFIX,
        outputs=list(output_names),
    )
    prune_graph(merged.graph)
    opsets = {(entry.domain, entry.version): entry for entry in merged.opset_import}
    del merged.opset_import[:]
    merged.opset_import.extend(opsets.values())
    rename_value(merged.graph, _PREFIX + graph.image.name, fmt.INPUT_IMAGE)
    image = next(value for value in merged.graph.input if value.name == fmt.INPUT_IMAGE)
    dims = image.type.tensor_type.shape.dim
    for axis, extent in zip((1, 2, 3), (input_channels(graph.image), *graph.size), strict=True):
        dims[axis].dim_value = extent
    _set_batch(image, batch)
    del merged.graph.value_info[:]
    # inputs that are initializers (old IR versions list them) are no inputs of the format
    initializers = {tensor.name for tensor in merged.graph.initializer}
    kept = [value for value in merged.graph.input if value.name not in initializers]
    del merged.graph.input[:]
    merged.graph.input.extend(kept)
    return merged


def _cast_to_float(graph: onnx.GraphProto, name: str) -> str:
    """A float32 copy of the value ``name`` of ``graph`` (a ``Cast`` node), by its name."""
    cast = f"{name}/float32"
    graph.node.append(helper.make_node("Cast", [name], [cast], to=onnx.TensorProto.FLOAT))
    return cast


def _same_opset(
    first: onnx.ModelProto, second: onnx.ModelProto
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Both graphs at the higher of their default-domain opsets (``onnx.version_converter``)."""
    a, b = default_opset(first), default_opset(second)
    if a == b:
        return first, second
    from onnx import version_converter

    try:
        if a < b:
            return version_converter.convert_version(first, b), second
        return first, version_converter.convert_version(second, a)
    except Exception as error:  # noqa: BLE001 - the converter's errors name no common type
        raise ValueError(
            f"cannot bring the graph (opset {a}) and the explanation head (opset {b}) to one "
            f"opset: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None


def graft_onnx(
    model: str | Path | onnx.ModelProto,
    *,
    method: str = "fam",
    task: Task | None = None,
    target_tensor: str | None = None,
    output_name: str | None = None,
    references: torch.Tensor | np.ndarray | None = None,
    explain: ExplainMode = "mean",
    class_input: bool = False,
    input_size: int | Sequence[int] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    class_names: Sequence[str] = (),
    similarity: SimilarityKind = "cosine",
    model_name: str | None = None,
    out_path: str | Path | None = None,
    nonlinear_head: Literal["jacobian", "error"] = "jacobian",
    layout: InputLayout | None = None,
    plan: GraftPlan | None = None,
) -> onnx.ModelProto | Path:
    """Graft the explanation head ``method`` onto the ONNX graph ``model``.

    Args:
        model: an ONNX file or ``onnx.ModelProto`` with one image input ``[B, 3, H, W]``
            (already normalised with ``mean`` / ``std``), written by any exporter; or
            ``[B, 1, H, W]``: a greyscale model (``mean`` / ``std`` then have one value).
        method: ``"fam"`` / ``"gradfam"`` (embedding models) or ``"cam"`` / ``"gradcam"``
            (classifiers).
        task: ``"embedding"`` or ``"classifier"``; checked against ``method`` when given.
        target_tensor: the feature map or token sequence to explain (a value name, see
            :func:`inspect_onnx`); ``None``: found as the torch explainers find their layer.
        output_name: the value holding the embedding / logits ``[B, D]``, explained as
            named; ``None``: the first graph output of rank 2, and for classifiers the logits
            before a trailing Softmax / LogSoftmax / Sigmoid
            (:func:`~fam_core.exporters.onnx_output.choose_output`; the metadata records
            ``explained_output`` and ``output_activation``).
        references: ``[K, D]`` references baked in as constants (``fam`` / ``gradfam``);
            ``None``: a ``references`` input.
        explain: ``"mean"`` over the references (eq. 11) or ``"best"`` (``fam`` only).
        class_input: ``cam`` / ``gradcam`` take a ``class_index`` input instead of top-1.
        input_size: ``(H, W)`` (or an int); needed when the graph's input size is dynamic.
        mean, std, class_names, similarity, model_name: written to the metadata (``mean``
            and ``std``: one value per input channel, or one for all).
        out_path: write the file there and return its path; ``None``: return the model.
        nonlinear_head: ``"jacobian"`` grafts a head that is not global average pooling +
            an affine map through its per-sample Jacobian (the head interpreted in torch);
            ``"error"`` refuses it.
        layout: the input's layout, ``"NCHW"`` or ``"NHWC"``; ``None``: detected
            (:mod:`~fam_core.exporters.onnx_normalise`, which also reads any opset, batch
            form, precision and uint8 input). A graph that takes uint8 pixels is fed values
            0-255: ``mean`` / ``std`` are then 0 and 1/255, and others are refused.
        plan: ``model`` already analysed by :func:`plan_graft` with these options (its
            task the same): the graft starts from it instead of analysing the graph again.

    Raises a one-line ``ValueError`` for an output that is no image-level score ``[B, D]``
    (CTC ``[B, T, C]``, detection boxes, segmentation ``[B, K, H, W]``: its shape and what is
    expected, :func:`~fam_core.exporters.onnx_output.describe_output`), for a target tensor
    that is not in the graph or not a feature map /
    token sequence, a head with an ONNX operator the interpreter does not run (naming it),
    a head that is not linear with ``nonlinear_head="error"`` (naming its first non-affine
    node), and a method that does not fit the task.

    Example:
        >>> path = graft_onnx("resnet50.onnx", method="gradcam", out_path="explained.onnx")  # doctest: +SKIP
        >>> OnnxExplainer(path).method  # doctest: +SKIP
        'gradcam'
    """
    task = check_task(method, task)
    if nonlinear_head not in ("jacobian", "error"):
        raise ValueError(f"nonlinear_head must be 'jacobian' or 'error', got {nonlinear_head!r}")
    if plan is None:
        plan = plan_graft(
            model,
            method=method,
            task=task,
            target_tensor=target_tensor,
            output_name=output_name,
            input_size=input_size,
            mean=mean,
            std=std,
            similarity=similarity,
            nonlinear_head=nonlinear_head,
            layout=layout,
        )
    elif plan.task != task:
        raise ValueError(
            f"the plan analysed a {plan.task} graph, method {method!r} explains {task}"
        )
    elif nonlinear_head == "error" and plan.not_affine is not None:
        raise plan.not_affine
    graph, target, head = plan.graph, plan.target, plan.head
    mean, std = checked_normalisation(graph, mean, std)
    dimension = int(graph.output_shape[1])
    if task == "classifier" and class_names and len(class_names) != dimension:
        raise ValueError(
            f"class_names has {len(class_names)} names but output {graph.output!r} has "
            f"{dimension} classes"
        )
    baked = None
    if references is not None:
        baked = torch.as_tensor(np.asarray(references), dtype=torch.float32)
        if baked.dim() != 2 or baked.shape[1] != dimension:
            raise ValueError(f"references must be [K, {dimension}], got {tuple(baked.shape)}")
    options = {
        "similarity": similarity,
        "references": baked,
        "explain": explain,
        "class_input": class_input,
    }
    if head is not None:
        merged, input_names, output_names, opset, kind = _graft_affine(
            graph, target, head, method, dimension, **options
        )
    else:
        merged, input_names, output_names, opset, kind = _graft_interpreted(
            plan, method, nonlinear_head, **options
        )
    document(
        merged,
        method=method,
        target_layer=target.name,
        task=task,
        model_name=model_name or graph.source,
        input_size=graph.size,
        mean=mean,
        std=std,
        class_names=list(class_names),
        input_names=input_names,
        output_names=output_names,
        opset=opset,
        similarity=similarity,
        explain=explain,
        baked_references=None if baked is None else int(baked.shape[0]),
        class_input=class_input,
        head=kind,
        channels=input_channels(graph.image),
    )
    _record_output(merged, graph)
    merged.doc_string += f" (grafted onto {graph.source!r} after output {graph.output!r})"
    helper.set_model_props(
        merged,
        {
            **{prop.key: prop.value for prop in merged.metadata_props},
            fmt.KEY_NORMALISATION: json.dumps(list(graph.normalised.steps)),
        },
    )
    merged = leaned(slimmed(merged, dimension), dimension)
    onnx.checker.check_model(merged, full_check=True)
    if out_path is None:
        return merged
    path = Path(out_path)
    if not path.parent.exists():
        raise OSError(f"output folder {path.parent} does not exist")
    onnx.save_model(merged, str(path), save_as_external_data=False)
    return path


def _record_output(merged: onnx.ModelProto, graph: Graph) -> None:
    """The metadata of the explained output: its name in the foreign graph, the graph
    output it stands for, the activation the graph applied after it (the served scores
    apply it back), and an L2 normalisation inside the graph."""
    props = {fmt.KEY_EXPLAINED_OUTPUT: graph.output}
    choice = graph.choice
    if choice is not None and choice.declared != graph.output:
        props[fmt.KEY_GRAPH_OUTPUT] = choice.declared
    if choice is not None and choice.activation is not None:
        props[fmt.KEY_OUTPUT_ACTIVATION] = choice.activation
    if choice is not None and choice.normalisation is not None:
        props[fmt.KEY_OUTPUT_NORMALISATION] = choice.normalisation
    for key, value in props.items():
        entry = merged.metadata_props.add()
        entry.key, entry.value = key, value


def _graft_affine(
    graph: Graph,
    target: Candidate,
    head: AffineHead,
    method: str,
    dimension: int,
    *,
    similarity: SimilarityKind,
    references: torch.Tensor | None,
    explain: ExplainMode,
    class_input: bool,
) -> tuple[onnx.ModelProto, list[str], list[str], int, str]:
    """FAM eq. 16-18 (or Grad-FAM, CAM, Grad-CAM) with the probed ``W`` after the target."""
    module = _head_module(
        head,
        method,
        size=graph.size,
        similarity=similarity,
        references=references,
        explain=explain,
        class_input=class_input,
    )
    opset = default_opset(graph.proto)  # within GRAFT_OPSETS: the normalisation converts
    head_proto, sample, axes, head_inputs = _export_head(
        module, target.maps_shape, dimension, opset
    )
    output_names = [value.name for value in head_proto.graph.output]
    input_names = [fmt.INPUT_IMAGE] + [n for n in head_inputs if n not in _HEAD_INPUTS]
    axes[fmt.INPUT_IMAGE] = {0: "batch"}
    merged = _merge(graph, target, head_proto, output_names, batch=None)
    batch = None
    if not runs_batched(merged, dimension):
        batch = _warn_fixed_batch(graph)
        merged = _merge(graph, target, head_proto, output_names, batch=batch)
        for name in list(axes):
            axes[name] = {axis: label for axis, label in axes[name].items() if axis != 0}
    _set_output_shapes(merged, sample, axes)
    if batch is not None:
        for value in merged.graph.output:
            _set_batch(value, batch)
    return merged, input_names, output_names, opset, "identity" if head.is_identity else "linear"


def _graft_interpreted(
    plan: GraftPlan,
    method: str,
    nonlinear_head: str,
    *,
    similarity: SimilarityKind,
    references: torch.Tensor | None,
    explain: ExplainMode,
    class_input: bool,
) -> tuple[onnx.ModelProto, list[str], list[str], int, str]:
    """The explainer's own steps on the head interpreted in torch (:mod:`.interpreted`),
    exported as the torch exporter exports non-linear heads, after the target."""
    from fam_core.exporters.interpreted import export_interpreted

    graph, target = plan.graph, plan.target
    options = {
        "method": method,
        "heatmap_size": graph.size,
        "references": references,
        "explain": explain,
        "class_input": class_input,
    }

    def export_at(batch: int | None) -> tuple[onnx.ModelProto, list[str], list[str], str]:
        """The head's explanation exported with a dynamic batch (``None``) or ``batch``."""
        _, explainer, sample, kind = interpreted_head(
            plan, method, batch=batch, similarity=similarity, nonlinear_head=nonlinear_head
        )
        exported = export_interpreted(explainer, sample, dynamic_batch=batch is None, **options)
        return (*exported, kind)

    fixed = fixed_batch(graph.image)
    try:  # a dynamic batch, even where the graph's input fixes one (shapes read by Shape)
        head_proto, head_inputs, output_names, kind = export_at(None)
        batch = None
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 - a head whose constants fix the batch: export that one
        if fixed is None:
            raise
        head_proto, head_inputs, output_names, kind = export_at(fixed)
        batch = fixed
    rename_value(head_proto.graph, head_inputs[0], _HEAD_INPUTS[0])
    input_names = [fmt.INPUT_IMAGE, *head_inputs[1:]]
    merged = _merge(graph, target, head_proto, output_names, batch=batch, interpreted=True)
    if batch is None and not runs_batched(merged, int(graph.output_shape[1])):
        batch = fixed
        merged = _merge(graph, target, head_proto, output_names, batch=batch, interpreted=True)
    if batch is not None:
        _warn_fixed_batch(graph)
        for value in (*merged.graph.input, *merged.graph.output):
            dims = value.type.tensor_type.shape.dim
            if dims and (dims[0].dim_param == "batch" or not dims[0].dim_param):
                _set_batch(value, batch)
    return merged, input_names, output_names, default_opset(merged), kind


def _warn_fixed_batch(graph: Graph) -> int | None:
    batch = fixed_batch(graph.image)
    warnings.warn(
        f"{graph.source}: the graph fixes its batch size to {batch}; the grafted graph "
        "takes that batch only (export it with a dynamic batch axis to lift this)",
        stacklevel=3,
    )
    return batch
