"""The wheel works away from the checkout: built here, installed into a fresh virtual
environment under ``tmp_path``, run from a folder outside the repository.

The environment reuses the installed dependencies of the interpreter running the tests (a
``.pth`` file names its site-packages; ``venv --system-site-packages`` would give the base
interpreter's, without torch) and installs only the wheel (``--no-deps``). ``grpc_tools`` is
made unimportable there: the stubs must come with the wheel. The editable install of a
checkout must import the same names (``fam_core.exporters`` from ``exporters/``).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# what the build reads; copied so that the checkout's build/ and egg-info are neither used nor
# written, and stale local files (fam_core/_generated/, __pycache__/) stay out
SOURCES = ("fam_core", "exporters", "handlers", "model-store", "proto")
SOURCE_FILES = ("pyproject.toml", "setup.py", "README.md")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "_generated", "archives", "*.mar")

pytest.importorskip("grpc_tools", reason="building the wheel needs grpcio-tools (test extra)")
pytest.importorskip("setuptools", reason="building the wheel needs setuptools (test extra)")


def _env() -> dict[str, str]:
    """The environment without anything pointing into the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FAM_MODEL_STORE")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(command: list[str], cwd: Path, timeout: int = 180) -> str:
    done = subprocess.run(
        command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (
        f"{command} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def _make_venv(folder: Path) -> Path:
    """A virtual environment whose ``python`` also sees this interpreter's site-packages."""
    venv.EnvBuilder(with_pip=False).create(folder)
    python = folder / "bin" / "python"
    purelib = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], folder)
        .strip()
        .splitlines()[-1]
    )
    (purelib / "_fam_test_parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def _json_elsewhere(python: Path, code: str, away: Path) -> list:
    """What ``code`` prints as JSON, run by ``python`` in ``away`` (made here: a folder outside
    the checkout and the source copy)."""
    away.mkdir()
    return json.loads(_run([str(python), "-c", code], away))


def _pip(python: Path, *args: str, cwd: Path) -> None:
    # the pip of the running interpreter, installing into the new environment
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--disable-pip-version-check", "--no-deps", "--no-index", *args],
        cwd,
    )  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout's files that the build reads."""
    folder = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        shutil.copytree(REPO / name, folder / name, ignore=IGNORED)
    for name in SOURCE_FILES:
        shutil.copy2(REPO / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def wheel(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(source)],
        source,
    )  # fmt: skip
    (built,) = out.glob("fam_core-*.whl")
    return built


def test_wheel_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"fam_core", wheel.name.split("-py3")[0] + ".dist-info"}, sorted(top)
    for required in (
        "fam_core/exporters/__init__.py",
        "fam_core/exporters/graft.py",
        "fam_core/handlers/fam_handler.py",
        "fam_core/model_store/default-embedding/config.yaml",
        "fam_core/model_store/default-embedding/weights.pt",
        "fam_core/model_store/default-embedding/prototypes.pt",
        "fam_core/model_store/default-classifier/config.yaml",
        "fam_core/model_store/default-classifier/weights.pt",
        "fam_core/model_store/config.properties",
        "fam_core/model_store/metrics.yaml",
        "fam_core/proto/fam/v1/fam.proto",
        "fam_core/ui/page.html",  # the browser viewer's page
        "fam_core/proto/inference/grpc_service.proto",
        "fam_core/_generated/fam/v1/fam_pb2.py",
        "fam_core/_generated/fam/v1/fam_pb2_grpc.py",
        "fam_core/_generated/inference/grpc_service_pb2.py",
        "fam_core/_generated/inference/grpc_service_pb2_grpc.py",
    ):
        assert required in names, f"{required} is missing from {wheel.name}"
    # every module of the checkout's package is in the wheel
    for path in (REPO / "fam_core").rglob("*.py"):
        relative = path.relative_to(REPO).as_posix()
        if "_generated" not in relative:
            assert relative in names, f"{relative} is missing from {wheel.name}"
    metadata = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/METADATA")
    requires = [
        line.split(":", 1)[1].strip()
        for line in metadata.decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    base = sorted(r.split(">")[0].split("=")[0] for r in requires if "extra ==" not in r)
    assert base == ["numpy", "pillow", "torch"], base
    extras = {line.split(":", 1)[1].strip() for line in metadata.decode().splitlines()
              if line.startswith("Provides-Extra:")}  # fmt: skip
    assert {"onnx", "onnx-gpu", "export", "serve", "torchserve", "captum", "eval", "all",
            "test"} <= extras, extras  # fmt: skip


def test_wheel_runs_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    python = _make_venv(tmp_path / "venv")
    _pip(python, "--ignore-installed", str(wheel), cwd=tmp_path)
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path).strip())  # fmt: skip
    # the stubs ship with the wheel: grpcio-tools must not be needed at run time
    blocker = purelib / "grpc_tools"
    blocker.mkdir()
    (blocker / "__init__.py").write_text(
        "raise ImportError('grpc_tools imported at run time: the wheel must ship the stubs')\n"
    )
    away = tmp_path / "elsewhere"
    report = _json_elsewhere(
        python,
        "import json, fam_core, fam_core.exporters, fam_core.server.stubs as s; "
        "from fam_core import package_data as d; "
        "print(json.dumps([fam_core.__file__, fam_core.exporters.__file__, s.fam_pb2.__file__, "
        "str(d.MODEL_STORE), str(d.HANDLER_FILE), d.IN_CHECKOUT, fam_core.available_models(), "
        "fam_core.__version__]))",
        away,
    )  # fmt: skip
    package, exporters, stubs, store, handler, in_checkout, models, version = report
    installed = purelib / "fam_core"
    for path in (package, exporters, stubs, store, handler):
        assert Path(path).is_relative_to(installed), f"{path} is not in the installed package"
    assert Path(handler).is_file()
    assert not in_checkout
    assert {
        "default-embedding",
        "default-classifier",
        "default-embedding-fine",
        "default-classifier-fine",
    } <= set(models)
    assert version.count(".") == 2
    fam = str(python.parent / "fam")
    assert "demo" in _run([fam, "--help"], away)
    assert _run([str(python), "-m", "fam_core", "--version"], away).strip() == f"fam-core {version}"
    _run([fam, "demo", "--count", "1", "--out", str(away / "demo")], away)
    assert sorted(p.name for p in (away / "demo").glob("*.png")) == [
        "classifier_0.png",
        "embedding_0.png",
        "summary.png",
    ]
    printed = _run([fam, "serve-demo", "--out", str(away / "serve")], away)
    assert "prediction:" in printed
    assert (away / "serve" / "serve_demo_overlay.png").stat().st_size > 0
    assert not (away / "model-store").exists()


def test_editable_install_maps_the_checkout_folders(source: Path, tmp_path: Path) -> None:
    """``pip install -e`` of a checkout (a copy: the install writes its egg-info there)."""
    python = _make_venv(tmp_path / "venv")
    _pip(python, "--ignore-installed", "--no-build-isolation", "-e", str(source), cwd=tmp_path)
    package, graft, store, handler = _json_elsewhere(
        python,
        "import json, fam_core, fam_core.exporters.graft as g; "
        "from fam_core import package_data as d; "
        "print(json.dumps([fam_core.__file__, g.__file__, str(d.MODEL_STORE), "
        "str(d.HANDLER_FILE)]))",
        tmp_path / "elsewhere",
    )  # fmt: skip
    assert Path(package) == source / "fam_core" / "__init__.py"
    assert Path(graft) == source / "exporters" / "graft.py"
    assert Path(store) == source / "model-store"
    assert Path(handler) == source / "handlers" / "fam_handler.py"
