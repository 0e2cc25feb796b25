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

__all__ = [
    "fixed_batch",
    "image_input",
    "input_channels",
    "load_graph",
    "missing_external_data",
    "resolve_input_size",
]


def load_graph(model: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """``(a copy of the graph, its name)``; weights stored as external data are read from
    the file's folder (``location`` relative to it), and a missing data file is named."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy, model.graph.name or "model"
    if not isinstance(model, str | Path):
        raise TypeError(f"model must be an ONNX file path or onnx.ModelProto, got {type(model)}")
    path = Path(model)
    if not path.is_file():
        raise OSError(f"no such ONNX file: {path}")
    missing = missing_external_data(path)
    if missing:
        raise ValueError(
            f"{path.name} keeps its weights in {missing[0]!r} beside it (external data), "
            f"which is missing: expected {path.parent / missing[0]}"
        )
    try:
        return onnx.load(str(path)), path.stem
    except Exception as error:  # noqa: BLE001 - protobuf and onnx errors share no type
        text = str(error).strip().splitlines()
        raise ValueError(
            f"cannot read {path} as ONNX: {text[0] if text else type(error).__name__}"
        ) from None


def missing_external_data(path: Path) -> list[str]:
    """The external-data files that ``path``'s tensors name and its folder lacks.

    Example:
        >>> missing_external_data(Path("model.onnx"))  # doctest: +SKIP
        ['model.onnx.data']
    """
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the full load
        return []
    locations: dict[str, None] = {}
    constants = [a.t for node in proto.graph.node for a in node.attribute if a.HasField("t")]
    for tensor in (*proto.graph.initializer, *constants):
        if tensor.data_location == TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            locations[entries.get("location", "")] = None
    return [name for name in locations if not (path.parent / name).is_file()]


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


def input_channels(image: onnx.ValueInfoProto) -> int:
    """The channels of an image input ``[B, C, H, W]`` (3 where the graph leaves it open)."""
    extent = image.type.tensor_type.shape.dim[1]
    return int(extent.dim_value) if extent.HasField("dim_value") else 3


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
