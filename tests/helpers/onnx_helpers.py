"""Helpers of the ONNX tests: a model exported as a user exports it."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn


def user_export(
    model: nn.Module, example: torch.Tensor, path: Path | None = None, **options: object
) -> onnx.ModelProto:
    """``torch.onnx.export`` of ``model`` on ``example`` as a user runs it (TorchScript,
    ``dynamo=False``, its warnings hidden); ``options`` go to ``torch.onnx.export``. The file's
    bytes are written to ``path`` too when one is given.

    >>> proto = user_export(nn.Conv2d(3, 2, 1).eval(), torch.rand(1, 3, 4, 4), input_names=["x"])
    >>> [value.name for value in proto.graph.input]
    ['x']
    """
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buffer, dynamo=False, **options)
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return onnx.load_from_string(buffer.getvalue())
