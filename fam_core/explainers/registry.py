"""Explainers by name: how front doors, the evaluation suite and the CLI find a method."""

from __future__ import annotations

from typing import TypeVar

from fam_core.explainers.base import Explainer

ExplainerType = TypeVar("ExplainerType", bound=type[Explainer])
EXPLAINERS: dict[str, type[Explainer]] = {}


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


def available_methods() -> list[str]:
    """Names of every registered explainer, sorted."""
    return sorted(EXPLAINERS)
