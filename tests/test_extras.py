"""Optional packages: each front door that needs an extra names it when a package is missing.

Each case runs in a fresh interpreter where the optional packages are made unimportable
(``sys.modules[name] = None``), so that nothing imported by other tests hides the failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from fam_core.extras import PURPOSES, MissingExtraError, require

REPO = Path(__file__).resolve().parents[1]
OPTIONAL = (
    "grpc",
    "captum",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "model_archiver",
    "prometheus_client",
    "matplotlib",
    "tqdm",
    "yaml",
)


def test_require_returns_the_module_and_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require("serve", "json").__name__ == "json"
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)  # imported by earlier tests
    with pytest.raises(MissingExtraError, match=r"pip install 'fam-core\[captum\]'"):
        require("captum", "captum.attr")
    with pytest.raises(ValueError, match="unknown extra 'gpu'"):
        require("gpu", "json")


def test_require_does_not_mask_a_broken_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "brokenpkg_fam").mkdir()
    (tmp_path / "brokenpkg_fam" / "__init__.py").write_text("import no_such_dependency_fam\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as caught:
        require("serve", "brokenpkg_fam")
    assert not isinstance(caught.value, MissingExtraError)
    assert caught.value.name == "no_such_dependency_fam"


def test_every_extra_is_declared() -> None:
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(PURPOSES) <= set(declared), set(PURPOSES) - set(declared)


def test_front_doors_name_their_extra(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import json, sys
        for name in {OPTIONAL!r}:
            sys.modules[name] = None
        from fam_core.cli import main
        from fam_core.extras import MissingExtraError

        def attempt(action):
            try:
                action()
            except MissingExtraError as error:
                return str(error)
            return "no error"

        def captum():
            import fam_core.captum  # noqa: F401

        def onnx_file():
            from fam_core.graphs.onnx_runtime import OnnxExplainer
            OnnxExplainer("model.onnx")

        codes = {{
            "serve-demo": main(["serve-demo", "--out", {str(tmp_path / "serve")!r}]),
            "export": main(["export", "default-classifier", "--out", {str(tmp_path / "m.onnx")!r}]),
            "archive": main(["archive", "--out", {str(tmp_path / "archives")!r}]),
            "eval": main(["eval", "--out", {str(tmp_path / "eval")!r}]),
        }}
        print(json.dumps({{"codes": codes, "captum": attempt(captum), "onnx": attempt(onnx_file)}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["codes"] == {"serve-demo": 2, "export": 2, "archive": 2, "eval": 2}, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("fam: error:")]
    assert errors == [
        "fam: error: the gRPC server needs grpc, which is not installed: pip install 'fam-core[serve]'",
        "fam: error: exporting to ONNX needs onnx, which is not installed: pip install 'fam-core[export]'",
        "fam: error: building TorchServe archives needs model_archiver, which is not installed: "
        "pip install 'fam-core[torchserve]'",
        "fam: error: the evaluation needs matplotlib, which is not installed: "
        "pip install 'fam-core[eval]'",
    ], done.stderr
    assert result["captum"] == (
        "the Captum interop needs captum, which is not installed: pip install 'fam-core[captum]'"
    )
    assert result["onnx"] == (
        "running ONNX files needs onnxruntime, which is not installed: pip install 'fam-core[onnx]'"
    )


def test_the_base_install_explains_and_renders(tmp_path: Path) -> None:
    """torch, numpy and pillow are enough for ``fam demo`` and ``fam explain`` on the default
    models: configs, colour maps, figures and progress need no optional package."""
    from fam_core.render import save_png

    image = torch.rand(3, 60, 90)  # not the model's size: the overlay is drawn on it
    save_png((image.permute(1, 2, 0) * 255).round().to(torch.uint8), tmp_path / "x.png")
    script = textwrap.dedent(
        f"""
        import sys
        for name in {OPTIONAL!r}:
            sys.modules[name] = None
        from fam_core.cli import main
        demo = main(["demo", "--count", "2", "--out", {str(tmp_path / "demo")!r}])
        explain = main(["explain", {str(tmp_path / "x.png")!r}, "--model", "default-classifier",
                        "--out", {str(tmp_path / "explain")!r}])
        print(demo, explain)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0 0", done.stdout + done.stderr
    (figure,) = (tmp_path / "explain").glob("*.png")
    with Image.open(figure) as png:
        assert png.mode == "RGB" and png.height > 60
    assert list((tmp_path / "demo").glob("*.png"))
