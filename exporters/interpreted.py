"""A foreign ONNX graph's head, interpreted in torch and explained by the library's explainers.

:func:`fam_core.exporters.graft.graft_onnx` uses this where the head between the target
tensor and the output is not global average pooling + an affine map (a vision
transformer's last block read through its class token, a LayerNorm, an MLP projector), or
where the target tensor is a token sequence ``[B, T, C]`` or a channel-last map
``[B, h, w, C]``:

1. the head subgraph becomes a torch module (:class:`~fam_core.exporters.onnx_torch.OnnxModule`);
2. :class:`HeadModel` runs it after an identity layer ``target_tensor`` whose output is the
   target tensor, so the explainer of the method (FAM, Grad-FAM, CAM, Grad-CAM) runs on
   it exactly as on any torch model: the layout (:mod:`fam_core.anatomy.layouts`: class and
   register tokens dropped, grid from the input size), the head found from the dataflow
   (:func:`fam_core.anatomy.head_fit.fit_head`: identity, linear, or ``"jacobian"``: weights
   mapped through the head's vector-Jacobian product), the maths of
   :mod:`fam_core.maths.fam`;
3. :class:`~fam_core.exporters.export.TracedExplanation` traces that explanation
   (``make_fx``) and exports it with the ``torch.export`` exporter, the path
   :func:`~fam_core.exporters.export.export_model` takes for torch models with such heads.

The explanation maths is not written here: it is the explainers'.

Example:
    >>> from onnx import helper, TensorProto
    >>> node = helper.make_node("ReduceMean", ["tokens"], ["z"], axes=[1], keepdims=0)
    >>> graph = helper.make_graph(
    ...     [node], "head", [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["b", 4, 3])],
    ...     [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", 3])])
    >>> head = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    >>> explainer = head_explainer(head, "fam", FeatureLayout("tokens", grid=(2, 2)), "embedding")
    >>> forward = explainer.forward(torch.rand(2, 4, 3), graph=False)
    >>> forward.activations.shape, explainer.head_for(forward, torch.rand(2, 4, 3)).kind
    (torch.Size([2, 3, 2, 2]), 'identity')
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from fam_core.anatomy.layouts import FeatureLayout
from fam_core.explainers.base import ChannelExplainer
from fam_core.explainers.targets import Task
from fam_core.exporters.export import EXPLAINERS, TracedExplanation
from fam_core.exporters.heads import ExplainMode
from fam_core.exporters.onnx_torch import OnnxModule
from fam_core.maths.similarity import SimilarityKind

__all__ = ["HeadModel", "export_interpreted", "head_explainer", "head_kind", "nonlinear_node"]

TARGET = "target_tensor"  # the identity layer whose output is the target tensor


class HeadModel(nn.Module):
    """``onnx_head(target_tensor(x))``: the target tensor ``x`` in, the graph's output out.

    ``target_tensor`` is an identity layer: the explainers hook it as their target layer
    (errors name these two layers). A head whose constants fix the batch size to ``batch``
    runs chunks of that size.
    """

    def __init__(
        self, head: nn.Module, batch: int | None = None, source: onnx.ModelProto | None = None
    ) -> None:
        super().__init__()
        self.target_tensor = nn.Identity()
        self.onnx_head = head
        self.batch = batch
        self.source = source  # the ONNX head: messages name its operators, not torch modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.target_tensor(x)
        if self.batch is None or x.shape[0] == self.batch:
            return self.onnx_head(x)
        return torch.cat([self.onnx_head(part) for part in x.split(self.batch)])


def head_explainer(
    head: onnx.ModelProto,
    method: str,
    layout: FeatureLayout,
    task: Task,
    similarity: SimilarityKind = "cosine",
    batch: int | None = None,
) -> ChannelExplainer:
    """The explainer ``method`` on the head subgraph ``head`` interpreted in torch, reading
    the target tensor through ``layout`` (``batch``: a batch size the head fixes). Raises
    ``ValueError`` naming an operator that cannot be interpreted."""
    model = HeadModel(OnnxModule(head), batch, head).eval()
    return EXPLAINERS[method](model, TARGET, task=task, layout=layout, similarity=similarity)


def head_kind(explainer: ChannelExplainer, sample: np.ndarray) -> tuple[str, str | None]:
    """``(kind, first non-linear node)`` of the head the explainer finds from the dataflow
    on ``sample`` (a batch of the target tensor): ``"identity"``, ``"linear"`` or
    ``"jacobian"``. The node is the head's first ONNX node whose output is not affine in
    the target tensor, as :func:`~fam_core.exporters.onnx_output.describe_node` names it
    (the torch modules that run the head carry no name of the graph's)."""
    tensor = torch.from_numpy(np.ascontiguousarray(sample))
    with torch.no_grad():
        forward = explainer.forward(tensor, graph=False)
    head = explainer.head_for(forward, tensor)
    kind = head.kind or "linear"
    if kind != "jacobian":
        return kind, None
    return kind, nonlinear_node(explainer.model, sample) or head.nonlinear_layer


def nonlinear_node(model: nn.Module, sample: np.ndarray) -> str | None:
    """The first non-affine ONNX node of a :class:`HeadModel`'s head on ``sample``, named
    as messages name nodes; ``None`` for another model or when every node is affine."""
    from fam_core.exporters.onnx_head import first_nonaffine_node, layout_probes
    from fam_core.exporters.onnx_output import describe_node

    source = getattr(model, "source", None)
    if not isinstance(source, onnx.ModelProto):
        return None
    inputs = [value.name for value in source.graph.input]
    found = first_nonaffine_node(source, inputs[0], layout_probes(np.asarray(sample)))
    return None if found is None else describe_node(found)


def export_interpreted(
    explainer: ChannelExplainer,
    sample: np.ndarray,
    *,
    method: str,
    heatmap_size: tuple[int, int],
    references: torch.Tensor | None,
    explain: ExplainMode,
    class_input: bool,
    dynamic_batch: bool = True,
) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """The explanation as ONNX: ``(proto, input names, output names)``.

    The graph's first input is the target tensor (named ``image`` by the traced export;
    the graft renames it), ``sample`` a batch of it from the foreign graph;
    ``dynamic_batch=False`` for a head that fixes the batch size (its ``Reshape`` shapes).
    """
    tensor = torch.from_numpy(np.ascontiguousarray(sample))
    traced = TracedExplanation(
        explainer,
        method,
        references=references,
        explain=explain,
        class_input=class_input,
        heatmap_size=heatmap_size,
        dynamic_batch=dynamic_batch,
    )
    proto, input_names, output_names = traced.export(tensor)
    return proto, input_names, output_names  # type: ignore[return-value]
