"""The analysis :func:`~fam_core.exporters.graft.graft_onnx` does before it grafts, on its own.

:func:`plan_graft` runs the graft's first stages on a foreign graph (load, dataflow, target,
the affine head or why not) and keeps them in a :class:`GraftPlan`. The plan tells, before
any graft, whether CAM reads the head (:meth:`GraftPlan.cam_refusal`): a server picks a
classifier's default method from it and grafts the file once, passing the plan to
``graft_onnx(..., plan=plan)`` so the graph is not analysed again.

Example:
    >>> import io, warnings
    >>> import torch
    >>> from torch import nn
    >>> from fam_core.exporters.graft import graft_onnx
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
    ...                       nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).eval()
    >>> buffer = io.BytesIO()
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     torch.onnx.export(model, (torch.rand(1, 3, 8, 8),), buffer, dynamo=False)
    >>> foreign = onnx.load_from_string(buffer.getvalue())
    >>> plan = plan_graft(foreign, method="cam")
    >>> plan.cam_refusal().startswith("CAM needs global average pooling")
    True
    >>> grafted = graft_onnx(foreign, method="gradcam", plan=plan)
    >>> {prop.key: prop.value for prop in grafted.metadata_props}["method"]
    'gradcam'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from fam_core.explainers.base import ChannelExplainer
from fam_core.exporters.onnx_dataflow import (
    Candidate,
    Graph,
    analyse_graph,
    head_graph,
    resolve_target,
    sample_value,
)
from fam_core.exporters.onnx_head import AffineHead, NotAffine, analyse_graph_head
from fam_core.exporters.onnx_load import input_channels
from fam_core.exporters.onnx_normalise import InputLayout
from fam_core.graphs import onnx_format as fmt
from fam_core.maths.similarity import SimilarityKind
from fam_core.messages import first_line
from fam_core.models.store import IMAGENET_MEAN, IMAGENET_STD, channel_mismatch

__all__ = ["GraftPlan", "plan_graft"]

Task = Literal["embedding", "classifier"]


@dataclass(frozen=True)
class GraftPlan:
    """A foreign graph analysed for grafting: the graph, its target tensor and the affine
    head after it (``None``: the head is interpreted in torch; ``not_affine`` says why, where
    the target is a feature map). ``task`` is the task it was analysed for (classifiers
    walk back from a trailing softmax), ``similarity`` the explainers'."""

    graph: Graph
    target: Candidate
    head: AffineHead | None
    not_affine: NotAffine | None
    task: Task
    similarity: SimilarityKind = "cosine"

    def cam_refusal(self) -> str | None:
        """Why a CAM graft would refuse the head (the first line of its error), or ``None``
        where no reason is found before grafting (an affine head, an interpreted head that
        is linear; the graft itself may still fail)."""
        if self.head is not None:
            return None
        try:
            interpreted_head(self, "cam", batch=None)
        except ValueError as error:
            return first_line(error)
        except Exception:  # noqa: BLE001 - a head whose constants fix the batch: the graft decides
            return None
        return None


def plan_graft(
    model: str | Path | onnx.ModelProto,
    *,
    method: str = "fam",
    task: Task | None = None,
    target_tensor: str | None = None,
    output_name: str | None = None,
    input_size: int | Sequence[int] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    similarity: SimilarityKind = "cosine",
    nonlinear_head: Literal["jacobian", "error"] = "jacobian",
    layout: InputLayout | None = None,
    **options: object,
) -> GraftPlan:
    """The first stages of :func:`~fam_core.exporters.graft.graft_onnx` on ``model``, with
    its keywords (``options``: the others, which grafting reads), raising what it raises
    there, in the same order."""
    task = check_task(method, task)
    if nonlinear_head not in ("jacobian", "error"):
        raise ValueError(f"nonlinear_head must be 'jacobian' or 'error', got {nonlinear_head!r}")
    graph = analyse_graph(model, input_size, output_name, layout, walk_back=task == "classifier")
    checked_normalisation(graph, mean, std)
    target = resolve_target(graph, target_tensor)
    head: AffineHead | None = None
    not_affine: NotAffine | None = None
    if target.layout.kind == "channels_first":
        try:
            head = analyse_graph_head(graph, target)
        except NotAffine as error:
            if nonlinear_head == "error":
                raise
            not_affine = error
    return GraftPlan(graph, target, head, not_affine, task, similarity)


def check_task(method: str, task: Task | None) -> Task:
    """The task ``method`` explains, checked against ``task`` where given."""
    fmt.check_exportable(method)
    implied: Task = "embedding" if method in fmt.EMBEDDING_METHODS else "classifier"
    if task is not None and task not in ("embedding", "classifier"):
        raise ValueError(f"task must be 'embedding' or 'classifier', got {task!r}")
    if task is not None and task != implied:
        use = "'fam' or 'gradfam'" if task == "embedding" else "'cam' or 'gradcam'"
        raise ValueError(f"method {method!r} does not explain a {task} model: use {use}")
    return implied


def checked_normalisation(
    graph: Graph, mean: Sequence[float], std: Sequence[float]
) -> tuple[Sequence[float], Sequence[float]]:
    """``mean`` and ``std`` as the grafted graph records them: one value per input channel
    (or one for all), and 0 and 1/255 for a graph that takes uint8 pixels."""
    channels = input_channels(graph.image)
    if graph.normalised.pixel_input:
        mean, std = _pixel_preprocessing(graph, mean, std, channels)
    for key, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise ValueError(f"{key}: {channel_mismatch(len(values), channels)}")
    return mean, std


def _pixel_preprocessing(
    graph: Graph, mean: Sequence[float], std: Sequence[float], channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``mean`` 0 and ``std`` 1/255 per channel: images in [0, 1] fed as pixels 0-255 to a
    graph that takes uint8 and normalises them itself; other values are refused."""
    pixels = (0.0,) * channels, (1 / 255,) * channels
    given = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    defaults = tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    if given != defaults and not np.allclose(given, pixels):
        raise ValueError(
            f"{graph.source}: the graph takes uint8 pixels and normalises them itself; its "
            f"config must not set mean/std (got mean {list(given[0])}, std {list(given[1])})"
        )
    return pixels


def interpreted_head(
    plan: GraftPlan,
    method: str,
    *,
    batch: int | None,
    similarity: SimilarityKind | None = None,
    nonlinear_head: str = "jacobian",
) -> tuple[onnx.ModelProto, ChannelExplainer, np.ndarray, str]:
    """``(head graph, explainer, sample, kind)`` of the plan's head interpreted in torch
    for ``method`` (``batch``: a batch size the head fixes, ``None``: dynamic; ``similarity``:
    the plan's where ``None``); a one-line
    ``ValueError`` for a Jacobian head with ``nonlinear_head="error"`` and for CAM on a head
    that is not linear."""
    from fam_core.exporters.interpreted import head_explainer, head_kind

    graph, target = plan.graph, plan.target
    head = head_graph(graph, target.name)
    sample = sample_value(graph, target.name, batch=batch or 2)
    similarity = plan.similarity if similarity is None else similarity
    explainer = head_explainer(head, method, target.layout, plan.task, similarity, batch)
    kind, layer = head_kind(explainer, sample)
    if kind == "jacobian" and nonlinear_head == "error":
        raise ValueError(
            f"the head between {target.name!r} and {graph.output!r} is not linear ({layer}); "
            "pass nonlinear_head='jacobian' to graft its per-sample Jacobian"
        )
    if method == "cam" and kind == "jacobian":  # as the torch CAM refuses it
        raise ValueError(
            "CAM needs global average pooling and a linear classifier after "
            f"{target.name!r}; the head to {graph.output!r} is not linear (first "
            f"non-linear node: {layer}): use method='gradcam'"
        )
    return head, explainer, sample, kind
