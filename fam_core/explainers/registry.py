"""Explainers by name: how front doors, the evaluation suite and the CLI find a method.

An explainer that must be fitted on labelled images before it explains declares
``needs_fitting = True`` (:class:`~fam_core.explainers.base.Explainer`); every front door
reads that declaration here: :func:`available_methods` with ``runnable_only=True`` leaves
such methods out and :func:`check_runnable` refuses them with a one-line reason.

What a method costs is declared here too, next to its name (:data:`METHOD_COSTS`): the model
passes it makes per image, and its cost class, ``"cheap"`` (a few passes) or ``"expensive"``
(a pass per channel, per ablation or per optimisation step). Servers schedule by the class
(:func:`cost_class`): cheap requests never wait behind expensive ones.

Names are matched ignoring case, spaces, ``-`` and ``_`` (:func:`method_name`): ``GradCAM``,
``Grad-CAM`` and ``grad_cam`` all name ``gradcam``; an unknown name is refused with the
closest registered one.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from fam_core.explainers.base import Explainer

ExplainerType = TypeVar("ExplainerType", bound=type[Explainer])
EXPLAINERS: dict[str, type[Explainer]] = {}
FIT_HINT = "`fam eval --methods {name}` fits it on the benchmark; in Python call its fit(...)"

CostClass = Literal["cheap", "expensive"]
COST_CLASSES: tuple[CostClass, ...] = ("cheap", "expensive")


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


_ONE_FORWARD = MethodCost("cheap", "1 forward")
_FORWARD_BACKWARD = MethodCost("cheap", "1 forward + 1 backward")
METHOD_COSTS: dict[str, MethodCost] = {
    "activation": _ONE_FORWARD,
    "cam": _ONE_FORWARD,
    "eigencam": _ONE_FORWARD,
    "fam": _ONE_FORWARD,
    "fam-signed": _ONE_FORWARD,
    "fam-centred": _ONE_FORWARD,
    "fam-orthogonal": _ONE_FORWARD,
    "gradfam": _FORWARD_BACKWARD,
    "gradcam": _FORWARD_BACKWARD,
    "gradcam++": _FORWARD_BACKWARD,
    "xgradcam": _FORWARD_BACKWARD,
    "layercam": _FORWARD_BACKWARD,
    "guided-gradcam": MethodCost("cheap", "1 forward + 2 backward"),
    "guided-backprop": _FORWARD_BACKWARD,
    "deconvnet": _FORWARD_BACKWARD,
    "relevancecam": _FORWARD_BACKWARD,
    "liftcam": MethodCost("cheap", "1 forward + 1 DeepLIFT pass of the head"),
    "scorefam": MethodCost("expensive", "1 forward + N masked forwards"),
    "scorecam": MethodCost("expensive", "1 forward + N masked forwards"),
    "ablationcam": MethodCost("expensive", "1 forward + N ablated forwards of the head"),
    "l2caf": MethodCost("expensive", "1 forward + up to 'iterations' forward-backward steps"),
    "relevant-features": MethodCost("expensive", "1 forward + 1 backward per relevant feature"),
}
"""The cost of every registered method, by name; a method missing here is expensive."""
UNLISTED_COST = MethodCost("expensive", "unknown")


def register(cls: ExplainerType) -> ExplainerType:
    """Class decorator: make an explainer available under its ``method`` name."""
    name = cls.method
    if name in EXPLAINERS and EXPLAINERS[name] is not cls:
        raise ValueError(f"an explainer named {name!r} is already registered")
    EXPLAINERS[name] = cls
    return cls


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
    return METHOD_COSTS.get(name, UNLISTED_COST)


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
