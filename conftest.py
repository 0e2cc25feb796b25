"""Collection settings for the whole repository (``testpaths`` covers tests/ and fam_core/).

``fam_core/server/kserve_model.py`` imports kserve, whose protobuf package ``inference``
clashes with fam's generated OIP stubs in one process: ``--doctest-modules`` does not import
it here; tests/server/test_kserve.py runs its doctest and drives it in subprocesses.
"""

collect_ignore = ["fam_core/server/kserve_model.py"]
