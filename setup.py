"""Build hook: the wheel carries gRPC stubs compiled from ``proto/`` at build time.

Everything else is declared in ``pyproject.toml``; this file adds the package list (the
subpackages of ``fam_core/`` plus the repository folders that ``[tool.setuptools.package-dir]``
maps into it) and a ``build_py`` that runs ``grpc_tools.protoc`` (a build requirement) through
:func:`fam_core.protos.generate`, so that grpcio-tools is not needed at run time. Editable
installs skip it: in a checkout, ``fam_core.protos.ensure_generated`` generates the stubs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
MAPPED = ["fam_core.exporters", "fam_core.handlers", "fam_core.model_store", "fam_core.proto"]
# the folders of proto/ are data packages of their own (setuptools warns about unlisted ones)
PROTO_FOLDERS = [
    ".".join(("fam_core.proto", *folder.relative_to(ROOT / "proto").parts))
    for folder in sorted((ROOT / "proto").rglob("*"))
    if folder.is_dir()
]


def _protos_module():
    """``fam_core/protos.py`` loaded from its file: importing ``fam_core`` needs torch, which
    the isolated build environment does not have."""
    spec = importlib.util.spec_from_file_location("_fam_core_protos", ROOT / "fam_core/protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "fam_core" / "_generated"
        _protos_module().generate(target=target, proto_root=ROOT / "proto")
        self.announce(f"generated the gRPC stubs in {target}", level=2)


setup(
    packages=[
        *find_packages(include=["fam_core", "fam_core.*"], exclude=["fam_core._generated*"]),
        *MAPPED,
        *PROTO_FOLDERS,
    ],
    cmdclass={"build_py": BuildPyWithStubs},
)
