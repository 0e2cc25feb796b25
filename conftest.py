"""Collection settings for the whole repository (``testpaths`` covers tests/ and fam_core/).

``fam_core/server/kserve_model.py`` imports kserve, whose protobuf package ``inference``
clashes with fam's generated OIP stubs in one process: ``--doctest-modules`` does not import
it here; tests/server/test_kserve.py runs its doctest and drives it in subprocesses.

Doctests make their folders with ``tempfile.mkdtemp()``, as a reader would; here those land
in the doctest's own ``tmp_path`` (pytest prunes old runs) instead of piling up in /tmp.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import pytest
from _pytest.doctest import DoctestItem

collect_ignore = ["fam_core/server/kserve_model.py"]


@pytest.fixture(autouse=True)
def _doctest_temporary_folders(request: pytest.FixtureRequest) -> Iterator[None]:
    if not isinstance(request.node, DoctestItem):
        yield
        return
    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setattr(tempfile, "tempdir", str(request.getfixturevalue("tmp_path")))
    yield
