"""Load an ONNX graph and read its image input: the first stage of the graft.

Example:
    >>> from onnx import helper, TensorProto
    >>> value = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 48])
    >>> resolve_input_size(value, None), fixed_batch(value)
    ((32, 48), None)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx
from onnx import TensorProto

__all__ = ["fixed_batch", "image_input", "load_graph", "resolve_input_size"]


def load_graph(model: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy, model.graph.name or "model"
    if not isinstance(model, str | Path):
        raise TypeError(f"model must be an ONNX file path or onnx.ModelProto, got {type(model)}")
    path = Path(model)
    if not path.is_file():
        raise OSError(f"no such ONNX file: {path}")
    return onnx.load(str(path)), path.stem


def image_input(proto: onnx.ModelProto) -> onnx.ValueInfoProto:
    initializers = {tensor.name for tensor in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(
            f"the graph must take one input (images [B, 3, H, W]), it takes {len(inputs)}: "
            f"{[value.name for value in inputs]}"
        )
    value = inputs[0]
    tensor = value.type.tensor_type
    if tensor.elem_type != TensorProto.FLOAT or len(tensor.shape.dim) != 4:
        raise ValueError(f"the graph's input {value.name!r} must be float32 [B, 3, H, W]")
    channels = tensor.shape.dim[1]
    if channels.HasField("dim_value") and channels.dim_value not in (1, 3):
        raise ValueError(
            f"the graph's input {value.name!r} has {channels.dim_value} channels: expected "
            "1 (greyscale) or 3 (RGB)"
        )
    return value


def resolve_input_size(
    value: onnx.ValueInfoProto, input_size: int | Sequence[int] | None
) -> tuple[int, int]:
    dims = value.type.tensor_type.shape.dim
    fixed = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims[2:])
    if input_size is None:
        if None in fixed:
            raise ValueError(
                f"the graph's input {value.name!r} has a dynamic height/width: pass input_size=(H, W)"
            )
        return (int(fixed[0]), int(fixed[1]))  # type: ignore[arg-type]
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"input_size must be a positive int or (H, W), got {input_size!r}")
    for given, extent in zip(size, fixed, strict=True):
        if extent is not None and extent != given:
            raise ValueError(
                f"input_size {size} does not match the graph's fixed input size "
                f"{tuple(fixed)} ({value.name!r})"
            )
    return size  # type: ignore[return-value]


def fixed_batch(value: onnx.ValueInfoProto) -> int | None:
    first = value.type.tensor_type.shape.dim[0]
    return int(first.dim_value) if first.HasField("dim_value") else None
