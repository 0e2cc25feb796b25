"""Old import paths of modules that moved into packages, kept working for users' code.

``import fam_core.onnx_runtime`` still gives :mod:`fam_core.graphs.onnx_runtime` (the same
module object), with a :class:`DeprecationWarning` naming the new path.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", DeprecationWarning)
    ...     from fam_core import pooling
    >>> pooling.__name__
    'fam_core.anatomy.pooling'
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

MOVED_MODULES: dict[str, str] = {
    "fam_core.adapters": "fam_core.anatomy.adapters",
    "fam_core.discovery": "fam_core.anatomy.discovery",
    "fam_core.layouts": "fam_core.anatomy.layouts",
    "fam_core.pooling": "fam_core.anatomy.pooling",
    "fam_core.head_fit": "fam_core.anatomy.head_fit",
    "fam_core.head_rows": "fam_core.anatomy.head_rows",
    "fam_core.outputs": "fam_core.anatomy.outputs",
    "fam_core.inspection": "fam_core.explainers.inspection",
    "fam_core.colormaps": "fam_core.render.colormaps",
    "fam_core.panels": "fam_core.render.panels",
    "fam_core.fam_maths": "fam_core.maths.fam",
    "fam_core.similarity": "fam_core.maths.similarity",
    "fam_core.imageio": "fam_core.images.read",
    "fam_core.resizing": "fam_core.images.resize",
    "fam_core.training": "fam_core.models.training",
    "fam_core.configfile": "fam_core.models.configfile",
    "fam_core.default_method": "fam_core.explainers.default_method",
    "fam_core.demo": "fam_core.commands.demo",
    "fam_core.onnx_format": "fam_core.graphs.onnx_format",
    "fam_core.onnx_runtime": "fam_core.graphs.onnx_runtime",
}
"""Every moved module: its old dotted name and where it lives now."""

MOVED_NAMES: dict[str, str] = {"fam_core.search": "fam_core.pipeline.explained_search"}
"""Packages whose public names moved out: the package, and the module whose ``__all__`` has
them now."""


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.target}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """The target module is already executed."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old names in :data:`MOVED_MODULES` and answers with the moved modules."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        moved_to = MOVED_MODULES.get(fullname)
        if moved_to is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(moved_to))


def moved_names(package: str) -> Callable[[str], Any]:
    """A package's module ``__getattr__`` that answers its :data:`MOVED_NAMES` from their new
    module, with a :class:`DeprecationWarning`; any other name is an ``AttributeError``.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     from fam_core.search import explained_search
        >>> explained_search.__module__
        'fam_core.pipeline.explained_search'
    """
    target = MOVED_NAMES[package]

    def getattr_(name: str) -> Any:
        if name.startswith("_") or name not in importlib.import_module(target).__all__:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        warnings.warn(
            f"{package}.{name} moved to {target}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(target), name)

    return getattr_


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())  # before editable installs' finders
