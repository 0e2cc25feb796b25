"""``torch.load`` with ``weights_only=True`` and one-line errors that never advise otherwise."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from fam_core.messages import first_line


def load_weights_only(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)``; any failure is one ``ValueError`` line naming
    ``what`` and the file (an empty, truncated or corrupt file, a file of another format, or a
    pickle of objects other than tensors, which is refused and never run)."""
    if path.stat().st_size == 0:
        raise ValueError(f"{what}: {path} is empty")
    kind = file_kind(path)
    if kind is not None:
        raise ValueError(f"{what}: cannot load {path}: {kind}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is one config error
        raise ValueError(f"{what}: cannot load {path}: {describe_load_error(error)}") from None


ZIP_MAGIC = b"PK\x03\x04"
"""The first bytes of a ``torch.save`` archive (a zip file)."""
PICKLE_PROTOCOL_MARK = 0x80
"""The first byte of a pickle of protocol 2 or later (``torch.save``'s legacy format)."""
_KNOWN_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"\x89HDF", "an HDF5 file (Keras or h5py weights)"),
    (b"ONNX", "an ONNX file"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x1f\x8b", "a gzip file"),
    (b"GGUF", "a GGUF file"),
)


def file_kind(path: Path) -> str | None:
    """``None`` for what may be a PyTorch weights file (a zip archive or a pickle), else why
    it is not one, in a few words.

    Example:
        >>> import tempfile
        >>> noise = Path(tempfile.mkdtemp()) / "weights.pt"
        >>> _ = noise.write_bytes(bytes(range(7, 107)))
        >>> file_kind(noise)
        'not a PyTorch weights file (neither a torch.save zip archive nor a pickle)'
    """
    with path.open("rb") as file:
        head = file.read(16)
    if head.startswith(ZIP_MAGIC) or (head and head[0] == PICKLE_PROTOCOL_MARK):
        return None
    for magic, name in _KNOWN_FORMATS:
        if head.startswith(magic):
            return f"not a PyTorch weights file: it is {name}"
    if head[8:9] == b"{":  # an 8-byte little-endian header length, then a JSON header
        return "not a PyTorch weights file: it is a safetensors file"
    return "not a PyTorch weights file (neither a torch.save zip archive nor a pickle)"


def describe_load_error(error: BaseException) -> str:
    """What went wrong, in one line, without torch's advice to retry with unsafe loading."""
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
        return (
            "it holds Python objects other than tensors, which are refused (only tensors and "
            "state dicts are loaded; nothing is unpickled)"
        )
    first = first_line(error)
    if "central directory" in first or "zip archive" in first:
        return "the file is truncated or corrupt (not a complete torch.save archive)"
    return (first.split(". ")[0])[:200]
