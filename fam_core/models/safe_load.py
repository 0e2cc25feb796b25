"""``torch.load`` with ``weights_only=True`` and one-line errors that never advise otherwise."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch


def load_weights_only(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)``; any failure is one ``ValueError`` line naming
    ``what`` and the file (an empty, truncated or corrupt file, or a pickle of objects other
    than tensors, which is refused and never run)."""
    if path.stat().st_size == 0:
        raise ValueError(f"{what}: {path} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is one config error
        raise ValueError(f"{what}: cannot load {path}: {describe_load_error(error)}") from None


def describe_load_error(error: BaseException) -> str:
    """What went wrong, in one line, without torch's advice to retry with unsafe loading."""
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
        return (
            "it holds Python objects other than tensors, which are refused (only tensors and "
            "state dicts are loaded; nothing is unpickled)"
        )
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    if "central directory" in first or "zip archive" in first:
        return "the file is truncated or corrupt (not a complete torch.save archive)"
    return (first.split(". ")[0])[:200]
