"""Explainers by name: how front doors, the evaluation suite and the CLI find a method.

An explainer that must be fitted on labelled images before it explains declares
``needs_fitting = True`` (:class:`~fam_core.explainers.base.Explainer`); every front door
reads that declaration here: :func:`available_methods` with ``runnable_only=True`` leaves
such methods out and :func:`check_runnable` refuses them with a one-line reason.
"""

from __future__ import annotations

from typing import TypeVar

from fam_core.explainers.base import Explainer

ExplainerType = TypeVar("ExplainerType", bound=type[Explainer])
EXPLAINERS: dict[str, type[Explainer]] = {}
FIT_HINT = "`fam eval --methods {name}` fits it on the benchmark; in Python call its fit(...)"


def register(cls: ExplainerType) -> ExplainerType:
    """Class decorator: make an explainer available under its ``method`` name."""
    name = cls.method
    if name in EXPLAINERS and EXPLAINERS[name] is not cls:
        raise ValueError(f"an explainer named {name!r} is already registered")
    EXPLAINERS[name] = cls
    return cls


def get_explainer(name: str) -> type[Explainer]:
    """The explainer class registered as ``name``.

    Example:
        >>> get_explainer("fam").__name__
        'FAM'
    """
    try:
        return EXPLAINERS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(EXPLAINERS)}") from None


def needs_fitting(name: str) -> bool:
    """Whether the method registered as ``name`` must be fitted before it explains.

    Example:
        >>> needs_fitting("relevant-features"), needs_fitting("fam")
        (True, False)
    """
    return bool(get_explainer(name).needs_fitting)


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
    """The explainer class of ``name`` when it can explain without fitting; else a one-line
    ``ValueError``: unknown methods list the runnable ones, methods that need fitting say so.

    Example:
        >>> check_runnable("relevant-features")
        Traceback (most recent call last):
        ...
        ValueError: method 'relevant-features' needs fitting on labelled images before it explains: `fam eval --methods relevant-features` fits it on the benchmark; in Python call its fit(...)
    """
    if name not in EXPLAINERS:
        raise ValueError(
            f"unknown method {name!r}; expected one of {available_methods(runnable_only=True)}"
        )
    cls = EXPLAINERS[name]
    if cls.needs_fitting:
        raise ValueError(
            f"method {name!r} needs fitting on labelled images before it explains: "
            + FIT_HINT.format(name=name)
        )
    return cls
