"""Generate the gRPC stubs from ``proto/`` into ``fam_core/_generated/`` (git-ignored).

Stubs are never edited by hand: :func:`ensure_generated` runs ``grpc_tools.protoc`` when they
are missing or stale (a stamp records a hash of the ``.proto`` sources and the grpcio-tools
version), and modules that need them call it before importing. ``python -m fam_core.protos``
regenerates them unconditionally.

The ``.proto`` files are compiled under the virtual path ``fam_core/_generated/`` so the
generated modules import each other as ``fam_core._generated...``: no ``sys.path`` changes.

Example:
    >>> from fam_core.protos import ensure_generated
    >>> ensure_generated().name
    '_generated'
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parent / "proto"
GENERATED = PACKAGE_DIR / "_generated"
PROTO_FILES = ("fam/v1/fam.proto", "inference/grpc_service.proto")
_STAMP = "STAMP"
_VIRTUAL_ROOT = "fam_core/_generated"
_lock = threading.Lock()


def _fingerprint() -> str:
    from grpc_tools import __file__ as grpc_tools_file

    digest = hashlib.sha256()
    try:
        from importlib.metadata import version

        digest.update(version("grpcio-tools").encode())
    except Exception:  # pragma: no cover - metadata missing: fall back on the install path
        digest.update(grpc_tools_file.encode())
    for name in PROTO_FILES:
        digest.update(name.encode())
        digest.update((PROTO_ROOT / name).read_bytes())
    return digest.hexdigest()


def generate(target: Path = GENERATED) -> Path:
    """Compile every file of :data:`PROTO_FILES` into ``target`` (replaced atomically)."""
    from grpc_tools import protoc

    missing = [name for name in PROTO_FILES if not (PROTO_ROOT / name).is_file()]
    if missing:
        raise OSError(f"proto sources {missing} are missing under {PROTO_ROOT}")
    well_known = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".protoc-") as scratch:
        arguments = [
            "grpc_tools.protoc",
            f"--proto_path={_VIRTUAL_ROOT}={PROTO_ROOT}",
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
        (built / _STAMP).write_text(_fingerprint())
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            target.rename(old)
        built.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    importlib.invalidate_caches()
    return target


def ensure_generated() -> Path:
    """Generate the stubs unless they are present and match the sources; return their folder."""
    with _lock:
        stamp = GENERATED / _STAMP
        if not (stamp.is_file() and stamp.read_text() == _fingerprint()):
            generate()
    return GENERATED


if __name__ == "__main__":
    print(f"generated {generate()}")
