"""An ONNX subgraph as a torch ``nn.Module``: one torch function per ONNX operator.

:func:`fam_core.exporters.graft.graft_onnx` explains a foreign ONNX graph whose head (the
part between the target tensor and the output) is not affine: a vision transformer's last
block read through its class token, a LayerNorm, an MLP projector. ONNX has no autograd,
so the head is interpreted here as a torch module, the library's explainers run on it
exactly as on any torch model (``nonlinear_head="jacobian"``: the head's vector-Jacobian
product, :meth:`~fam_core.explainers.base.Explainer.head_jacobian_product`), and the
explanation is exported back to ONNX by the code path of
:func:`fam_core.exporters.export.export_model` (``make_fx`` + the ``torch.export`` exporter).

Initializers and ``Constant`` nodes become buffers. Integer tensors that describe shapes
(``Shape`` outputs, small int64 constants, and what ``Gather`` / ``Concat`` / ``Unsqueeze``
/ ``Slice`` / arithmetic make of them) are kept as Python tuples (:class:`_Ints`), so a
dynamic batch axis stays symbolic while the module is traced. An operator outside
:data:`SUPPORTED_OPS` raises ``ValueError`` naming it.

Example:
    >>> from onnx import helper, TensorProto
    >>> node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], epsilon=1e-5)
    >>> graph = helper.make_graph(
    ...     [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])],
    ...     [helper.make_tensor("g", TensorProto.FLOAT, [3], [1.0] * 3),
    ...      helper.make_tensor("b", TensorProto.FLOAT, [3], [0.0] * 3)])
    >>> module = OnnxModule(helper.make_model(graph))
    >>> module(torch.tensor([[1.0, 2.0, 3.0]])).round(decimals=3)
    tensor([[-1.2250,  0.0000,  1.2250]])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

__all__ = ["SUPPORTED_OPS", "OnnxModule", "unsupported_ops"]

_SMALL_INTS = 64  # int64 constants up to this size are shape values (Python tuples)
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class _Ints:
    """An int64 tensor of rank 0 or 1 held as Python ints (or symbolic sizes)."""

    values: tuple[Any, ...]
    scalar: bool = False

    def tensor(self) -> torch.Tensor:
        data = torch.tensor([int(v) for v in self.values], dtype=torch.long)
        return data.reshape(()) if self.scalar else data


def _ints(value: object) -> tuple[Any, ...]:
    if isinstance(value, _Ints):
        return value.values
    if isinstance(value, list | tuple):
        return tuple(value)
    if isinstance(value, torch.Tensor):
        return tuple(int(v) for v in value.reshape(-1).tolist())
    raise TypeError(f"expected integers, got {type(value).__name__}")


def _tensor(value: object) -> torch.Tensor:
    return value.tensor() if isinstance(value, _Ints) else value  # type: ignore[return-value]


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attribute in node.attribute:
        value = onnx.helper.get_attribute_value(attribute)
        if isinstance(value, bytes):
            value = value.decode()
        out[attribute.name] = value
    return out


def _as_value(array: np.ndarray) -> torch.Tensor | _Ints:
    if array.dtype == np.int64 and array.ndim <= 1 and array.size <= _SMALL_INTS:
        return _Ints(tuple(int(v) for v in array.reshape(-1)), scalar=array.ndim == 0)
    return torch.from_numpy(array.copy())


_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.long,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.BOOL: torch.bool,
}


def _axes(node_inputs: list[Any], attributes: dict[str, Any], position: int) -> list[int] | None:
    """Axes from the input at ``position`` (newer opsets) or the ``axes`` attribute."""
    if len(node_inputs) > position and node_inputs[position] is not None:
        return list(_ints(node_inputs[position]))
    axes = attributes.get("axes")
    return None if axes is None else list(axes)


def _broadcast(a: tuple[Any, ...], b: tuple[Any, ...]) -> tuple[Any, ...]:
    """NumPy broadcasting of two shapes (sizes may be symbolic)."""
    length = max(len(a), len(b))
    a = (1,) * (length - len(a)) + tuple(a)
    b = (1,) * (length - len(b)) + tuple(b)
    return tuple(y if isinstance(x, int) and x == 1 else x for x, y in zip(a, b, strict=True))


def _int_binary(function: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    def apply(a: object, b: object, **_: object) -> object:
        if isinstance(a, _Ints) and isinstance(b, _Ints):
            left, right = a.values, b.values
            if len(left) == 1 and len(right) != 1:
                left = left * len(right)
            if len(right) == 1 and len(left) != 1:
                right = right * len(left)
            return _Ints(
                tuple(function(x, y) for x, y in zip(left, right, strict=True)),
                a.scalar and b.scalar,
            )
        return None

    return apply


def _binary(tensor_op: Callable[..., torch.Tensor], int_op: Callable[[Any, Any], Any]):
    on_ints = _int_binary(int_op)

    def apply(a: object, b: object, **_: object) -> object:
        result = on_ints(a, b)
        if result is not None:
            return result
        x, y = _tensor(a), _tensor(b)
        return tensor_op(x, y)

    return apply


def _int_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    a = a.transpose(0, 1) if transA else a
    b = b.transpose(0, 1) if transB else b
    out = alpha * (a @ b)
    return out if c is None else out + beta * _tensor(c)


def _layer_norm(x, scale, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1):
    axis = axis % x.dim()
    return F.layer_norm(x, tuple(x.shape[axis:]), scale, bias, epsilon)


def _softmax(x, *, axis=-1):
    return torch.softmax(x, dim=axis)


def _reduce(function: Callable[..., torch.Tensor]):
    def apply(x, axes=None, *, keepdims=1, noop_with_empty_axes=0, **attributes):
        chosen = _axes([x, axes], attributes, 1)
        if not chosen:
            if noop_with_empty_axes:
                return x
            chosen = list(range(x.dim()))
        return function(x, dim=chosen, keepdim=bool(keepdims))

    return apply


def _transpose(x, *, perm=None):
    if isinstance(x, _Ints):
        return x
    return x.permute(*(perm if perm is not None else reversed(range(x.dim()))))


def _reshape(x, shape, *, allowzero=0):
    sizes = list(_ints(shape))
    if not allowzero:
        sizes = [x.shape[i] if isinstance(s, int) and s == 0 else s for i, s in enumerate(sizes)]
    if isinstance(x, _Ints):
        return _Ints(x.values, scalar=len(sizes) == 0)
    return x.reshape(sizes)


def _flatten(x, *, axis=1):
    axis = axis % x.dim() if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]) if axis else 1, -1)


def _gather(data, indices, *, axis=0):
    if isinstance(data, _Ints):
        positions = _ints(indices)
        chosen = tuple(data.values[p] for p in positions)
        return _Ints(chosen, scalar=isinstance(indices, _Ints) and indices.scalar)
    axis = axis % data.dim()
    if isinstance(indices, _Ints):
        positions = [p + data.shape[axis] if p < 0 else p for p in indices.values]
        if indices.scalar:
            return data.select(axis, positions[0])
        index = torch.tensor(positions, dtype=torch.long, device=data.device)
    else:
        index = torch.where(indices < 0, indices + data.shape[axis], indices)
    picked = data.index_select(axis, index.reshape(-1))
    return picked.reshape(*data.shape[:axis], *index.shape, *data.shape[axis + 1 :])


def _slice(data, starts, ends, axes=None, steps=None, **_):
    begin, end = list(_ints(starts)), list(_ints(ends))
    rank = len(data.values) if isinstance(data, _Ints) else data.dim()
    axis_list = list(_ints(axes)) if axes is not None else list(range(len(begin)))
    step_list = list(_ints(steps)) if steps is not None else [1] * len(begin)
    if isinstance(data, _Ints):
        (start,), (stop,), (step,) = begin, end, step_list
        stop = None if stop >= _INT64_MAX // 2 else stop
        return _Ints(data.values[slice(start, stop, step)])
    index: list[slice] = [slice(None)] * rank
    for start, stop, axis, step in zip(begin, end, axis_list, step_list, strict=True):
        if step <= 0:
            raise ValueError("Slice with a negative step is not supported")
        stop = None if stop >= _INT64_MAX // 2 else stop
        index[axis % rank] = slice(start, stop, step)
    return data[tuple(index)]


def _concat(*values, axis=0):
    if all(isinstance(v, _Ints) for v in values):
        return _Ints(tuple(x for v in values for x in v.values))
    return torch.cat([_tensor(v) for v in values], dim=axis)


def _split(x, split=None, *, axis=0, num_outputs=None, _count=1):
    sizes = list(_ints(split)) if split is not None else None
    if sizes is None:
        parts = num_outputs or _count
        extent = x.shape[axis]
        size = -(-extent // parts)
        sizes = [size] * (parts - 1) + [extent - size * (parts - 1)]
    return tuple(torch.split(x, sizes, dim=axis))


def _squeeze(x, axes=None, **attributes):
    chosen = _axes([x, axes], attributes, 1)
    if isinstance(x, _Ints):
        return _Ints(x.values, scalar=True)
    if chosen is None:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in chosen), reverse=True):
        x = x.squeeze(axis)
    return x


def _unsqueeze(x, axes=None, **attributes):
    chosen = _axes([x, axes], attributes, 1) or []
    if isinstance(x, _Ints):
        return _Ints(x.values, scalar=False)
    rank = x.dim() + len(chosen)
    for axis in sorted(a % rank for a in chosen):
        x = x.unsqueeze(axis)
    return x


def _shape(x, *, start=0, end=None):
    if isinstance(x, _Ints):
        sizes: tuple[Any, ...] = () if x.scalar else (len(x.values),)
    else:
        sizes = tuple(x.shape)
    return _Ints(sizes[start:end])


def _cast(x, *, to, saturate=1):
    dtype = _DTYPES.get(to)
    if dtype is None:
        raise ValueError(f"Cast to ONNX type {to} is not supported")
    if isinstance(x, _Ints) and dtype in (torch.long, torch.int32):
        return x
    return _tensor(x).to(dtype)


def _where(condition, a, b):
    if all(isinstance(v, _Ints) for v in (condition, a, b)):
        n = max(len(condition.values), len(a.values), len(b.values))

        def at(v: _Ints, i: int) -> Any:
            return v.values[0] if len(v.values) == 1 else v.values[i]

        return _Ints(tuple(at(a, i) if at(condition, i) else at(b, i) for i in range(n)))
    return torch.where(_tensor(condition).bool(), _tensor(a), _tensor(b))


def _expand(x, shape):
    x = _tensor(x)
    return x.expand(*_broadcast(tuple(x.shape), _ints(shape)))


def _constant_of_shape(shape, *, value=None):
    fill = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    sizes = _ints(shape)
    small = len(sizes) == 1 and isinstance(sizes[0], int) and sizes[0] <= _SMALL_INTS
    if fill.dtype == np.int64 and small:
        return _Ints((int(fill.reshape(-1)[0]),) * sizes[0])
    return torch.full(tuple(sizes), fill.reshape(-1)[0].item(), dtype=torch.from_numpy(fill).dtype)


def _constant(**attributes):
    if "value" in attributes:
        return _as_value(numpy_helper.to_array(attributes["value"]))
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attributes:
            return _as_value(np.array(attributes[key], dtype=dtype))
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attributes:
            return _as_value(np.array(attributes[key], dtype=dtype))
    raise ValueError(f"Constant with attributes {sorted(attributes)} is not supported")


def _clip(x, low=None, high=None, **_):
    return torch.clamp(
        x, None if low is None else _tensor(low), None if high is None else _tensor(high)
    )


def _gelu(x, *, approximate="none"):
    return F.gelu(x, approximate=approximate)


def _conv(x, weight, bias=None, *, dilations=None, group=1, pads=None, strides=None, **_):
    rank = weight.dim() - 2
    pads = pads or [0] * (2 * rank)
    if pads[:rank] != pads[rank:]:
        raise ValueError("Conv with asymmetric padding is not supported")
    function = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    return function(x, weight, bias, strides or 1, pads[:rank], dilations or 1, group)


def _batch_norm(x, scale, bias, mean, var, *, epsilon=1e-5, **_):
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, epsilon)


def _global_average_pool(x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _unary(function: Callable[[torch.Tensor], torch.Tensor]):
    def apply(x, **_):
        return function(_tensor(x))

    return apply


def _compare(function: Callable[[Any, Any], Any], tensor_op: Callable[..., torch.Tensor]):
    return _binary(tensor_op, lambda a, b: int(bool(function(a, b))))


_OPS: dict[str, Callable[..., Any]] = {
    "Abs": _unary(torch.abs),
    "Add": _binary(torch.add, lambda a, b: a + b),
    "BatchNormalization": _batch_norm,
    "Cast": _cast,
    "Clip": _clip,
    "Concat": _concat,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Conv": _conv,
    "Div": _binary(_int_div, lambda a, b: int(a / b) if isinstance(a, int) else a // b),
    "Dropout": lambda x, *_, **__: x,
    "Equal": _compare(lambda a, b: a == b, torch.eq),
    "Erf": _unary(torch.erf),
    "Exp": _unary(torch.exp),
    "Expand": _expand,
    "Flatten": _flatten,
    "Gather": _gather,
    "Gelu": _gelu,
    "Gemm": _gemm,
    "GlobalAveragePool": _global_average_pool,
    "Greater": _compare(lambda a, b: a > b, torch.gt),
    "Identity": lambda x: x,
    "LayerNormalization": _layer_norm,
    "Less": _compare(lambda a, b: a < b, torch.lt),
    "Log": _unary(torch.log),
    "MatMul": lambda a, b: torch.matmul(_tensor(a), _tensor(b)),
    "Max": lambda *xs: torch.stack(torch.broadcast_tensors(*xs)).amax(0),
    "Min": lambda *xs: torch.stack(torch.broadcast_tensors(*xs)).amin(0),
    "Mul": _binary(torch.mul, lambda a, b: a * b),
    "Neg": _unary(torch.neg),
    "Not": _unary(torch.logical_not),
    "Pow": lambda a, b: torch.pow(_tensor(a), _tensor(b)),
    "Reciprocal": _unary(torch.reciprocal),
    "ReduceMax": _reduce(torch.amax),
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "Relu": _unary(torch.relu),
    "Reshape": _reshape,
    "Shape": _shape,
    "Sigmoid": _unary(torch.sigmoid),
    "Slice": _slice,
    "Softmax": _softmax,
    "Split": _split,
    "Sqrt": _unary(torch.sqrt),
    "Squeeze": _squeeze,
    "Sub": _binary(torch.sub, lambda a, b: a - b),
    "Tanh": _unary(torch.tanh),
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
    "Where": _where,
}
SUPPORTED_OPS: tuple[str, ...] = tuple(sorted(_OPS))
"""The ONNX operators (default domain) a head may use."""


def unsupported_ops(proto: onnx.ModelProto) -> list[str]:
    """The operators of ``proto``'s graph that :class:`OnnxModule` cannot run, in order.

    Example:
        >>> from onnx import helper
        >>> graph = helper.make_graph([helper.make_node("Einsum", ["x"], ["y"])], "g", [], [])
        >>> unsupported_ops(helper.make_model(graph))
        ['Einsum']
    """
    found = [
        node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        for node in proto.graph.node
        if node.domain not in ("", "ai.onnx") or node.op_type not in _OPS
    ]
    return list(dict.fromkeys(found))


class OnnxModule(nn.Module):
    """A one-input, one-output ONNX graph run by torch operators (module docstring).

    Raises ``ValueError`` naming the operators it cannot run.
    """

    def __init__(self, proto: onnx.ModelProto) -> None:
        super().__init__()
        missing = unsupported_ops(proto)
        if missing:
            raise ValueError(
                f"the head uses the ONNX operator{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)}, which the graft cannot interpret in torch; "
                f"supported: {', '.join(SUPPORTED_OPS)}"
            )
        graph = proto.graph
        initializers = {tensor.name for tensor in graph.initializer}
        inputs = [value.name for value in graph.input if value.name not in initializers]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ValueError("the head must have one input and one output")
        self.input_name, self.output_name = inputs[0], graph.output[0].name
        self.nodes = [
            (node.op_type, list(node.input), list(node.output), _attributes(node))
            for node in graph.node
        ]
        self._constants: dict[str, _Ints] = {}
        self._buffers_by_value: dict[str, str] = {}
        for position, tensor in enumerate(graph.initializer):
            self._store(f"initializer_{position}", tensor.name, numpy_helper.to_array(tensor))
        self.linears = nn.ModuleDict(self._linear_layers(graph))

    def _linear_layers(self, graph: onnx.GraphProto) -> dict[str, nn.Linear]:
        """``MatMul(x, W)`` with a constant 2-D ``W`` as an ``nn.Linear`` (no bias), keyed by
        the node's position: a layer :mod:`fam_core.head_rows` can run on the token rows
        that reach the output only (a class token's last block), as on a torch model."""
        weights = {tensor.name: tensor for tensor in graph.initializer}
        layers: dict[str, nn.Linear] = {}
        for position, node in enumerate(graph.node):
            weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
            if (
                weight is None
                or len(weight.dims) != 2
                or weight.data_type != onnx.TensorProto.FLOAT
            ):
                continue
            matrix = torch.from_numpy(numpy_helper.to_array(weight).copy())  # [C, F]
            layer = nn.Linear(matrix.shape[0], matrix.shape[1], bias=False)
            with torch.no_grad():
                layer.weight.copy_(matrix.T)
            layer.requires_grad_(False)
            layers[str(position)] = layer
        return layers

    def _store(self, key: str, name: str, array: np.ndarray) -> None:
        value = _as_value(array)
        if isinstance(value, _Ints):
            self._constants[name] = value
        else:
            self.register_buffer(key, value)
            self._buffers_by_value[name] = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, Any] = dict(self._constants)
        values.update({name: getattr(self, key) for name, key in self._buffers_by_value.items()})
        values[self.input_name] = x
        for position, (op_type, inputs, outputs, attributes) in enumerate(self.nodes):
            if str(position) in self.linears:
                values[outputs[0]] = self.linears[str(position)](_tensor(values[inputs[0]]))
                continue
            arguments = [values[name] if name else None for name in inputs]
            while arguments and arguments[-1] is None:
                arguments.pop()
            options = dict(attributes)
            if op_type == "Split":
                options["_count"] = len(outputs)
            result = _OPS[op_type](*arguments, **options)
            results = result if isinstance(result, tuple) else (result,)
            for name, value in zip(outputs, results, strict=False):
                if name:
                    values[name] = value
        out = values[self.output_name]
        return _tensor(out)
