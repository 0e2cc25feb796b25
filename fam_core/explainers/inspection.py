"""What fam_core sees in a model: its candidate target layers, the chosen one, the head after
it, and the method a request that names none is explained with.

Example:
    >>> from fam_core.models.backbones import conv4
    >>> report = inspect_model(conv4(width=0.25).eval(), input_size=84)
    >>> report.target_layer, report.head, report.default.method
    ('block4', 'identity', 'fam')
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fam_core.anatomy.discovery import LayerSearch, find_layers, probe_size
from fam_core.anatomy.outputs import OutputSpec
from fam_core.explainers.default_method import MethodChoice, choose_method


@dataclass(frozen=True)
class ModelReport:
    """The layer search, the target layer explainers use, the head found after it, and the
    default method (:func:`fam_core.explainers.default_method.choose_method`)."""

    search: LayerSearch
    target_layer: str
    head: str  # identity | linear | jacobian
    head_detail: str
    output_shape: tuple[int, ...]
    task: str
    default: MethodChoice

    def __str__(self) -> str:
        return "\n".join(
            [
                str(self.search),
                f"target layer: {self.target_layer}",
                f"output: {list(self.output_shape)} ({self.task})",
                f"head after the target layer: {self.head}{self.head_detail}",
                f"default method: {self.default}",
            ]
        )


def inspect_model(
    model: nn.Module,
    *,
    input_size: int | tuple[int, int] | None = None,
    target_layer: str | None = None,
    output: OutputSpec = None,
    task: str | None = None,
    method: str | None = None,
) -> ModelReport:
    """Inspect ``model`` on a random input of ``input_size`` (see :func:`probe_size`);
    ``method``: the config's, the default when given."""
    from fam_core.explainers.cam.cam import cam_refusal
    from fam_core.explainers.fam.fam import FAM

    size = probe_size(model, input_size)
    search = find_layers(model, size, output=output)
    explainer = FAM(model, target_layer, output=output, task=task, input_size=size)  # type: ignore[arg-type]
    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    images = explainer._check_images(images)
    forward = explainer.forward(images)
    head = explainer.head_for(forward, images)
    detail = ""
    if head.kind == "linear" and head.matrix is not None:
        detail = f": W {list(head.matrix.shape)} (eq. 16-18)"
    elif head.kind == "jacobian":
        detail = f" ({head.nonlinear_layer}): per-sample Jacobian linearisation"
    return ModelReport(
        search=search,
        target_layer=explainer.target_layer,
        head=str(head.kind),
        head_detail=detail,
        output_shape=tuple(forward.outputs.shape[1:]),
        task=str(explainer.task),
        default=choose_method(
            str(explainer.task),
            configured=method,
            cam_refusal=cam_refusal(head) if explainer.task == "classifier" else None,
        ),
    )
