"""The method a model explains with when a request names none: one rule for every front door.

- a config's ``method:`` wins;
- an embedding model: FAM;
- a classifier whose head CAM can read (global average pooling + a linear classifier after
  the target layer): CAM, the cheapest exact map;
- any other classifier (a LayerNorm, a class token, an activation after the target layer):
  Grad-CAM, which any differentiable head allows.

Callers say why CAM cannot read the head (``cam_refusal``): the torch backend asks CAM on a
probe (:meth:`fam_core.explainers.cam.cam.CAM.refusal`), an ONNX graph the graft's head
(:func:`fam_core.pipeline.onnx_methods.graftable_methods`). ``fam inspect`` prints the choice
and its reason.

Example:
    >>> print(choose_method("classifier"))
    cam (a classifier whose head is global average pooling + a linear classifier)
    >>> choose_method("classifier", cam_refusal="found 'layernorm'").method
    'gradcam'
    >>> choose_method("embedding").method, choose_method("embedding", configured="gradfam").method
    ('fam', 'gradfam')
"""

from __future__ import annotations

from dataclasses import dataclass

RULE = (
    "the config's method, else FAM for embedding models, CAM where the head is global "
    "average pooling + linear, Grad-CAM otherwise"
)
"""The rule in one line, for help texts (``fam export --help``) and the docs."""


@dataclass(frozen=True)
class MethodChoice:
    """The default method of a model and why it is the default."""

    method: str
    reason: str

    def __str__(self) -> str:
        return f"{self.method} ({self.reason})"


def choose_method(
    task: str, *, configured: str | None = None, cam_refusal: str | None = None
) -> MethodChoice:
    """The default method of a ``task`` model: ``configured`` (the config's ``method``) when
    given, else FAM for embedding models, CAM for classifiers whose head CAM reads
    (``cam_refusal`` ``None``), Grad-CAM for the others (``cam_refusal``: why not CAM)."""
    if configured is not None:
        return MethodChoice(configured, "the config's method")
    if task != "classifier":
        return MethodChoice("fam", "an embedding model")
    if cam_refusal is None:
        return MethodChoice(
            "cam", "a classifier whose head is global average pooling + a linear classifier"
        )
    return MethodChoice("gradcam", f"a classifier whose head CAM cannot read: {cam_refusal}")
