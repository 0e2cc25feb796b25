"""Old import paths of moved modules and names keep working, and say where they moved."""

from __future__ import annotations

import importlib
import sys

import pytest

from fam_core.moved_modules import MOVED_MODULES


@pytest.mark.parametrize(("old", "new"), sorted(MOVED_MODULES.items()))
def test_an_old_module_path_is_the_moved_module_with_a_warning(old: str, new: str) -> None:
    _forget(old)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_an_old_module_path_is_no_copy() -> None:
    """State set through the old name is the state of the new module (one module object)."""
    _forget("fam_core.pooling")
    with pytest.warns(DeprecationWarning):
        from fam_core import pooling as old_pooling
    from fam_core.anatomy import pooling

    assert old_pooling is pooling
    assert old_pooling.global_pool is pooling.global_pool


def test_explained_search_keeps_its_old_import() -> None:
    from fam_core.pipeline import explained_search

    with pytest.warns(DeprecationWarning, match="fam_core.search.explained_search moved"):
        from fam_core.search import explained_search as old

    assert old is explained_search


def test_a_name_that_never_was_is_an_attribute_error() -> None:
    import fam_core.search

    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        fam_core.search.nothing_here  # noqa: B018


def _forget(name: str) -> None:
    """Import ``name`` afresh: out of ``sys.modules`` and off its parent package."""
    sys.modules.pop(name, None)
    parent, _, child = name.rpartition(".")
    if hasattr(sys.modules[parent], child):
        delattr(sys.modules[parent], child)
