"""``fam archive [--out DIR]``: TorchServe ``.mar`` archives of models, with the FAM handler.

Each archive holds ``handlers/fam_handler.py``, the model's ``config.yaml`` (its file names made
flat, as TorchServe unpacks every file into one folder), its weights or exported program (the
serialized file), its prototypes when it has any, and a TorchServe ``model-config.yaml``
(batching and workers). Built with ``torch-model-archiver``.

A ``factory:`` model carries its module when that is one ``<module>.py`` next to the config;
otherwise the factory's package must be installed in TorchServe's Python, which
:func:`archive_notes` says (``fam archive`` prints it).

``--variant onnx`` archives the exported ONNX graph instead (``<name>-onnx.mar``), exported
while archiving with :func:`fam_core.exporters.export_model`: embedding models with their prototypes
baked in and ``explain="best"`` (the nearest prototype is explained in the same pass),
classifiers with their default method (:func:`fam_core.explainers.default_method.choose_method`: CAM
where CAM reads the head, else Grad-CAM). The same handler serves it: the archive's ``config.yaml``
names the graph (``onnx: model.onnx``) and the pipeline's onnxruntime backend runs it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Literal

from fam_core.extras import require
from fam_core.models.configfile import dump_config
from fam_core.models.sources import factory_module_file, factory_package
from fam_core.models.store import ModelConfig, find_config
from fam_core.package_data import DEFAULT_MODEL_NAMES, HANDLER_FILE, OUTPUT_MODEL_STORE

DEFAULT_OUT = OUTPUT_MODEL_STORE / "archives"
HANDLER = HANDLER_FILE
ARCHIVE_VERSION = "1.0"
ONNX_SUFFIX = "-onnx"
Variant = Literal["torch", "onnx"]
VARIANTS: tuple[Variant, ...] = ("torch", "onnx")


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "archive", help="build TorchServe .mar archives of models with the FAM handler"
    )
    parser.add_argument(
        "models",
        nargs="*",
        metavar="NAME_OR_CONFIG",
        default=list(DEFAULT_MODEL_NAMES),
        help="models to archive (default: " + ", ".join(DEFAULT_MODEL_NAMES) + ")",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"folder (default: {DEFAULT_OUT})")
    parser.add_argument("--batch-size", type=int, default=8, help="TorchServe batchSize (8)")
    parser.add_argument(
        "--max-batch-delay", type=int, default=10, help="TorchServe maxBatchDelay in ms (10)"
    )
    parser.add_argument("--workers", type=int, default=1, help="min and max workers (1)")
    parser.add_argument(
        "--variant",
        choices=(*VARIANTS, "both"),
        default="torch",
        help="torch weights (default), the exported ONNX graph (<name>-onnx.mar), or both",
    )
    parser.add_argument(
        "--onnx", action="store_const", const="onnx", dest="variant", help="same as --variant onnx"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    variants = VARIANTS if args.variant == "both" else (args.variant,)
    for name in args.models:
        for note in archive_notes(ModelConfig.from_file(find_config(name))):
            print(f"fam archive: note: {note}", file=sys.stderr)
        for variant in variants:
            path = build_archive(
                name,
                Path(args.out),
                batch_size=args.batch_size,
                max_batch_delay_ms=args.max_batch_delay,
                workers=args.workers,
                variant=variant,
            )
            print(f"wrote {path}")
    return 0


def model_config_yaml(batch_size: int, max_batch_delay_ms: int, workers: int) -> str:
    """TorchServe's per-model settings (the archive's ``--config-file``).

    Example:
        >>> print(model_config_yaml(4, 10, 1).splitlines()[0])
        minWorkers: 1
    """
    for name, value, low in (
        ("batch size", batch_size, 1),
        ("max batch delay", max_batch_delay_ms, 0),
        ("workers", workers, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return (
        f"minWorkers: {workers}\nmaxWorkers: {workers}\nbatchSize: {batch_size}\n"
        f"maxBatchDelay: {max_batch_delay_ms}\nresponseTimeout: 120\n"
    )


def build_archive(
    name_or_config: str | Path,
    out: Path,
    *,
    batch_size: int = 8,
    max_batch_delay_ms: int = 10,
    workers: int = 1,
    variant: Variant = "torch",
    handler: Path = HANDLER,
    archive_name: str | None = None,
) -> Path:
    """Write ``out/<model name>.mar`` (``<model name>-onnx.mar`` for the ONNX variant).

    ``handler`` is the TorchServe handler file packed (default: ``handlers/fam_handler.py``);
    ``archive_name`` replaces the model name TorchServe serves it under.

    Example:
        >>> build_archive("default-classifier", Path("model-store/archives"))  # doctest: +SKIP
        PosixPath('model-store/archives/default-classifier.mar')
        >>> build_archive("default-classifier", Path("out"), variant="onnx")  # doctest: +SKIP
        PosixPath('out/default-classifier-onnx.mar')
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    require("torchserve", "model_archiver")
    handler = Path(handler)
    if not handler.is_file():
        raise OSError(f"the handler {handler} is missing: run from a source checkout")
    config_path = find_config(name_or_config)
    config = ModelConfig.from_file(config_path)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fam-archive-") as scratch:
        name = archive_name or config.name + (ONNX_SUFFIX if variant == "onnx" else "")
        if variant == "onnx":
            weights, extra = export_onnx_variant(config_path, Path(scratch), name)
        else:
            weights, extra = archive_files(config, Path(scratch))
        settings = Path(scratch) / "model-config.yaml"
        settings.write_text(model_config_yaml(batch_size, max_batch_delay_ms, workers))
        command = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            name,
            "--version",
            ARCHIVE_VERSION,
            *(["--serialized-file", str(weights)] if weights is not None else []),
            "--handler",
            str(handler),
            "--extra-files",
            ",".join(str(path) for path in extra),
            "--config-file",
            str(settings),
            "--export-path",
            str(out),
            "--force",
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise OSError(f"torch-model-archiver failed: {message[-1] if message else done.returncode}")
    return out / f"{name}.mar"


def archive_files(config: ModelConfig, folder: Path) -> tuple[Path | None, list[Path]]:
    """``(serialized file, extra files)`` of the torch variant, with a flat ``config.yaml``
    written into ``folder``. Missing files raise a one-line ``ValueError`` naming the key."""
    if config.source == "onnx":
        serialized: Path | None = config.directory / str(config.onnx)
        key = "onnx"
    elif config.source == "exported_program":
        serialized, key = config.directory / str(config.exported_program), "exported_program"
    else:
        serialized = config.directory / config.weights if config.weights else None
        key = "weights"
    if serialized is not None and not serialized.is_file():
        raise ValueError(f"model {config.name!r}: {key}: file {serialized} does not exist")
    extra: list[Path] = []
    flat: dict[str, str] = {}
    if serialized is not None:
        flat[key] = serialized.name
    if config.prototypes is not None:
        prototypes = config.directory / config.prototypes
        if not prototypes.is_file():
            raise ValueError(f"model {config.name!r}: prototypes: file {prototypes} does not exist")
        extra.append(prototypes)
        flat["prototypes"] = prototypes.name
    if config.factory is not None:
        module = factory_module_file(config.factory, config.directory)
        if module is not None:
            extra.append(module)
    names = [p.name for p in ([serialized] if serialized else []) + extra] + ["config.yaml"]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(
            f"model {config.name!r}: the archive is one folder, and {clashes} name two files"
        )
    written = folder / "config.yaml"
    replace(config, **flat).to_file(written)  # type: ignore[arg-type]
    return serialized, [written, *extra]


def archive_notes(config: ModelConfig) -> list[str]:
    """What the archive cannot carry: the factory's package when it is not a file next to
    the config.

    Example:
        >>> config = ModelConfig(name="m", task="classifier", factory="timm.models:resnet18")
        >>> archive_notes(config)
        ["model 'm': its factory timm.models:resnet18 is not a .py file next to the config: install the package 'timm' in TorchServe's Python"]
    """
    if config.factory is None or factory_module_file(config.factory, config.directory):
        return []
    return [
        f"model {config.name!r}: its factory {config.factory} is not a .py file next to the "
        f"config: install the package {factory_package(config.factory)!r} in TorchServe's Python"
    ]


def export_onnx_variant(config_path: Path, folder: Path, name: str) -> tuple[Path, list[Path]]:
    """Export the model to ``folder/model.onnx`` with a ``config.yaml`` naming it.

    Embedding models get their prototypes baked in with ``explain="best"`` (one pass explains
    the nearest prototype); classifiers get their default method, CAM or Grad-CAM (the top-1
    class). Returns
    ``(graph path, [config path])``.
    """
    from fam_core.exporters import export_model
    from fam_core.models.store import load_model

    model, config = load_model(config_path)
    graph = folder / "model.onnx"
    if config.task == "embedding":
        if config.prototypes is None:
            raise ValueError(
                f"model {config.name!r}: the ONNX variant of an embedding model bakes its "
                "prototypes in; its config has no 'prototypes'"
            )
        export_model(
            model, config, path=graph, references="prototypes", explain="best", task=config.task
        )
    else:
        from fam_core.pipeline.torch_backend import TorchBackend

        method = TorchBackend(model, config).default_method
        export_model(model, config, method=method, path=graph, task=config.task)  # type: ignore[arg-type]
    served_config = folder / "config.yaml"
    served_config.write_text(
        dump_config(
            {
                "name": name,
                "task": config.task,
                "onnx": graph.name,
                "class_names": list(config.class_names),
            }
        )
    )
    return graph, [served_config]
