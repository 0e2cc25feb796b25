"""Optional dependencies, grouped in the extras of the ``fam-core`` distribution.

The base install (torch, numpy, pillow) explains and renders; each
front door that needs more checks for its extra when it is first used and fails with one line
naming the extra to install:

==============  ==========================================================================
extra           for
==============  ==========================================================================
``onnx``        running exported ``.onnx`` files, ``fam inspect`` of ONNX graphs (CPU)
``onnx-gpu``    the same with onnxruntime-gpu (CUDA)
``export``      ``fam export``: exporting models to ONNX (onnxscript for non-linear heads)
``serve``       ``fam serve`` and ``fam serve-demo``: the gRPC server and its metrics
``torchserve``  ``fam archive`` and serving the archives with TorchServe
``kserve``      ``fam serve --engine kserve``: the KServe model server (REST v1/v2, gRPC v2)
``captum``      :mod:`fam_core.captum`, the Captum interop, and LIFT-CAM (Captum's DeepLift)
``eval``        ``fam eval`` (its charts and progress bar), matplotlib colour maps
``bulk``        ``fam bulk``: bulk explanation on Ray Data, Parquet output
``hf``          models built with Hugging Face ``transformers`` (factory modules import it)
``all``         every extra above but ``onnx-gpu``, ``kserve`` and ``hf``
==============  ==========================================================================

Example:
    >>> require("serve", "grpc").__name__
    'grpc'
    >>> require("serve", "no_such_module_xyz")
    Traceback (most recent call last):
    ...
    fam_core.extras.MissingExtraError: the gRPC server needs no_such_module_xyz, which is not installed: pip install 'fam-core[serve]'
"""

from __future__ import annotations

import importlib
from types import ModuleType

PURPOSES: dict[str, str] = {
    "onnx": "running ONNX files",
    "onnx-gpu": "running ONNX files on CUDA",
    "export": "exporting to ONNX",
    "serve": "the gRPC server",
    "torchserve": "building TorchServe archives",
    "kserve": "the KServe model server",
    "captum": "the Captum interop",
    "eval": "the evaluation",
    "bulk": "bulk explanation on Ray",
    "search": "the vector index of explained search",
    "hf": "a Hugging Face transformers model",
}
"""What each extra is for: the start of the error message."""
PACKAGE_EXTRAS: dict[str, str] = {"transformers": "hf"}
"""Packages that user code (a ``factory:`` module) imports, by the extra that installs them."""


class MissingExtraError(ImportError):
    """An optional package is missing; the message names the extra that installs it."""


def require(extra: str, *modules: str) -> ModuleType:
    """Import ``modules`` (the last one is returned); raise :class:`MissingExtraError` naming
    ``pip install 'fam-core[extra]'`` when one of them is not installed.

    An import error raised inside an installed package (a broken install) is not masked.
    """
    if extra not in PURPOSES:
        raise ValueError(f"unknown extra {extra!r}: expected one of {list(PURPOSES)}")
    module = None
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            missing = (error.name or name).split(".")[0]
            if missing != name.split(".")[0]:
                raise  # a package that is installed fails on a missing dependency of its own
            raise MissingExtraError(
                f"{PURPOSES[extra]} needs {missing}, which is not installed: "
                f"pip install 'fam-core[{extra}]'"
            ) from None
    if module is None:
        raise ValueError("require() needs at least one module name")
    return module
