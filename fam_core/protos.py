"""The gRPC stubs of the ``.proto`` sources, in ``fam_core/_generated/`` (never edited by hand).

* A wheel ships them: ``setup.py``'s ``build_py`` runs :func:`generate` at build time, so an
  installed package needs neither grpcio-tools nor the ``.proto`` sources to import them.
* In a checkout (``fam_core/_generated/`` is git-ignored) :func:`ensure_generated` runs
  ``grpc_tools.protoc`` (from the ``test`` extra) when they are missing or stale: a stamp
  records a hash of the ``.proto`` sources and the grpcio-tools version. Modules that need the
  stubs call it before importing them. ``python -m fam_core.protos`` regenerates them
  unconditionally.

The ``.proto`` files are compiled under the virtual path ``fam_core/_generated/`` so the
generated modules import each other as ``fam_core._generated...``: no ``sys.path`` changes.

This module imports only the standard library (and grpc_tools when it compiles), so that the
build hook can load it from its file without importing ``fam_core``.

Example:
    >>> from fam_core.protos import ensure_generated
    >>> ensure_generated().name
    '_generated'
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import tempfile
import threading
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# fam_core.package_data.IN_CHECKOUT, repeated: importing it would import fam_core (and torch)
IN_CHECKOUT = (PACKAGE_DIR.parent / "pyproject.toml").is_file() and (
    PACKAGE_DIR.parent / "model-store"
).is_dir()
PROTO_ROOT = PACKAGE_DIR.parent / "proto" if IN_CHECKOUT else PACKAGE_DIR / "proto"
"""The ``.proto`` sources: the repository's ``proto/``, or the copy installed with the package."""
GENERATED = PACKAGE_DIR / "_generated"
PROTO_FILES = ("fam/v1/fam.proto", "inference/grpc_service.proto")
_STAMP = "STAMP"
_VIRTUAL_ROOT = "fam_core/_generated"
_lock = threading.Lock()


def _fingerprint(proto_root: Path) -> str:
    from grpc_tools import __file__ as grpc_tools_file

    digest = hashlib.sha256()
    try:
        from importlib.metadata import version

        digest.update(version("grpcio-tools").encode())
    except Exception:  # pragma: no cover - metadata missing: fall back on the install path
        digest.update(grpc_tools_file.encode())
    for name in PROTO_FILES:
        digest.update(name.encode())
        digest.update((proto_root / name).read_bytes())
    return digest.hexdigest()


def generate(target: Path = GENERATED, proto_root: Path = PROTO_ROOT) -> Path:
    """Compile every file of :data:`PROTO_FILES` under ``proto_root`` into ``target`` (replaced
    atomically); needs grpcio-tools."""
    try:
        from grpc_tools import protoc
    except ModuleNotFoundError:
        raise OSError(
            "generating the gRPC stubs needs grpcio-tools: pip install 'grpcio-tools==1.81.1' "
            "(the test extra has it)"
        ) from None
    missing = [name for name in PROTO_FILES if not (proto_root / name).is_file()]
    if missing:
        raise OSError(f"proto sources {missing} are missing under {proto_root}")
    well_known = Path(protoc.__file__).parent / "_proto"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".protoc-") as scratch:
        arguments = [
            "grpc_tools.protoc",
            f"--proto_path={_VIRTUAL_ROOT}={proto_root}",
            f"--proto_path={well_known}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}",
            *[f"{_VIRTUAL_ROOT}/{name}" for name in PROTO_FILES],
        ]
        if protoc.main(arguments) != 0:
            raise OSError(f"grpc_tools.protoc failed on {list(PROTO_FILES)}")
        built = Path(scratch) / _VIRTUAL_ROOT
        for folder in [built, *[p for p in built.rglob("*") if p.is_dir()]]:
            (folder / "__init__.py").touch()
        (built / _STAMP).write_text(_fingerprint(proto_root))
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            target.rename(old)
        built.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    importlib.invalidate_caches()
    return target


def _grpc_tools_installed() -> bool:
    return importlib.util.find_spec("grpc_tools") is not None


def ensure_generated() -> Path:
    """Return the stubs' folder, generated first in a checkout when missing or stale.

    Stubs built with an installed package are used as they are (grpcio-tools is not needed).
    """
    with _lock:
        stamp = GENERATED / _STAMP
        if stamp.is_file() and (not IN_CHECKOUT or not _grpc_tools_installed()):
            return GENERATED
        if not _grpc_tools_installed():
            raise OSError(
                f"the gRPC stubs are missing from {GENERATED}: install fam-core from a wheel "
                "(pip install 'fam-core[serve]'), which ships them, or install grpcio-tools "
                "and run python -m fam_core.protos"
            )
        if not (stamp.is_file() and stamp.read_text() == _fingerprint(PROTO_ROOT)):
            generate()
    return GENERATED


if __name__ == "__main__":
    print(f"generated {generate()}")
