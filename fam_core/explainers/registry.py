"""Explainers by name: how front doors, the evaluation suite and the CLI find a method.

An explainer that must be fitted on labelled images before it explains declares
``needs_fitting = True`` (:class:`~fam_core.explainers.base.Explainer`); every front door
reads that declaration here: :func:`available_methods` with ``runnable_only=True`` leaves
such methods out and :func:`check_runnable` refuses them with a one-line reason.

What a method can do is declared here too, next to its name (:data:`CAPABILITIES`,
:class:`MethodCapabilities`): what it costs, whether it takes gradients, what it explains
(a class, the similarity to references, an embedding model's own output), whether
``fam export`` writes it to ONNX and whether :mod:`fam_core.captum` wraps it. The ONNX
method lists (:mod:`fam_core.graphs.onnx_format`), the Captum wrappers, the command line's help
and the docs' methods table (``scripts/methods_table.py``) are made from it.

The cost is the model passes a method makes per image and its cost class, ``"cheap"`` (a
few passes) or ``"expensive"`` (a pass per channel, per ablation or per optimisation step).
Servers schedule by the class (:func:`cost_class`): cheap requests never wait behind
expensive ones.

Names are matched ignoring case, spaces, ``-`` and ``_`` (:func:`method_name`): ``GradCAM``,
``Grad-CAM`` and ``grad_cam`` all name ``gradcam``; an unknown name is refused with the
closest registered one.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

from fam_core.explainers.base import Explainer

ExplainerType = TypeVar("ExplainerType", bound=type[Explainer])
EXPLAINERS: dict[str, type[Explainer]] = {}
FIT_HINT = "`fam eval --methods {name}` fits it on the benchmark; in Python call its fit(...)"

CostClass = Literal["cheap", "expensive"]
COST_CLASSES: tuple[CostClass, ...] = ("cheap", "expensive")
TargetKind = Literal["class", "similarity", "self"]
TARGET_KINDS: tuple[TargetKind, ...] = ("class", "similarity", "self")
"""What a method explains: a ``class`` of a classifier, the ``similarity`` to reference
embeddings, or an embedding model's ``self`` (its own output, when no target is given)."""
OnnxTask = Literal["embedding", "classifier"]


@dataclass(frozen=True)
class MethodCost:
    """What explaining one image costs, known before it runs.

    Attributes:
        cost_class: ``"cheap"`` or ``"expensive"``: how a server schedules it.
        passes: the model passes per image, in words (``N``: the target layer's channels).

    Example:
        >>> METHOD_COSTS["scorefam"].cost_class, METHOD_COSTS["scorefam"].passes
        ('expensive', '1 forward + N masked forwards')
    """

    cost_class: CostClass
    passes: str


@dataclass(frozen=True)
class MethodCapabilities:
    """What a method can do, declared once next to its name (:data:`CAPABILITIES`); the
    ONNX method lists, the Captum wrappers, the command line's help and the docs' methods
    table are made from it.

    Attributes:
        cost: passes per image and cost class (:class:`MethodCost`).
        needs_gradients: whether it takes backward passes (the model must be differentiable).
        targets: what it explains (:data:`TARGET_KINDS`); empty: the map ignores the target
            (class-agnostic).
        onnx_task: the task of the graph ``fam export`` writes for it (``None``: not
            exportable); ``onnx_refusal``: why not, where the export names a reason.
        captum: whether :mod:`fam_core.captum` names a wrapper class for it.
        needs_fitting: whether it must be fitted before it explains (the explainer class
            declares it; :func:`capabilities` reads it).

    Example:
        >>> caps = capabilities("gradcam")
        >>> caps.exportable_to_onnx, caps.needs_gradients, caps.targets, caps.cost.cost_class
        (True, True, ('class', 'similarity', 'self'), 'cheap')
    """

    cost: MethodCost
    needs_gradients: bool = False
    targets: tuple[TargetKind, ...] = TARGET_KINDS
    onnx_task: OnnxTask | None = None
    onnx_refusal: str | None = None
    captum: bool = False
    needs_fitting: bool = False

    @property
    def exportable_to_onnx(self) -> bool:
        """Whether ``fam export`` writes a graph of this method."""
        return self.onnx_task is not None


_ONE_FORWARD = MethodCost("cheap", "1 forward")
_FORWARD_BACKWARD = MethodCost("cheap", "1 forward + 1 backward")
_MASKED = MethodCost("expensive", "1 forward + N masked forwards")
_GRADIENT = MethodCapabilities(_FORWARD_BACKWARD, needs_gradients=True, captum=True)
CAPABILITIES: dict[str, MethodCapabilities] = {
    "fam": MethodCapabilities(_ONE_FORWARD, onnx_task="embedding", captum=True),
    "gradfam": MethodCapabilities(_FORWARD_BACKWARD, needs_gradients=True, onnx_task="embedding"),
    "scorefam": MethodCapabilities(_MASKED),
    "fam-signed": MethodCapabilities(_ONE_FORWARD),
    "fam-centred": MethodCapabilities(_ONE_FORWARD),
    "fam-orthogonal": MethodCapabilities(_ONE_FORWARD),
    "cam": MethodCapabilities(_ONE_FORWARD, onnx_task="classifier", captum=True),
    "gradcam": replace(_GRADIENT, onnx_task="classifier"),
    "gradcam++": _GRADIENT,
    "xgradcam": _GRADIENT,
    "layercam": _GRADIENT,
    "scorecam": MethodCapabilities(_MASKED, captum=True),
    "ablationcam": MethodCapabilities(
        MethodCost("expensive", "1 forward + N ablated forwards of the head"), captum=True
    ),
    "eigencam": MethodCapabilities(_ONE_FORWARD, targets=(), captum=True),
    "activation": MethodCapabilities(_ONE_FORWARD, targets=(), captum=True),
    "guided-gradcam": replace(_GRADIENT, cost=MethodCost("cheap", "1 forward + 2 backward")),
    "relevancecam": MethodCapabilities(
        _FORWARD_BACKWARD,
        needs_gradients=True,
        onnx_refusal="Relevance-CAM's z+ relevance propagation has no ONNX graph",
        captum=True,
    ),
    "liftcam": MethodCapabilities(
        MethodCost("cheap", "1 forward + 1 DeepLIFT pass of the head"),
        needs_gradients=True,
        onnx_refusal="LIFT-CAM runs Captum's DeepLift (hooks and a second pass from the "
        "reference), which has no ONNX graph",
        captum=True,
    ),
    "l2caf": MethodCapabilities(
        MethodCost("expensive", "1 forward + up to 'iterations' forward-backward steps"),
        needs_gradients=True,
    ),
    "guided-backprop": MethodCapabilities(_FORWARD_BACKWARD, needs_gradients=True),
    "deconvnet": MethodCapabilities(_FORWARD_BACKWARD, needs_gradients=True),
    "relevant-features": MethodCapabilities(
        MethodCost("expensive", "1 forward + 1 backward per relevant feature"),
        needs_gradients=True,
        targets=("class",),
    ),
}
"""What every registered method can do, by name; a method missing here is expensive, takes
no ONNX export and no Captum wrapper (:data:`UNLISTED`)."""
UNLISTED_COST = MethodCost("expensive", "unknown")
UNLISTED = MethodCapabilities(UNLISTED_COST)
METHOD_COSTS: dict[str, MethodCost] = {name: caps.cost for name, caps in CAPABILITIES.items()}
"""The cost of every declared method, by name (from :data:`CAPABILITIES`)."""


def register(cls: ExplainerType) -> ExplainerType:
    """Class decorator: make an explainer available under its ``method`` name."""
    name = cls.method
    if name in EXPLAINERS and EXPLAINERS[name] is not cls:
        raise ValueError(f"an explainer named {name!r} is already registered")
    EXPLAINERS[name] = cls
    return cls


def capabilities(name: str) -> MethodCapabilities:
    """What method ``name`` (matched as :func:`method_name` does) can do: its declaration in
    :data:`CAPABILITIES` (:data:`UNLISTED` where it declares none), with ``needs_fitting``
    from its explainer class.

    Example:
        >>> capabilities("relevant-features").needs_fitting, capabilities("fam").onnx_task
        (True, 'embedding')
    """
    name = method_name(name)
    declared = CAPABILITIES.get(name, UNLISTED)
    return replace(declared, needs_fitting=bool(EXPLAINERS[name].needs_fitting))


def onnx_methods(task: OnnxTask | None = None) -> tuple[str, ...]:
    """The methods ``fam export`` writes (for ``task`` graphs only, when given): the
    embedding ones first, each task in declaration order.

    Example:
        >>> onnx_methods(), onnx_methods("classifier")
        (('fam', 'gradfam', 'cam', 'gradcam'), ('cam', 'gradcam'))
    """
    tasks: tuple[OnnxTask, ...] = ("embedding", "classifier") if task is None else (task,)
    return tuple(
        name for kind in tasks for name, caps in CAPABILITIES.items() if caps.onnx_task == kind
    )


def captum_methods() -> tuple[str, ...]:
    """The methods :mod:`fam_core.captum` names a wrapper class for, in declaration order.

    Example:
        >>> captum_methods()[:3]
        ('fam', 'cam', 'gradcam')
    """
    return tuple(name for name, caps in CAPABILITIES.items() if caps.captum)


def _folded(name: str) -> str:
    return re.sub(r"[\s_-]+", "", name).lower()


def method_name(
    name: str, *, runnable_only: bool = False, expected: Sequence[str] | None = None
) -> str:
    """The registered name of method ``name``, matched ignoring case, spaces, ``-`` and
    ``_``; else a one-line ``ValueError`` with the closest of the ``expected`` names and the
    list of them (default: every registered method, or with ``runnable_only`` those that
    explain without fitting; a server passes the methods its model serves).

    Example:
        >>> method_name("GradCAM"), method_name("Guided_GradCAM")
        ('gradcam', 'guided-gradcam')
        >>> method_name("gradcm", expected=["cam", "gradcam"])
        Traceback (most recent call last):
        ...
        ValueError: unknown method 'gradcm' (did you mean 'gradcam'?); expected one of ['cam', 'gradcam']
    """
    if not isinstance(name, str):
        raise TypeError(f"method must be a str, got {type(name).__name__}")
    if name in EXPLAINERS:
        return name
    by_folded = {_folded(registered): registered for registered in EXPLAINERS}
    if _folded(name) in by_folded:
        return by_folded[_folded(name)]
    if expected is None:
        expected = available_methods(runnable_only=runnable_only)
    folded_expected = {_folded(method): method for method in expected}
    close = difflib.get_close_matches(_folded(name), list(folded_expected), n=1)
    hint = f" (did you mean {folded_expected[close[0]]!r}?)" if close else ""
    raise ValueError(f"unknown method {name!r}{hint}; expected one of {list(expected)}")


def get_explainer(name: str) -> type[Explainer]:
    """The explainer class registered as ``name`` (matched as :func:`method_name` does).

    Example:
        >>> get_explainer("fam").__name__, get_explainer("GradFAM").__name__
        ('FAM', 'GradFAM')
    """
    return EXPLAINERS[method_name(name)]


def needs_fitting(name: str) -> bool:
    """Whether the method registered as ``name`` must be fitted before it explains.

    Example:
        >>> needs_fitting("relevant-features"), needs_fitting("fam")
        (True, False)
    """
    return bool(get_explainer(name).needs_fitting)


def method_cost(name: str) -> MethodCost:
    """The declared cost of method ``name``; :data:`UNLISTED_COST` (expensive) when the
    method declares none, so that unknown work never delays cheap requests.

    Example:
        >>> method_cost("gradcam").passes
        '1 forward + 1 backward'
    """
    return CAPABILITIES.get(name, UNLISTED).cost


def cost_class(name: str) -> CostClass:
    """``"cheap"`` or ``"expensive"``: how a server schedules requests for method ``name``.

    Example:
        >>> cost_class("cam"), cost_class("scorefam")
        ('cheap', 'expensive')
    """
    return method_cost(name).cost_class


def available_methods(*, runnable_only: bool = False) -> list[str]:
    """Names of every registered explainer, sorted; with ``runnable_only``, only those that
    explain as soon as they are built (no ``needs_fitting``).

    Example:
        >>> "relevant-features" in available_methods()
        True
        >>> "relevant-features" in available_methods(runnable_only=True)
        False
    """
    return sorted(
        name for name, cls in EXPLAINERS.items() if not (runnable_only and cls.needs_fitting)
    )


def method_help(default: str) -> str:
    """The help text of a command's ``--method`` option: the ``default`` in words, then every
    method that explains without fitting.

    Example:
        >>> method_help("fam")[:46]
        'explainer (default: fam), one of: ablationcam,'
    """
    return f"explainer (default: {default}), one of: " + ", ".join(
        available_methods(runnable_only=True)
    )


def check_runnable(name: str) -> type[Explainer]:
    """The explainer class of ``name`` (matched as :func:`method_name` does) when it can
    explain without fitting; else a one-line ``ValueError``: unknown methods name the closest
    runnable one and list them all, methods that need fitting say so.

    Example:
        >>> check_runnable("relevant-features")
        Traceback (most recent call last):
        ...
        ValueError: method 'relevant-features' needs fitting on labelled images before it explains: `fam eval --methods relevant-features` fits it on the benchmark; in Python call its fit(...)
    """
    name = method_name(name, runnable_only=True)
    cls = EXPLAINERS[name]
    if cls.needs_fitting:
        raise ValueError(
            f"method {name!r} needs fitting on labelled images before it explains: "
            + FIT_HINT.format(name=name)
        )
    return cls
