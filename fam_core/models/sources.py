"""Build the torch module a model config names: a backbone, a factory or an exported program.

Every failure is a one-line ``ValueError`` that starts with the config key at fault:

>>> from fam_core.models.store import ModelConfig
>>> load_module(ModelConfig(name="m", task="classifier", factory="no_such_pkg.models:build"))
Traceback (most recent call last):
...
ValueError: factory: cannot import module 'no_such_pkg.models' (No module named 'no_such_pkg'): install the package 'no_such_pkg' or put no_such_pkg.py next to the config
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import nn

from fam_core.extras import PACKAGE_EXTRAS
from fam_core.messages import first_line
from fam_core.models.backbones import build_backbone
from fam_core.models.safe_load import load_weights_only


class ModuleSource(Protocol):
    """The keys of a model config that name its torch module
    (:class:`fam_core.models.store.ModelConfig` has them)."""

    @property
    def source(self) -> str: ...

    directory: Path
    backbone: str | None
    backbone_kwargs: dict[str, Any]
    factory: str | None
    factory_kwargs: dict[str, Any]
    exported_program: str | None
    weights: str | None


def load_module(config: ModuleSource) -> nn.Module:
    """The config's module with its weights, in eval mode on the CPU."""
    if config.source == "exported_program":
        return load_exported_program(config.directory / str(config.exported_program))
    model = build_module(config)
    if config.weights:
        load_weights(model, config.directory / config.weights)
    return model.eval()


def build_module(config: ModuleSource) -> nn.Module:
    """The architecture of a ``backbone`` or ``factory`` config, freshly initialised."""
    if config.source == "backbone":
        try:
            return build_backbone(str(config.backbone), **config.backbone_kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"backbone: {first_line(error)}") from None
    if config.source == "factory":
        factory = resolve_factory(str(config.factory), config.directory)
        try:
            model = factory(**config.factory_kwargs)
        except Exception as error:  # noqa: BLE001 - the user's code may raise anything
            raise ValueError(
                f"factory: {config.factory}(**factory_kwargs) raised "
                f"{type(error).__name__}: {first_line(error)}"
            ) from None
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"factory: {config.factory} returned {type(model).__name__}, expected a "
                "torch.nn.Module"
            )
        return model
    raise ValueError(
        f"{config.source}: this source has no torch architecture to build; expected "
        "'backbone' or 'factory'"
    )


def factory_module_file(factory: str, directory: Path) -> Path | None:
    """``<module>.py`` next to the config when the factory's module is a single local file.

    Example:
        >>> factory_module_file("torchvision.models:resnet18", Path(".")) is None
        True
    """
    module = factory.split(":", 1)[0]
    if "." in module:
        return None
    path = directory / f"{module}.py"
    return path if path.is_file() else None


def factory_package(factory: str) -> str:
    """The top-level package a factory's module lives in.

    Example:
        >>> factory_package("timm.models.resnet:resnet50")
        'timm'
    """
    return factory.split(":", 1)[0].split(".", 1)[0]


def resolve_factory(factory: str, directory: Path) -> Callable[..., Any]:
    """The callable ``"package.module:callable"`` names (``<module>.py`` next to the config
    first, then the installed packages)."""
    module_name, _, attribute = factory.partition(":")
    module = _import(module_name, factory_module_file(factory, directory))
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"factory: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(
            f"factory: {factory} is a {type(target).__name__}, expected a callable that "
            "returns a torch.nn.Module"
        )
    return target  # type: ignore[no-any-return]


def _import(module_name: str, local: Path | None) -> ModuleType:
    try:
        if local is None:
            return importlib.import_module(module_name)
        # A file next to the config: imported under a name of its own, so two models whose
        # factories are both ``model.py`` do not clash.
        digest = hashlib.sha1(str(local.resolve()).encode()).hexdigest()[:12]
        unique = f"_fam_factory_{digest}_{module_name}"
        if unique in sys.modules:
            return sys.modules[unique]
        spec = importlib.util.spec_from_file_location(unique, local)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[unique]
            raise
        return module
    except ModuleNotFoundError as error:
        package = module_name.split(".", 1)[0]
        missing = (error.name or "").split(".", 1)[0]
        if missing in PACKAGE_EXTRAS:
            raise ValueError(
                f"factory: module {module_name!r} imports {missing}, which is not installed: "
                f"pip install 'fam-core[{PACKAGE_EXTRAS[missing]}]'"
            ) from None
        raise ValueError(
            f"factory: cannot import module {module_name!r} ({first_line(error)}): install "
            f"the package {package!r} or put {package}.py next to the config"
        ) from None
    except Exception as error:  # noqa: BLE001 - importing user code may raise anything
        raise ValueError(
            f"factory: importing {module_name!r} raised {type(error).__name__}: {first_line(error)}"
        ) from None


def torch_file_kind(path: Path) -> str:
    """``"torchscript"``, ``"exported_program"`` or ``"state"`` (anything else) for a file.

    TorchScript archives hold ``code/`` and ``constants.pkl``; :func:`torch.export.save` files
    hold ``archive_format`` or ``model_weights_config.json`` entries.
    """
    if not zipfile.is_zipfile(path):
        return "state"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(name.endswith("constants.pkl") or "/code/__torch__" in name for name in names):
        return "torchscript"
    if any(name.endswith(("archive_format", "model_weights_config.json")) for name in names):
        return "exported_program"
    return "state"


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` with ``weights_only=True`` (a ``{"state_dict": ...}``
    checkpoint gives its state dict)."""
    if not path.is_file():
        raise ValueError(f"weights: file {path} is missing")
    kind = torch_file_kind(path)
    if kind == "torchscript":
        raise ValueError(
            f"weights: {path} is a TorchScript file; use exported_program: or factory: with a "
            "state dict"
        )
    if kind == "exported_program":
        raise ValueError(
            f"weights: {path} is a torch.export file; name it as exported_program: {path.name}"
        )
    state = load_weights_only(path, "weights")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"weights: {path} holds {type(state).__name__}, expected a state dict "
            "(parameter name -> tensor)"
        )
    return state


def load_weights(model: nn.Module, path: Path) -> None:
    """Load the state dict at ``path`` into ``model`` (strict)."""
    state = load_state(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        details = " ".join(line.strip() for line in str(error).splitlines()[1:] if line.strip())
        raise ValueError(
            f"weights: {path.name} does not match the module: {_shorten(details, 300)}"
        ) from None


def load_exported_program(path: Path) -> nn.Module:
    """The module of a :func:`torch.export.save` file, with its submodules (hookable layers).

    :func:`torch.export.unflatten` restores the module hierarchy, so target layers are found by
    name as in the original model; nothing is unpickled.
    """
    if not path.is_file():
        raise ValueError(f"exported_program: file {path} is missing")
    if torch_file_kind(path) == "torchscript":
        raise ValueError(
            f"exported_program: {path} is a TorchScript file; re-export the model with "
            "torch.export.save"
        )
    register_output_types(path)
    try:
        program = torch.export.load(path)
    except Exception as error:  # noqa: BLE001 - any unreadable file is one config error
        raise ValueError(
            f"exported_program: cannot load {path} with torch.export.load: {first_line(error)}"
        ) from None
    try:
        module = torch.export.unflatten(program)
    except Exception:  # noqa: BLE001 - fall back to the flat module: no layer hooks then
        module = program.module()
    return module.eval()


class ExportedOutput(dict):  # type: ignore[type-arg]
    """Stands for an output type of an exported program that this process has not registered
    (a Hugging Face ``ModelOutput``, a user's dataclass): its fields by name, readable as keys
    or attributes, so ``output: pooler_output`` selects from it as from the original."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


_STAND_INS: dict[str, type] = {}


def register_output_types(path: Path) -> list[str]:
    """Register a stand-in pytree node (:class:`ExportedOutput`) for each type named in the
    input/output specs of the exported program ``path`` that is not registered here.

    :func:`torch.export.save` records a model's output structure by type name (for example
    ``transformers.modeling_outputs.BaseModelOutputWithPooling``); :func:`torch.export.load`
    needs that type registered, i.e. the module defining it imported. A stand-in rebuilds the
    outputs as a mapping of the recorded field names, so nothing is imported from the file.
    Returns the type names it registered.
    """
    import torch.utils._pytree as pytree

    names: set[str] = set()
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.namelist():
                if entry.endswith(".json") and "/models/" in f"/{entry}":
                    _spec_types(json.loads(archive.read(entry)), names)
    except (OSError, ValueError, zipfile.BadZipFile):
        return []  # torch.export.load reports the unreadable file
    registered = []
    for name in sorted(names - set(pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE)):
        stand_in = _STAND_INS.get(name)
        if stand_in is None:
            stand_in = type(name.rsplit(".", 1)[-1], (ExportedOutput,), {"__module__": __name__})
            _STAND_INS[name] = stand_in
        pytree.register_pytree_node(
            stand_in,
            _flatten_fields,
            partial(_unflatten_fields, stand_in),
            serialized_type_name=name,
            flatten_with_keys_fn=_flatten_fields_with_keys,
        )
        registered.append(name)
    return registered


def _spec_types(value: Any, names: set[str]) -> None:
    """Collect the ``type`` names of the serialized tree specs found anywhere in ``value``."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("in_spec", "out_spec") and isinstance(item, str):
                try:
                    _tree_types(json.loads(item), names)
                except ValueError:
                    continue
            else:
                _spec_types(item, names)
    elif isinstance(value, list):
        for item in value:
            _spec_types(item, names)


def _tree_types(spec: Any, names: set[str]) -> None:
    if isinstance(spec, list):  # [protocol, tree]
        for item in spec:
            _tree_types(item, names)
    elif isinstance(spec, dict):
        if isinstance(spec.get("type"), str):
            names.add(spec["type"])
        for child in spec.get("children_spec") or ():
            _tree_types(child, names)


def _flatten_fields(fields: ExportedOutput) -> tuple[list[Any], list[Any]]:
    return list(fields.values()), list(fields.keys())


def _flatten_fields_with_keys(fields: ExportedOutput) -> tuple[list[Any], list[Any]]:
    import torch.utils._pytree as pytree

    return [(pytree.MappingKey(k), v) for k, v in fields.items()], list(fields.keys())


def _unflatten_fields(cls: type, values: Any, context: Any) -> ExportedOutput:
    values = list(values)
    keys = list(context) if isinstance(context, list | tuple) else []
    if len(keys) != len(values) or not all(isinstance(k, str | int) for k in keys):
        keys = list(range(len(values)))  # a context that is not field names: by position
    return cls(zip(keys, values, strict=True))  # type: ignore[no-any-return]


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
