"""An ONNX subgraph as a torch ``nn.Module``: one torch function per ONNX operator.

:func:`fam_core.exporters.graft.graft_onnx` explains a foreign ONNX graph whose head (the
part between the target tensor and the output) is not affine: a vision transformer's last
block read through its class token, a LayerNorm, an MLP projector. ONNX has no autograd,
so the head is interpreted here as a torch module, the library's explainers run on it
exactly as on any torch model (``nonlinear_head="jacobian"``: the head's vector-Jacobian
product, :meth:`~fam_core.explainers.base.Explainer.head_jacobian_product`), and the
explanation is exported back to ONNX by the code path of
:func:`fam_core.exporters.export.export_model` (``make_fx`` + the ``torch.export`` exporter).

Initializers and ``Constant`` nodes become buffers, and so do the values that nodes compute
from constants alone (folded once by onnx's reference implementation). Integer tensors that
describe shapes (``Shape`` outputs, small int64 constants, and what ``Gather`` / ``Concat`` /
``Unsqueeze`` / ``Slice`` / arithmetic make of them) are kept as Python tuples
(:class:`_Ints`), so a dynamic batch axis stays symbolic while the module is traced. An
operator outside :data:`SUPPORTED_OPS` raises ``ValueError`` naming it; a form of a supported
operator that is not interpreted (MaxPool's ``Indices``, Resize's ``tf_crop_and_resize`` or
``antialias`` when downsampling, blocked quantization) raises ``ValueError`` naming the form
when the module runs.

Operators keep the semantics of their opset: attributes before inputs (Clip's ``min`` /
``max`` and Pad's ``pads`` before opset 11, Upsample's ``scales`` in opset 7), Softmax and
LogSoftmax on a 2-D view before opset 13, Resize's inputs and its "simple" nearest rounding
before opset 11. Pooling, Pad and Resize follow onnxruntime to the sample (``ceil_mode``,
``auto_pad``, ``count_include_pad``, each coordinate transformation and nearest mode).

Quantization: a quantized tensor is held as a float tensor of its integer values.
``QuantizeLinear`` computes them exactly (round half to even, saturated to uint8 / int8) but
lets the gradient pass straight through (the straight-through estimator: the gradient of
``x / scale + zero_point``), so ``DequantizeLinear(QuantizeLinear(x))`` has the identity as
its gradient and the explainers see through a QDQ model; ``DynamicQuantizeLinear`` does the
same with its scale and zero point held constant. ``MatMulInteger`` / ``ConvInteger`` are
exact (float64 sums of integers), int32 on integer tensors.

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
from collections.abc import Callable, Container
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
    if array.dtype in (np.int64, np.int32) and array.ndim <= 1 and array.size <= _SMALL_INTS:
        return _Ints(tuple(int(v) for v in array.reshape(-1)), scalar=array.ndim == 0)
    return torch.from_numpy(array.copy())


_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.long,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
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


def _reduce(function: Callable[..., torch.Tensor]):
    def apply(x, axes=None, *, keepdims=1, noop_with_empty_axes=0, **attributes):
        x = _tensor(x)
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


def _constant_array(**attributes) -> np.ndarray:
    if "value" in attributes:
        return numpy_helper.to_array(attributes["value"])
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attributes:
            return np.array(attributes[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attributes:
            return np.array(attributes[key], dtype=dtype)
    raise ValueError(f"Constant with attributes {sorted(attributes)} is not supported")


def _constant(**attributes):
    return _as_value(_constant_array(**attributes))


def _gelu(x, *, approximate="none"):
    return F.gelu(x, approximate=approximate)


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


def _softmax_family(function: Callable[..., torch.Tensor]):
    """Softmax-like ops: opset 13 works on one axis (default -1); older opsets flatten the
    input to 2-D at ``axis`` (default 1) and work on the second dimension."""

    def apply(x, *, axis=None, _opset=13):
        x = _tensor(x)
        if _opset >= 13:
            return function(x, dim=-1 if axis is None else axis)
        axis = (1 if axis is None else axis) % max(x.dim(), 1)
        return function(x.flatten(axis), dim=-1).reshape(x.shape)

    return apply


def _clip(x, low=None, high=None, **attributes):
    """Clip: bounds are the ``min`` / ``max`` attributes before opset 11, inputs from 11."""
    low = attributes.get("min") if low is None else low
    high = attributes.get("max") if high is None else high
    if isinstance(x, _Ints) and all(v is None or isinstance(v, _Ints) for v in (low, high)):
        lowest = None if low is None else low.values[0]
        highest = None if high is None else high.values[0]
        clipped = (v if lowest is None else max(v, lowest) for v in x.values)
        return _Ints(tuple(v if highest is None else min(v, highest) for v in clipped), x.scalar)
    if low is None and high is None:
        return x
    return torch.clamp(
        _tensor(x), None if low is None else _tensor(low), None if high is None else _tensor(high)
    )


def _hard_sigmoid(x, *, alpha=0.2, beta=0.5):
    return torch.clamp(alpha * _tensor(x) + beta, 0.0, 1.0)


def _prelu(x, slope):
    """``slope`` broadcasts to ``x`` as NumPy does ([C, 1, 1] per channel of NCHW, a scalar)."""
    x = _tensor(x)
    return torch.where(x < 0, x * _tensor(slope), x)


def _selu(x, *, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875):
    return gamma * F.elu(_tensor(x), alpha)  # elu keeps exp's overflow out of the gradient


def _thresholded_relu(x, *, alpha=1.0):
    x = _tensor(x)
    return torch.where(x > alpha, x, torch.zeros_like(x))


def _sum(*values):
    tensors = [_tensor(v) for v in values]
    total = tensors[0]
    for tensor in tensors[1:]:
        total = total + tensor
    return total


def _mean(*values):
    return _sum(*(_tensor(v) for v in values)) / len(values)


def _einsum(*operands, equation):
    return torch.einsum(equation.replace(" ", ""), *(_tensor(v) for v in operands))


def _reduce_prod(x, dim, keepdim):
    for axis in sorted((a % x.dim() for a in dim), reverse=True):
        x = x.prod(axis, keepdim=keepdim)
    return x


def _lp_normalization(x, *, axis=-1, p=2):
    x = _tensor(x)
    norm = torch.linalg.vector_norm(x, ord=p, dim=axis, keepdim=True)
    return x / torch.where(norm == 0, torch.ones_like(norm), norm)  # a zero vector stays zero


def _instance_norm(x, scale, bias, *, epsilon=1e-5):
    return F.instance_norm(_tensor(x), weight=scale, bias=bias, eps=epsilon)


# Windows (pooling, convolution) -------------------------------------------------------------


@dataclass(frozen=True)
class _Windows:
    """Where a sliding window runs on each spatial axis: ``lengths`` outputs over the input
    padded by ``begin`` / ``end``, and ``extra`` past the end for ``ceil_mode``'s last window."""

    lengths: tuple[int, ...]
    begin: tuple[int, ...]
    end: tuple[int, ...]
    extra: tuple[int, ...]

    def torch_pads(self, padding: bool = True, extra: bool = True) -> list[int]:
        """``F.pad``'s list: (begin, end) per axis, the last axis first."""
        pairs = [
            (b if padding else 0, (e if padding else 0) + (x if extra else 0))
            for b, e, x in zip(self.begin, self.end, self.extra, strict=True)
        ]
        return [amount for pair in reversed(pairs) for amount in pair]

    def crop(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` (batch, channels, spatial...) cut to the window counts."""
        for axis, length in enumerate(self.lengths):
            y = y.narrow(axis + 2, 0, length)
        return y


def _windows(
    spatial: tuple[int, ...],
    kernel: list[int],
    strides: list[int] | None = None,
    dilations: list[int] | None = None,
    pads: list[int] | None = None,
    auto_pad: str = "NOTSET",
    ceil_mode: int = 0,
) -> _Windows:
    """The ONNX output size and padding of a window op (``pads``: the begins, then the ends)."""
    rank = len(kernel)
    strides = list(strides or [1] * rank)
    dilations = list(dilations or [1] * rank)
    pads = list(pads or [0] * (2 * rank))
    lengths, begins, ends, extras = [], [], [], []
    for axis, size in enumerate(spatial):
        stride, extent = strides[axis], (kernel[axis] - 1) * dilations[axis] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            length = -(-size // stride)
            total = max(0, (length - 1) * stride + extent - size)
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            end = total - begin
        elif auto_pad == "VALID":
            begin = end = 0
            length = (size - extent) // stride + 1
        elif auto_pad in ("NOTSET", ""):
            begin, end = pads[axis], pads[axis + rank]
            span = size + begin + end - extent
            if ceil_mode:
                length = -(-span // stride) + 1
                if (length - 1) * stride >= size + begin:  # no window starts in the end padding
                    length -= 1
            else:
                length = span // stride + 1
        else:
            raise ValueError(
                f"auto_pad {auto_pad!r} is not one of NOTSET, SAME_UPPER, SAME_LOWER, VALID"
            )
        lengths.append(length)
        begins.append(begin)
        ends.append(end)
        extras.append(max(0, (length - 1) * stride + extent - (size + begin + end)))
    return _Windows(tuple(lengths), tuple(begins), tuple(ends), tuple(extras))


def _window_sum(x, kernel, strides, dilations):
    """Each window's sum (no padding): a depthwise convolution with ones."""
    rank = len(kernel)
    ones = torch.ones((x.shape[1], 1, *kernel), dtype=x.dtype, device=x.device)
    function = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    return function(x, ones, None, strides or 1, 0, dilations or 1, x.shape[1])


# _max_pool and _average_pool list the same keywords on purpose: they are the ONNX operators'
# attribute names, which the interpreter passes by name.
def _max_pool(
    x,
    *,
    kernel_shape,
    strides=None,
    pads=None,
    dilations=None,
    auto_pad="NOTSET",
    ceil_mode=0,
    storage_order=0,
    _count=1,
):
    if _count > 1:
        raise ValueError("MaxPool's Indices output is not supported")
    x = _tensor(x)
    windows = _windows(
        tuple(x.shape[2:]), kernel_shape, strides, dilations, pads, auto_pad, ceil_mode
    )
    padded = F.pad(x, windows.torch_pads(), value=-math.inf)
    function = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(kernel_shape) - 1]
    return windows.crop(function(padded, kernel_shape, strides or 1, 0, dilations or 1))


def _average_pool(
    x,
    *,
    kernel_shape,
    strides=None,
    pads=None,
    dilations=None,
    auto_pad="NOTSET",
    ceil_mode=0,
    count_include_pad=0,
):
    """Window sums over window counts: the count leaves out what ``ceil_mode`` adds past the
    padding, and the padding itself unless ``count_include_pad``."""
    x = _tensor(x)
    spatial = tuple(x.shape[2:])
    windows = _windows(spatial, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
    sums = _window_sum(F.pad(x, windows.torch_pads()), kernel_shape, strides, dilations)
    inside = torch.ones((1, 1, *spatial), dtype=x.dtype, device=x.device)
    if count_include_pad:
        inside = F.pad(inside, windows.torch_pads(extra=False), value=1.0)
        inside = F.pad(inside, windows.torch_pads(padding=False))
    else:
        inside = F.pad(inside, windows.torch_pads())
    counts = _window_sum(inside, kernel_shape, strides, dilations)
    return windows.crop(sums / counts)


def _lp_pool(
    x, *, kernel_shape, strides=None, pads=None, dilations=None, auto_pad="NOTSET", ceil_mode=0, p=2
):
    x = _tensor(x)
    windows = _windows(
        tuple(x.shape[2:]), kernel_shape, strides, dilations, pads, auto_pad, ceil_mode
    )
    powers = F.pad(x.abs() ** p, windows.torch_pads())
    return windows.crop(_window_sum(powers, kernel_shape, strides, dilations) ** (1.0 / p))


def _global_max_pool(x):
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


def _global_lp_pool(x, *, p=2):
    return torch.linalg.vector_norm(x, ord=p, dim=tuple(range(2, x.dim())), keepdim=True)


def _conv(
    x,
    weight,
    bias=None,
    *,
    dilations=None,
    group=1,
    pads=None,
    strides=None,
    auto_pad="NOTSET",
    kernel_shape=None,
):
    x = _tensor(x)
    rank = weight.dim() - 2
    function = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    pads = list(pads or [0] * (2 * rank))
    if auto_pad in ("NOTSET", "") and pads[:rank] == pads[rank:]:
        return function(x, weight, bias, strides or 1, pads[:rank], dilations or 1, group)
    kernel = list(weight.shape[2:])
    windows = _windows(tuple(x.shape[2:]), kernel, strides, dilations, pads, auto_pad)
    padded = F.pad(x, windows.torch_pads())
    return windows.crop(function(padded, weight, bias, strides or 1, 0, dilations or 1, group))


# Pad, Resize, Upsample ----------------------------------------------------------------------


def _pad_positions(size: int, begin: int, end: int, mode: str) -> list[int]:
    """The source index of each position of an axis padded by ``mode`` (edge, reflect, wrap)."""
    positions = []
    for i in range(-begin, size + end):
        if mode == "edge":
            positions.append(min(max(i, 0), size - 1))
        elif mode == "wrap":
            positions.append(i % size)
        elif mode == "reflect":
            period = max(2 * (size - 1), 1)
            i %= period
            positions.append(period - i if i >= size else i)
        else:
            raise ValueError(f"Pad mode {mode!r} is not one of constant, reflect, edge, wrap")
    return positions


def _pad(x, pads=None, constant_value=None, axes=None, *, mode="constant", value=0.0):
    """Pad: ``pads`` / ``value`` are attributes before opset 11, inputs from 11; ``axes``
    (opset 18) names the axes ``pads`` covers."""
    x = _tensor(x)
    rank = x.dim()
    amounts = list(_ints(pads))
    chosen = list(range(rank)) if axes is None else [a % rank for a in _ints(axes)]
    count = len(chosen)
    begin = {axis: amounts[i] for i, axis in enumerate(chosen)}
    end = {axis: amounts[count + i] for i, axis in enumerate(chosen)}
    if mode == "constant":
        torch_pads = [
            a for axis in reversed(range(rank)) for a in (begin.get(axis, 0), end.get(axis, 0))
        ]
        fill = value if constant_value is None else _tensor(constant_value)
        if not isinstance(fill, torch.Tensor):
            return F.pad(x, torch_pads, value=float(fill))
        inside = F.pad(torch.ones_like(x), torch_pads) > 0.5
        return torch.where(inside, F.pad(x, torch_pads), fill.to(x.dtype))
    for axis in chosen:
        if begin[axis] or end[axis]:
            index = _pad_positions(x.shape[axis], begin[axis], end[axis], mode)
            x = x.index_select(axis, torch.tensor(index, dtype=torch.long, device=x.device))
    return x


def _source_coordinates(length: int, size: int, scale: float, mode: str) -> np.ndarray:
    """Where each of ``length`` outputs samples an axis of ``size`` inputs, as onnxruntime
    computes it (float32)."""
    out = np.arange(length, dtype=np.float32)
    scale, half = np.float32(scale), np.float32(0.5)
    if mode == "half_pixel":
        return (out + half) / scale - half
    if mode == "pytorch_half_pixel":
        return (out + half) / scale - half if length > 1 else np.zeros_like(out)
    if mode == "asymmetric":
        return out / scale
    if mode == "align_corners":
        if length == 1:
            return np.zeros_like(out)
        return out * np.float32(size - 1) / np.float32(length - 1)
    if mode == "tf_half_pixel_for_nn":
        return (out + half) / scale
    if mode == "half_pixel_symmetric":
        adjustment = np.float32(length) / (scale * np.float32(size))
        offset = np.float32(size) / np.float32(2) * (np.float32(1) - adjustment)
        return offset + (out + half) / scale - half
    raise ValueError(
        f"Resize coordinate_transformation_mode {mode!r} is not supported (half_pixel, "
        "pytorch_half_pixel, asymmetric, align_corners, tf_half_pixel_for_nn, half_pixel_symmetric)"
    )


def _nearest_positions(
    coordinates: np.ndarray, size: int, rule: str, downsampling: bool
) -> list[int]:
    floor = np.floor(coordinates)
    away = np.sign(coordinates) * np.floor(np.abs(coordinates) + 0.5)  # std::round
    tie = coordinates == floor + 0.5
    if rule == "round_prefer_floor":
        picked = np.where(tie, floor, away)
    elif rule == "round_prefer_ceil":
        picked = np.where(tie, np.ceil(coordinates), away)
    elif rule == "floor":
        picked = floor
    elif rule == "ceil":
        picked = np.ceil(coordinates)
    elif rule == "simple":  # Upsample and Resize before opset 11
        picked = np.ceil(coordinates) if downsampling else np.trunc(coordinates)
    else:
        raise ValueError(
            f"Resize nearest_mode {rule!r} is not one of round_prefer_floor, round_prefer_ceil, floor, ceil"
        )
    return [int(v) for v in np.clip(picked, 0, size - 1)]


def _linear_weights(coordinates: np.ndarray, size: int) -> np.ndarray:
    """[outputs, inputs]: each output between its two nearest inputs (edges clamped)."""
    weights = np.zeros((len(coordinates), size), dtype=np.float32)
    clamped = np.clip(coordinates, np.float32(0), np.float32(size - 1))
    for row, at in enumerate(clamped):
        low = min(int(at), size - 1)
        high = min(low + 1, size - 1)
        if low == high:
            weights[row, low] = 1.0
        else:
            weights[row, low] += abs(at - np.float32(high))
            weights[row, high] += abs(at - np.float32(low))
    return weights


def _cubic_weights(
    coordinates: np.ndarray, size: int, a: float, exclude_outside: int
) -> np.ndarray:
    """[outputs, inputs]: Keys' cubic convolution over four inputs (edges clamped, or left
    out and the rest renormalized with ``exclude_outside``)."""
    weights = np.zeros((len(coordinates), size), dtype=np.float64)
    for row, at in enumerate(coordinates.astype(np.float64)):
        start = math.floor(at)
        s = at - start
        taps = [
            ((a * (s + 1) - 5 * a) * (s + 1) + 8 * a) * (s + 1) - 4 * a,
            ((a + 2) * s - (a + 3)) * s * s + 1,
            ((a + 2) * (1 - s) - (a + 3)) * (1 - s) * (1 - s) + 1,
            ((a * (2 - s) - 5 * a) * (2 - s) + 8 * a) * (2 - s) - 4 * a,
        ]
        positions = [start - 1 + i for i in range(4)]
        if exclude_outside:
            taps = [t if 0 <= p < size else 0.0 for t, p in zip(taps, positions, strict=True)]
            total = sum(taps)
            taps = [t / total for t in taps]
        for tap, position in zip(taps, positions, strict=True):
            weights[row, min(max(position, 0), size - 1)] += tap
    return weights.astype(np.float32)


def _resample(
    x: torch.Tensor,
    scales: list[float] | None,
    sizes: tuple[Any, ...] | None,
    axes: list[int] | None,
    *,
    mode: str,
    coordinates: str,
    nearest: str,
    cubic_a: float = -0.75,
    exclude_outside: int = 0,
    keep_aspect_ratio_policy: str = "stretch",
    antialias: int = 0,
) -> torch.Tensor:
    """Resize ``x`` one axis at a time (nearest: a gather; linear, cubic: a weight matrix)."""
    rank = x.dim()
    chosen = list(range(rank)) if axes is None else [a % rank for a in axes]
    if sizes is not None and keep_aspect_ratio_policy != "stretch":
        ratios = [
            np.float32(s) / np.float32(x.shape[a]) for s, a in zip(sizes, chosen, strict=True)
        ]
        pick = {"not_larger": min, "not_smaller": max}.get(keep_aspect_ratio_policy)
        if pick is None:
            raise ValueError(
                f"Resize keep_aspect_ratio_policy {keep_aspect_ratio_policy!r} is not one of stretch, not_larger, not_smaller"
            )
        scale = pick(ratios)
        scales = [float(scale)] * len(chosen)
        sizes = tuple(int(math.floor(float(scale) * x.shape[a] + 0.5)) for a in chosen)
    if scales is None and sizes is None:
        raise ValueError("Resize needs scales or sizes")
    if mode == "bilinear":
        mode = "linear"
    if mode not in ("nearest", "linear", "cubic"):
        raise ValueError(f"Resize mode {mode!r} is not one of nearest, linear, cubic")
    for i, axis in enumerate(chosen):
        size = x.shape[axis]
        if sizes is not None:
            length = sizes[i]
            if length == size and scales is None:
                continue
            scale = (
                float(scales[i])
                if scales is not None
                else float(np.float32(length) / np.float32(size))
            )
        else:
            scale = float(scales[i])
            if scale == 1.0:
                continue
            length = int(np.float32(scale) * np.float32(size))
        if antialias and scale < 1.0 and mode != "nearest":
            raise ValueError("Resize with antialias when downsampling is not supported")
        source = _source_coordinates(length, size, scale, coordinates)
        if mode == "nearest":
            positions = _nearest_positions(source, size, nearest, scale < 1.0)
            x = x.index_select(axis, torch.tensor(positions, dtype=torch.long, device=x.device))
            continue
        if mode == "linear":
            matrix = _linear_weights(source, size)
        else:
            matrix = _cubic_weights(source, size, cubic_a, exclude_outside)
        weights = torch.from_numpy(matrix).to(dtype=x.dtype, device=x.device)
        x = torch.movedim(torch.movedim(x, axis, -1) @ weights.T, -1, axis)
    return x


def _floats(value: object) -> list[float] | None:
    """A float input (Resize's scales) as Python floats; absent or empty is ``None``."""
    if value is None:
        return None
    if isinstance(value, _Ints):
        return [float(v) for v in value.values]
    if isinstance(value, list | tuple):  # an attribute (Upsample before opset 9)
        return [float(v) for v in value] or None
    values = [float(v) for v in value.reshape(-1).tolist()]
    return values or None


def _resize(
    x,
    *inputs,
    mode="nearest",
    coordinate_transformation_mode="half_pixel",
    nearest_mode="round_prefer_floor",
    cubic_coeff_a=-0.75,
    exclude_outside=0,
    extrapolation_value=0.0,
    antialias=0,
    axes=None,
    keep_aspect_ratio_policy="stretch",
    _opset=13,
):
    """Resize: ``(x, scales)`` before opset 11 (asymmetric coordinates, onnxruntime's
    "simple" nearest rounding); ``(x, roi, scales, sizes)`` from 11."""
    if _opset < 11:
        scales, sizes = (inputs[0] if inputs else None), None
        coordinate_transformation_mode, nearest_mode = "asymmetric", "simple"
    else:
        _, scales, sizes = (*inputs, None, None, None)[:3]
    if coordinate_transformation_mode == "tf_crop_and_resize":
        raise ValueError(
            "Resize coordinate_transformation_mode 'tf_crop_and_resize' is not supported"
        )
    size_values = None if sizes is None else _ints(sizes) or None
    return _resample(
        _tensor(x),
        None if size_values is not None else _floats(scales),
        size_values,
        None if axes is None else list(axes),
        mode=mode,
        coordinates=coordinate_transformation_mode,
        nearest=nearest_mode,
        cubic_a=cubic_coeff_a,
        exclude_outside=exclude_outside,
        keep_aspect_ratio_policy=keep_aspect_ratio_policy,
        antialias=antialias,
    )


def _upsample(x, scales=None, *, mode="nearest"):
    """Upsample (opsets 7 to 9; ``scales`` an attribute in 7, an input in 9)."""
    return _resample(
        _tensor(x),
        _floats(scales),
        None,
        None,
        mode=mode,
        coordinates="asymmetric",
        nearest="simple",
    )


# Quantization -------------------------------------------------------------------------------
#
# A quantized tensor is held as a float tensor of its integer values, so that gradients pass
# through QuantizeLinear (straight-through estimator); integer initializers stay integer.

_QUANTIZED_RANGES = {
    torch.uint8: (0, 255),
    torch.int8: (-128, 127),
    torch.uint16: (0, 65535),
    torch.int16: (-32768, 32767),
}
_ONNX_QUANTIZED = {
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT16: torch.uint16,
    onnx.TensorProto.INT16: torch.int16,
}


def _along(parameter: object, axis: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-tensor (scalar) or per-axis (1-D, along ``axis``) quantization parameter shaped
    to broadcast against a tensor of rank ``rank``."""
    value = _tensor(parameter).to(dtype)
    if value.dim() == 0 or rank == 0:
        return value.reshape(()) if value.numel() == 1 else value
    if value.dim() != 1:
        raise ValueError("blocked quantization (a scale of rank > 1) is not supported")
    shape = [1] * rank
    shape[axis % rank] = value.numel()
    return value.reshape(shape)


def _straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` exactly, with the gradient of ``surrogate``."""
    return value.detach() + (surrogate - surrogate.detach())


def _quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float, low: int, high: int
) -> torch.Tensor:
    scaled = x / scale
    rounded = torch.clamp(torch.round(scaled) + zero, low, high)  # round half to even
    return _straight_through(rounded, scaled + zero)


def _quantize_linear(
    x, y_scale, y_zero_point=None, *, axis=1, saturate=1, block_size=0, output_dtype=0, precision=0
):
    """QuantizeLinear, per tensor or per axis, to uint8 / int8 (and 16-bit): the integer
    values, exact (round half to even, saturated), as a float tensor whose gradient is the
    straight-through estimator's: that of ``x / scale + zero_point``."""
    if block_size:
        raise ValueError("blocked QuantizeLinear (block_size) is not supported")
    x = _tensor(x)
    if y_zero_point is not None:
        kind = _tensor(y_zero_point).dtype
    else:
        kind = _ONNX_QUANTIZED.get(output_dtype or onnx.TensorProto.UINT8)
    if kind not in _QUANTIZED_RANGES:
        raise ValueError(f"QuantizeLinear to {kind} is not supported (uint8, int8, uint16, int16)")
    low, high = _QUANTIZED_RANGES[kind]
    scale = _along(y_scale, axis, x.dim(), x.dtype)
    zero = 0.0 if y_zero_point is None else _along(y_zero_point, axis, x.dim(), x.dtype)
    return _quantize(x, scale, zero, low, high)


def _dequantize_linear(x, x_scale, x_zero_point=None, *, axis=1, block_size=0, output_dtype=0):
    """DequantizeLinear, per tensor or per axis: ``(x - zero_point) * scale``."""
    if block_size:
        raise ValueError("blocked DequantizeLinear (block_size) is not supported")
    scale = _tensor(x_scale)
    values = _tensor(x)
    dtype = scale.dtype if scale.is_floating_point() else torch.float32
    scale = _along(scale, axis, values.dim(), dtype)
    values = values.to(dtype)
    if x_zero_point is not None:
        values = values - _along(x_zero_point, axis, values.dim(), dtype)
    return values * scale


def _dynamic_quantize_linear(x):
    """DynamicQuantizeLinear: uint8 over ``[min(x, 0), max(x, 0)]``, as onnxruntime
    computes it; the scale and zero point are constants for the gradient."""
    x = _tensor(x)
    zero_tensor = torch.zeros((), dtype=x.dtype, device=x.device)
    lowest = torch.minimum(x.detach().amin(), zero_tensor)
    highest = torch.maximum(x.detach().amax(), zero_tensor)
    spread = highest - lowest
    scale = torch.where(spread == 0, torch.ones_like(spread), spread / 255.0)
    zero = torch.round(torch.clamp(-lowest / scale, 0.0, 255.0))
    return _quantize(x, scale, zero, 0, 255), scale, zero


def _integer_operands(a, b, a_zero, b_zero, a_axis_shape, b_axis_shape):
    """``a - a_zero`` and ``b - b_zero`` in float64 (exact for these integer sizes), and
    whether both were integer tensors (no gradient: the result is an int32 tensor)."""
    a, b = _tensor(a), _tensor(b)
    exact = not (a.is_floating_point() or b.is_floating_point())
    a, b = a.to(torch.float64), b.to(torch.float64)
    if a_zero is not None:
        a = a - _tensor(a_zero).to(torch.float64).reshape(a_axis_shape(_tensor(a_zero)))
    if b_zero is not None:
        b = b - _tensor(b_zero).to(torch.float64).reshape(b_axis_shape(_tensor(b_zero)))
    return a, b, exact


def _integer_result(result: torch.Tensor, exact: bool) -> torch.Tensor:
    """int32 as ONNX says, or float32 holding the same integers where a gradient flows."""
    return result.to(torch.int32) if exact else result.to(torch.float32)


def _matmul_integer(a, b, a_zero_point=None, b_zero_point=None):
    """MatMulInteger: ``(a - a_zero_point) @ (b - b_zero_point)``; a zero point is a
    scalar, per row of ``a`` or per column of ``b``."""
    a, b, exact = _integer_operands(
        a,
        b,
        a_zero_point,
        b_zero_point,
        lambda zero: (-1, 1) if zero.numel() > 1 else (),
        lambda zero: (-1,) if zero.numel() > 1 else (),
    )
    return _integer_result(torch.matmul(a, b), exact)


def _conv_integer(x, w, x_zero_point=None, w_zero_point=None, **attributes):
    """ConvInteger: a Conv of ``x - x_zero_point`` (padding included) and ``w -
    w_zero_point`` (a scalar or one per output channel)."""
    rank = _tensor(w).dim()
    x, w, exact = _integer_operands(
        x,
        w,
        x_zero_point,
        w_zero_point,
        lambda zero: (),
        lambda zero: (-1,) + (1,) * (rank - 1) if zero.numel() > 1 else (),
    )
    return _integer_result(_conv(x, w, **attributes), exact)


_OPS: dict[str, Callable[..., Any]] = {
    "Abs": _unary(torch.abs),
    "Add": _binary(torch.add, lambda a, b: a + b),
    "AveragePool": _average_pool,
    "BatchNormalization": _batch_norm,
    "Cast": _cast,
    "Celu": lambda x, *, alpha=1.0: F.celu(_tensor(x), alpha),
    "Clip": _clip,
    "Concat": _concat,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Conv": _conv,
    "ConvInteger": _conv_integer,
    "DequantizeLinear": _dequantize_linear,
    "Div": _binary(_int_div, lambda a, b: int(a / b) if isinstance(a, int) else a // b),
    "Dropout": lambda x, *_, **__: x,
    "DynamicQuantizeLinear": _dynamic_quantize_linear,
    "Einsum": _einsum,
    "Elu": lambda x, *, alpha=1.0: F.elu(_tensor(x), alpha),
    "Equal": _compare(lambda a, b: a == b, torch.eq),
    "Erf": _unary(torch.erf),
    "Exp": _unary(torch.exp),
    "Expand": _expand,
    "Flatten": _flatten,
    "Gather": _gather,
    "Gelu": _gelu,
    "Gemm": _gemm,
    "GlobalAveragePool": _global_average_pool,
    "GlobalLpPool": _global_lp_pool,
    "GlobalMaxPool": _global_max_pool,
    "Greater": _compare(lambda a, b: a > b, torch.gt),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _unary(F.hardswish),
    "Identity": lambda x: x,
    "InstanceNormalization": _instance_norm,
    "LayerNormalization": _layer_norm,
    "LeakyRelu": lambda x, *, alpha=0.01: F.leaky_relu(_tensor(x), alpha),
    "Less": _compare(lambda a, b: a < b, torch.lt),
    "Log": _unary(torch.log),
    "LogSoftmax": _softmax_family(torch.log_softmax),
    "LpNormalization": _lp_normalization,
    "LpPool": _lp_pool,
    "MatMul": lambda a, b: torch.matmul(_tensor(a), _tensor(b)),
    "MatMulInteger": _matmul_integer,
    "Max": lambda *xs: torch.stack(torch.broadcast_tensors(*xs)).amax(0),
    "MaxPool": _max_pool,
    "Mean": _mean,
    "Min": lambda *xs: torch.stack(torch.broadcast_tensors(*xs)).amin(0),
    "Mish": _unary(F.mish),
    "Mul": _binary(torch.mul, lambda a, b: a * b),
    "Neg": _unary(torch.neg),
    "Not": _unary(torch.logical_not),
    "PRelu": _prelu,
    "Pad": _pad,
    "Pow": lambda a, b: torch.pow(_tensor(a), _tensor(b)),
    "QuantizeLinear": _quantize_linear,
    "Reciprocal": _unary(torch.reciprocal),
    "ReduceL1": _reduce(lambda x, dim, keepdim: x.abs().sum(dim=dim, keepdim=keepdim)),
    "ReduceL2": _reduce(lambda x, dim, keepdim: torch.linalg.vector_norm(x, 2, dim, keepdim)),
    "ReduceLogSum": _reduce(lambda x, dim, keepdim: x.sum(dim=dim, keepdim=keepdim).log()),
    "ReduceLogSumExp": _reduce(torch.logsumexp),
    "ReduceMax": _reduce(torch.amax),
    "ReduceMean": _reduce(torch.mean),
    "ReduceMin": _reduce(torch.amin),
    "ReduceProd": _reduce(_reduce_prod),
    "ReduceSum": _reduce(torch.sum),
    "ReduceSumSquare": _reduce(lambda x, dim, keepdim: (x * x).sum(dim=dim, keepdim=keepdim)),
    "Relu": _unary(torch.relu),
    "Reshape": _reshape,
    "Resize": _resize,
    "Selu": _selu,
    "Shape": _shape,
    "Sigmoid": _unary(torch.sigmoid),
    "Slice": _slice,
    "Softmax": _softmax_family(torch.softmax),
    "Softplus": _unary(F.softplus),
    "Softsign": _unary(F.softsign),
    "Split": _split,
    "Sqrt": _unary(torch.sqrt),
    "Squeeze": _squeeze,
    "Sub": _binary(torch.sub, lambda a, b: a - b),
    "Sum": _sum,
    "Tanh": _unary(torch.tanh),
    "ThresholdedRelu": _thresholded_relu,
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
    "Upsample": _upsample,
    "Where": _where,
}
_NEEDS_OPSET = frozenset({"LogSoftmax", "Resize", "Softmax"})  # their inputs or axes changed
# ops whose float inputs set sizes: read as Python floats from the constants, since a
# tensor's values are unknown while the module is traced with a symbolic batch
_READS_FLOATS = frozenset({"Resize", "Upsample"})
SUPPORTED_OPS: tuple[str, ...] = tuple(sorted(_OPS))
"""The ONNX operators (default domain) a head may use."""


_NOT_FOLDED = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial"}
)


def _from_constants(node: onnx.NodeProto, constants: Container[str]) -> bool:
    """Whether ``node`` computes its outputs from the values named in ``constants`` alone."""
    return (
        node.domain in ("", "ai.onnx")
        and node.op_type not in _NOT_FOLDED
        and (bool(node.input) or node.op_type == "Constant")
        and all(not name or name in constants for name in node.input)
    )


def _fold_constants(
    graph: onnx.GraphProto, opset: int
) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """The nodes that depend on the graph's input, and the values the others compute from
    constants alone (evaluated by onnx's reference implementation) that those nodes or the
    output read: e.g. the pads ``torch.onnx.export`` writes for ``F.pad`` as a
    ConstantOfShape / Concat / Reshape / Slice / Transpose chain on 2-D integer tensors, which
    the shape values (:class:`_Ints`, at most 1-D) cannot hold."""
    from onnx.reference import ReferenceEvaluator

    known = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    computed: dict[str, np.ndarray] = {}
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        if _from_constants(node, known):
            feeds = {name: known[name] for name in node.input if name}
            try:
                if node.op_type == "Constant":
                    results = [_constant_array(**_attributes(node))]
                else:
                    results = ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)
            except Exception:  # the interpreter runs what the reference implementation cannot
                results = None
            if results is not None:
                for name, value in zip(node.output, results, strict=False):
                    if name:
                        known[name] = computed[name] = np.asarray(value)
                continue
        kept.append(node)
    read = {name for node in kept for name in node.input} | {graph.output[0].name}
    return kept, {name: value for name, value in computed.items() if name in read}


def _default_opset(proto: onnx.ModelProto) -> int:
    """The graph's default-domain opset (the newest this onnx knows where it names none)."""
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return onnx.defs.onnx_opset_version()


def unsupported_ops(proto: onnx.ModelProto) -> list[str]:
    """The operators of ``proto``'s graph that :class:`OnnxModule` cannot run, in order.

    A node that computes from constants alone is folded when the module is built, whatever
    its operator (of the default domain), so it is not named.

    Example:
        >>> from onnx import helper
        >>> graph = helper.make_graph([helper.make_node("Loop", ["n", "c"], ["y"])], "g", [], [])
        >>> unsupported_ops(helper.make_model(graph))
        ['Loop']
    """
    constants = {tensor.name for tensor in proto.graph.initializer}
    found = []
    for node in proto.graph.node:
        if _from_constants(node, constants):
            constants.update(node.output)
        elif node.domain not in ("", "ai.onnx") or node.op_type not in _OPS:
            found.append(_qualified(node))
    return list(dict.fromkeys(found))


def _qualified(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _refuse(missing: list[str]) -> ValueError:
    return ValueError(
        f"the head uses the ONNX operator{'s' if len(missing) > 1 else ''} "
        f"{', '.join(missing)}, which the graft cannot interpret in torch; "
        f"supported: {', '.join(SUPPORTED_OPS)}"
    )


class OnnxModule(nn.Module):
    """A one-input, one-output ONNX graph run by torch operators (module docstring).

    Raises ``ValueError`` naming the operators it cannot run.
    """

    def __init__(self, proto: onnx.ModelProto) -> None:
        super().__init__()
        missing = unsupported_ops(proto)
        if missing:
            raise _refuse(missing)
        graph = proto.graph
        initializers = {tensor.name for tensor in graph.initializer}
        inputs = [value.name for value in graph.input if value.name not in initializers]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ValueError("the head must have one input and one output")
        self.input_name, self.output_name = inputs[0], graph.output[0].name
        self.opset = _default_opset(proto)
        kept, folded = _fold_constants(graph, self.opset)
        unfolded = [_qualified(node) for node in kept if node.op_type not in _OPS]
        if unfolded:  # constant nodes the reference implementation could not evaluate
            raise _refuse(list(dict.fromkeys(unfolded)))
        self.nodes = [
            (node.op_type, list(node.input), list(node.output), _attributes(node)) for node in kept
        ]
        self._constants: dict[str, _Ints] = {}
        self._buffers_by_value: dict[str, str] = {}
        self._floats: dict[str, tuple[float, ...]] = {}
        for position, tensor in enumerate(graph.initializer):
            self._store(f"initializer_{position}", tensor.name, numpy_helper.to_array(tensor))
        for position, (name, array) in enumerate(folded.items()):
            self._store(f"folded_{position}", name, array)
        self.linears = nn.ModuleDict(self._linear_layers(graph, kept))

    def _linear_layers(
        self, graph: onnx.GraphProto, nodes: list[onnx.NodeProto]
    ) -> dict[str, nn.Linear]:
        """``MatMul(x, W)`` with a constant 2-D ``W`` as an ``nn.Linear`` (no bias), keyed by
        the node's position: a layer :mod:`fam_core.anatomy.head_rows` can run on the token rows
        that reach the output only (a class token's last block), as on a torch model."""
        weights = {tensor.name: tensor for tensor in graph.initializer}
        layers: dict[str, nn.Linear] = {}
        for position, node in enumerate(nodes):
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
        if array.dtype.kind == "f" and array.ndim <= 1 and array.size <= _SMALL_INTS:
            self._floats[name] = tuple(float(v) for v in array.reshape(-1))
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
            if op_type == "MaxPool":
                options["_count"] = len([name for name in outputs if name])
            if op_type in _NEEDS_OPSET:
                options["_opset"] = self.opset
            if op_type in _READS_FLOATS:
                arguments = [
                    self._floats.get(name, value)
                    for name, value in zip(inputs, arguments, strict=False)
                ]
            result = _OPS[op_type](*arguments, **options)
            results = result if isinstance(result, tuple) else (result,)
            for name, value in zip(outputs, results, strict=False):
                if name:
                    values[name] = value
        out = values[self.output_name]
        return _tensor(out)
