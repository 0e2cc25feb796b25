"""Where the files that ship with ``fam_core`` lie: a checkout's folders, or the installed copies.

The repository keeps the default models, the ``.proto`` sources, the ONNX exporters and the
TorchServe handler in top-level folders (``model-store/``, ``proto/``, ``exporters/``,
``handlers/``). The wheel installs them inside the package (``[tool.setuptools.package-dir]``
in ``pyproject.toml``) as ``fam_core/model_store``, ``fam_core/proto``, ``fam_core.exporters``
and ``fam_core.handlers``. In a checkout (``PYTHONPATH`` or an editable install) the
repository's folders are used, so edits there take effect without reinstalling.

Example:
    >>> (MODEL_STORE / "default-embedding" / "config.yaml").is_file()
    True
    >>> (PROTO_ROOT / "fam" / "v1" / "fam.proto").is_file()
    True
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_DIR = PACKAGE_DIR.parent
IN_CHECKOUT = (CHECKOUT_DIR / "pyproject.toml").is_file() and (
    CHECKOUT_DIR / "model-store"
).is_dir()
"""Whether ``fam_core`` is imported from a repository checkout (not from an installed wheel)."""


def _folder(checkout_name: str, package_name: str) -> Path:
    return CHECKOUT_DIR / checkout_name if IN_CHECKOUT else PACKAGE_DIR / package_name


MODEL_STORE = _folder("model-store", "model_store")
"""The folder of the default models (:data:`DEFAULT_MODEL_NAMES`)."""
DEFAULT_MODEL_NAMES: tuple[str, ...] = (
    "default-embedding",
    "default-classifier",
    "default-embedding-fine",
    "default-classifier-fine",
)
"""The default models, committed in :data:`MODEL_STORE` and trained by ``fam train NAME``: Conv4
(5x5 target layer at 84x84) and its ``-fine`` Conv4-s8 twins (10x10)."""
PROTO_ROOT = _folder("proto", "proto")
"""The root of the ``.proto`` sources (``fam/v1/fam.proto``, ``inference/grpc_service.proto``);
:mod:`fam_core.protos` finds the same folder."""
HANDLER_FILE = _folder("handlers", "handlers") / "fam_handler.py"
"""The TorchServe handler that ``fam archive`` packs into each ``.mar``."""
OUTPUT_MODEL_STORE = MODEL_STORE if IN_CHECKOUT else Path("model-store")
"""Where ``fam train`` and ``fam archive`` write by default: the checkout's ``model-store/``,
or ``model-store/`` under the working directory for an installed package (never into the
installed package)."""
