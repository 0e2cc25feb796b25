"""Methods declare their capabilities once, in the registry: the ONNX method lists, the
Captum wrappers, the command line's help and the docs' methods tables come from there."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from fam_core.explainers.default_method import RULE
from fam_core.explainers.registry import (
    CAPABILITIES,
    EXPLAINERS,
    TARGET_KINDS,
    capabilities,
    captum_methods,
)
from fam_core.graphs import onnx_format as fmt

ROOT = Path(__file__).resolve().parents[2]


def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "methods_table", ROOT / "scripts" / "methods_table.py"
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_every_registered_method_declares_its_capabilities() -> None:
    assert set(EXPLAINERS) == set(CAPABILITIES)
    for name, cls in EXPLAINERS.items():
        caps = capabilities(name)
        assert caps.needs_fitting == cls.needs_fitting, name
        assert not cls.needs_gradients or caps.needs_gradients, name  # gradients() users
        assert set(caps.targets) <= set(TARGET_KINDS), name
        assert not (caps.onnx_task and caps.onnx_refusal), name


def test_the_onnx_lists_are_the_exportable_methods() -> None:
    assert fmt.METHODS == ("fam", "gradfam", "cam", "gradcam")
    assert fmt.EMBEDDING_METHODS == ("fam", "gradfam")
    assert fmt.CLASSIFIER_METHODS == ("cam", "gradcam")
    assert set(fmt.NOT_EXPORTED) == {"relevancecam", "liftcam"}
    assert all(capabilities(name).exportable_to_onnx for name in fmt.METHODS)


def test_the_captum_wrappers_are_the_declared_ones() -> None:
    pytest.importorskip("captum")
    from fam_core import captum

    for method in captum_methods():
        wrapper = getattr(captum, f"{EXPLAINERS[method].__name__}Attribution")
        assert wrapper is captum.layer_attribution(method)
        assert wrapper.__name__ in captum.__all__
    assert len(captum.WRAPPERS) == len(captum_methods()) == 13


def test_is_explanation_graph_reads_the_metadata() -> None:
    assert fmt.is_explanation_graph({fmt.KEY_METHOD: "cam", fmt.KEY_PREPROCESSING: "{}"})
    assert not fmt.is_explanation_graph({fmt.KEY_METHOD: "cam"})


def test_the_committed_pages_are_the_generated_ones() -> None:
    module = script()
    for page, text in module.pages().items():
        assert page.read_text() == text, "run python scripts/methods_table.py"
    assert module.main(["--check"]) == 0
    page = (ROOT / "docs" / "methods" / "overview.md").read_text()
    for name in EXPLAINERS:
        assert f"| `{name}` | `{EXPLAINERS[name].__name__}` |" in page
    assert RULE in page
    assert " methods/overview.md\n" in (ROOT / "mkdocs.yml").read_text().split("\nnav:\n")[1]


def test_a_page_without_its_markers_is_refused() -> None:
    with pytest.raises(ValueError, match="methods-table:start"):
        script().rendered("no markers\n", "methods-table", "table")
