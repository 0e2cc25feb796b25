"""The config schema is the one description of a config: ``ModelConfig``'s fields and defaults,
what ``from_file`` accepts, and the docs' reference page all come from it."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from fam_core.models.config_schema import KEYS, REQUIRED, SOURCES, SPECS, reference_markdown
from fam_core.models.store import ModelConfig

ROOT = Path(__file__).resolve().parents[2]
BASE = {"name": "m", "task": "classifier", "factory": "mymodels:build"}


def test_every_config_field_is_a_key_of_the_schema_with_the_same_default() -> None:
    fields = {f.name: f for f in dataclasses.fields(ModelConfig) if f.name != "directory"}
    assert list(fields) and set(fields) == set(SPECS)
    for name, spec in SPECS.items():
        field = fields[name]
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = REQUIRED
        assert default == spec.default, name


def test_the_committed_reference_page_is_the_generated_one() -> None:
    page = ROOT / "docs" / "config.md"
    assert page.read_text() == reference_markdown(), "run python scripts/config_reference.py"
    for spec in KEYS:  # every key, its type, default and example are on the page
        assert f"| `{spec.name}` | {spec.type_text} |" in page.read_text()
        assert f"`{spec.name}: {spec.example}`" in page.read_text()
    assert " config.md\n" in (ROOT / "mkdocs.yml").read_text().split("\nnav:\n")[1]  # in the nav


def test_the_script_checks_the_page() -> None:
    spec = importlib.util.spec_from_file_location(
        "config_reference", ROOT / "scripts" / "config_reference.py"
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    assert module.main(["--check"]) == 0


def write(folder: Path, keys: dict) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(json.dumps(keys))
    return path


@pytest.mark.parametrize("key", list(SPECS))
def test_every_example_is_a_valid_value(key, tmp_path) -> None:
    spec = SPECS[key]
    source = spec.sources[0] if spec.sources else "factory"
    task = "embedding" if key.startswith("index") else "classifier"  # an index serves embeddings
    keys = {"name": "m", "task": task, source: SPECS[source].example}
    if key == "index_search":  # search parameters of an index
        keys["index"] = SPECS["index"].example
    if source == "backbone":
        keys["weights"] = SPECS["weights"].example
    keys |= {"mean": [0.5], "std": [0.5]}  # one value fits every channel count
    keys[key] = yaml.safe_load(spec.example)
    config = ModelConfig.from_file(write(tmp_path, keys))
    loaded = getattr(config, key)
    assert (list(loaded) if isinstance(loaded, tuple) else loaded) == keys[key]


@pytest.mark.parametrize("key", list(SPECS))
def test_every_key_refuses_a_value_of_the_wrong_type_naming_it(key, tmp_path) -> None:
    keys = {**BASE, key: [[]]}
    with pytest.raises(ValueError) as error:
        ModelConfig.from_file(write(tmp_path, keys))
    names = (key, "source") if key in SOURCES else (key,)
    assert any(f": {n}: " in str(error.value) or f"{n} must be" in str(error.value) for n in names)
    assert "\n" not in str(error.value)


def test_an_unknown_key_points_at_the_reference(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\].*docs/config.md"):
        ModelConfig.from_file(write(tmp_path, {**BASE, "colour": 1}))


KIND_VALUES = {  # kind: (values it takes, values it refuses)
    "name": (["m"], ["", 1, None]),
    "string": (["x", None], [1, ["x"]]),
    "file": (["w.pt", None], [1, {}]),
    "mapping": ([{}, {"a": 1}, None], [[], "a"]),
    "int": ([0, 3, None], [2.5, True, "3"]),
    "number": ([0.5, 2, None], [False, "0.5"]),
    "bool": ([True, False, None], [1, "yes"]),
    "numbers": ([(0.5,), (1, 2.5), None], [(), ("a",), (True,), [0.5]]),
    "strings": ([(), ("a", "b"), None], [(1,), ["a"]]),
    "key or index": (["logits", 0, None], [True, 0.5, ["a"]]),
    "size": ([84, (256, 128), None], [0, (32, 0), (1, 2, 3), "84"]),
}


@pytest.mark.parametrize("kind", sorted(KIND_VALUES))
def test_each_kind_takes_its_values_and_refuses_others(kind) -> None:
    from fam_core.models.config_schema import KIND_TYPES, KeySpec, value_problem

    assert kind in KIND_TYPES
    spec = KeySpec("key", kind, REQUIRED if kind == "name" else None, "x", "doc.")
    takes, refuses = KIND_VALUES[kind]
    assert [value_problem(spec, v) for v in takes] == [None] * len(takes)
    assert all(value_problem(spec, v) is not None for v in refuses), kind


@pytest.mark.parametrize(
    "key",  # a mapping's null reads as {} (`factory_kwargs:` with nothing after it)
    [spec.name for spec in KEYS if spec.default is not None and spec.kind != "mapping"],
)
def test_null_is_refused_where_the_default_is_a_value(key, tmp_path) -> None:
    with pytest.raises(ValueError, match=f"{key}"):
        ModelConfig.from_file(write(tmp_path, {**BASE, key: None}))


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"index_search": {"ef": 64}}, "index_search: search parameters need an index"),
        (
            {"index": "g.db", "index_search": {"ef": 0}},
            "index_search: expected names and ints >= 1",
        ),
    ],
)
def test_index_search_needs_an_index_and_positive_ints(keys, message, tmp_path) -> None:
    keys = {**BASE, "task": "embedding", **keys}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_file(write(tmp_path, keys))
