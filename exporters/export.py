"""Write a model and its explanation head as one self-contained ONNX file.

Uses PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, opset
:data:`OPSET`): the torch.export-based one needs ``onnxscript``, which fam-core does not
depend on. The file holds every weight inline (no external-data side file), has a dynamic
batch axis, passes ``onnx.checker``, and carries metadata props (:mod:`fam_core.onnx_format`)
so a server can configure itself from the file alone.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from exporters.heads import CAMGraph, ExplainMode, ExplanationGraph, FAMGraph, GradFAMGraph
from fam_core import onnx_format as fmt
from fam_core.models.store import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from fam_core.similarity import SimilarityKind

OPSET = 17
Method = Literal["fam", "gradfam", "cam", "gradcam"]


def build_graph(
    model: nn.Module,
    method: Method,
    *,
    target_layer: str | None = None,
    similarity: SimilarityKind = "cosine",
    references: torch.Tensor | None = None,
    explain: ExplainMode = "mean",
    class_input: bool = False,
    heatmap: bool = True,
) -> ExplanationGraph:
    """The ``nn.Module`` that :func:`export_model` traces (see :mod:`exporters.heads`)."""
    if method not in fmt.METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {fmt.METHODS}")
    classifier = bool(getattr(model, "is_classifier", False))
    if method in fmt.EMBEDDING_METHODS:
        if classifier:
            raise ValueError(
                f"method {method!r} explains embedding models; this model is a classifier: "
                "use 'cam' or 'gradcam'"
            )
        if class_input:
            raise ValueError("class_input applies to 'cam' and 'gradcam' only")
        if method == "fam":
            return FAMGraph(
                model,
                target_layer,
                similarity=similarity,
                references=references,
                explain=explain,
                heatmap=heatmap,
            )
        if explain != "mean":
            raise ValueError("explain='best' applies to 'fam' only")
        return GradFAMGraph(
            model, target_layer, similarity=similarity, references=references, heatmap=heatmap
        )
    if not classifier:
        raise ValueError(
            f"method {method!r} explains classifiers; this model is an embedding model: "
            "use 'fam' or 'gradfam'"
        )
    if references is not None:
        raise ValueError(f"method {method!r} takes class indices, not references")
    return CAMGraph(
        model,
        target_layer,
        gradient=method == "gradcam",
        class_input=class_input,
        heatmap=heatmap,
    )


def export_model(
    model: nn.Module,
    config: ModelConfig | None = None,
    *,
    method: Method = "fam",
    path: str | Path,
    target_layer: str | None = None,
    references: torch.Tensor | Literal["prototypes"] | None = None,
    explain: ExplainMode = "mean",
    class_input: bool = False,
    heatmap: bool = True,
    input_size: int | None = None,
    similarity: SimilarityKind | None = None,
) -> Path:
    """Export ``model`` with the explanation head ``method`` to the ONNX file ``path``.

    Args:
        model: the model in eval mode.
        config: its :class:`~fam_core.models.store.ModelConfig`; supplies the target layer,
            input size, preprocessing, similarity and class names unless given here.
        method: ``"fam"`` / ``"gradfam"`` (embedding models) or ``"cam"`` / ``"gradcam"``
            (classifiers; the gradient ones need global avg/max pooling + linear head).
        references: ``[K, D]`` references baked into the graph as constants, or
            ``"prototypes"`` for the config's prototypes; ``None``: a ``references`` input.
        explain: ``"mean"`` over the references or ``"best"``: the top-scoring one (FAM).
        class_input: CAM / Grad-CAM graphs take a ``class_index`` input instead of top-1.
        heatmap: ``False`` exports the prediction alone (for measuring the heatmap's cost).

    Returns the path written.

    Example:
        >>> import tempfile
        >>> from fam_core.models.backbones import conv4
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     export_model(conv4().eval(), path=f"{folder}/fam.onnx", input_size=84).name
        'fam.onnx'
    """
    import onnx

    if config is not None and not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig or None, got {type(config).__name__}")
    if isinstance(references, str):
        if references != "prototypes":
            raise ValueError(
                f"references must be a tensor, 'prototypes' or None, got {references!r}"
            )
        references = config.load_prototypes() if config is not None else None
        if references is None:
            raise ValueError("references='prototypes' needs a config with prototypes")
    size = input_size or (config.input_size if config is not None else None)
    if not isinstance(size, int) or size <= 0:
        raise ValueError("input_size is needed (a positive int) when no config gives it")
    layer = target_layer or (config.target_layer if config is not None else None)
    kind = similarity or (config.similarity if config is not None else "cosine")
    graph = build_graph(
        model,
        method,
        target_layer=layer,
        similarity=kind,  # type: ignore[arg-type]
        references=references,
        explain=explain,
        class_input=class_input,
        heatmap=heatmap,
    ).eval()

    graph.heatmap_size = (size, size)
    sample_image = torch.rand(2, 3, size, size, device=_device(model))
    dimension = graph.check_head(sample_image)
    args, input_names, dynamic_axes = _inputs(graph, sample_image, dimension)
    with torch.no_grad():
        sample_outputs = graph(*args)
    output_names = _output_names(graph)
    dynamic_axes.update({name: {0: "batch"} for name in output_names})
    if isinstance(graph, FAMGraph | GradFAMGraph) and graph.has_reference_input:
        dynamic_axes[fmt.OUTPUT_SCORES] = {0: "batch", 1: "num_references"}

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            graph,
            args,
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    _set_output_shapes(proto, sample_outputs, dynamic_axes)
    _document(proto, graph, config, size, kind, explain, input_names, output_names)
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise OSError(f"output folder {path.parent} does not exist")
    onnx.save_model(proto, str(path), save_as_external_data=False)
    return path


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def _inputs(
    graph: ExplanationGraph, image: torch.Tensor, dimension: int
) -> tuple[tuple[torch.Tensor, ...], list[str], dict[str, dict[int, str]]]:
    axes: dict[str, dict[int, str]] = {fmt.INPUT_IMAGE: {0: "batch"}}
    if isinstance(graph, FAMGraph | GradFAMGraph) and graph.has_reference_input:
        references = torch.rand(3, dimension, device=image.device)
        axes[fmt.INPUT_REFERENCES] = {0: "num_references"}
        return (image, references), [fmt.INPUT_IMAGE, fmt.INPUT_REFERENCES], axes
    if isinstance(graph, CAMGraph) and graph.class_input:
        classes = torch.zeros(image.shape[0], dtype=torch.long, device=image.device)
        axes[fmt.INPUT_CLASS_INDEX] = {0: "batch"}
        return (image, classes), [fmt.INPUT_IMAGE, fmt.INPUT_CLASS_INDEX], axes
    return (image,), [fmt.INPUT_IMAGE], axes


def _set_output_shapes(
    proto: object, outputs: tuple[torch.Tensor, ...], dynamic_axes: dict[str, dict[int, str]]
) -> None:
    """Write the fixed sizes of every output into the graph, keeping the dynamic axes named."""
    for value, tensor in zip(proto.graph.output, outputs, strict=True):  # type: ignore[attr-defined]
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for axis, extent in enumerate(tensor.shape):
            dim = dims.add()
            name = dynamic_axes.get(value.name, {}).get(axis)
            if name is None:
                dim.dim_value = int(extent)
            else:
                dim.dim_param = name


def _output_names(graph: ExplanationGraph) -> list[str]:
    explanation = [fmt.OUTPUT_HEATMAP, fmt.OUTPUT_HEATMAP_LOWRES, fmt.OUTPUT_WEIGHTS]
    if isinstance(graph, CAMGraph):
        first = [fmt.OUTPUT_LOGITS] + ([] if graph.class_input else [fmt.OUTPUT_CLASS_INDEX])
        return first + (explanation if graph.heatmap else [])
    return [fmt.OUTPUT_EMBEDDING, fmt.OUTPUT_SCORES] + (explanation if graph.heatmap else [])


_DOCS = {
    fmt.INPUT_IMAGE: "[B, 3, H, W] float32, normalised with metadata 'preprocessing'",
    fmt.INPUT_REFERENCES: "[K, D] float32 reference embeddings (e.g. class prototypes)",
    fmt.INPUT_CLASS_INDEX: "[B] int64 class to explain for each image",
    fmt.OUTPUT_EMBEDDING: "[B, D] the model's embeddings",
    fmt.OUTPUT_LOGITS: "[B, C] the classifier's logits",
    fmt.OUTPUT_SCORES: "[B, K] similarity of each image to each reference",
    fmt.OUTPUT_CLASS_INDEX: "[B] int64 the explained (top-1) class",
    fmt.OUTPUT_HEATMAP: "[B, H, W] heatmap in [0, 1] at input resolution",
    fmt.OUTPUT_HEATMAP_LOWRES: "[B, h, w] map at the target layer, before upsampling",
    fmt.OUTPUT_WEIGHTS: "[B, N] channel weights of the target layer's activation maps",
}


def _document(
    proto: object,
    graph: ExplanationGraph,
    config: ModelConfig | None,
    size: int,
    similarity: str,
    explain: str,
    input_names: list[str],
    output_names: list[str],
) -> None:
    baked = None
    if isinstance(graph, FAMGraph | GradFAMGraph) and graph.baked_references is not None:
        baked = int(graph.baked_references.shape[0])
    document(
        proto,
        method=graph.method,
        target_layer=graph.target_layer,
        task="classifier" if isinstance(graph, CAMGraph) else "embedding",
        model_name=config.name if config is not None else type(graph.model).__name__,
        input_size=(size, size),
        mean=config.mean if config is not None else IMAGENET_MEAN,
        std=config.std if config is not None else IMAGENET_STD,
        class_names=list(config.class_names) if config is not None else [],
        input_names=input_names,
        output_names=output_names,
        opset=OPSET,
        similarity=similarity,
        explain=explain,
        baked_references=baked,
        class_input=isinstance(graph, CAMGraph) and graph.class_input,
    )


def document(
    proto: object,
    *,
    method: str,
    target_layer: str,
    task: str,
    model_name: str,
    input_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    input_names: list[str],
    output_names: list[str],
    opset: int,
    similarity: str = "cosine",
    explain: str = "mean",
    baked_references: int | None = None,
    class_input: bool = False,
) -> None:
    """Write the metadata props and doc strings of :mod:`fam_core.onnx_format` into ``proto``.

    The one writer of the format's metadata: :func:`export_model` and
    :func:`exporters.graft.graft_onnx` both call it. ``baked_references`` is ``K`` when the
    references are constants of the graph (``None``: an input); ``similarity``, ``explain``
    and ``baked_references`` apply to ``fam`` / ``gradfam``, ``class_input`` to ``cam`` /
    ``gradcam``.

    Example:
        >>> import onnx
        >>> proto = onnx.ModelProto()
        >>> document(
        ...     proto, method="cam", target_layer="layer4", task="classifier", model_name="m",
        ...     input_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, class_names=["a", "b"],
        ...     input_names=[], output_names=[], opset=17,
        ... )
        >>> {p.key: p.value for p in proto.metadata_props}["class_target"]
        'top1'
    """
    import onnx

    import fam_core

    for value in (*proto.graph.input, *proto.graph.output):  # type: ignore[attr-defined]
        value.doc_string = _DOCS[value.name]
    height, width = input_size
    props = {
        fmt.KEY_FORMAT: fmt.FORMAT_VERSION,
        fmt.KEY_VERSION: fam_core.__version__,
        fmt.KEY_METHOD: method,
        fmt.KEY_TARGET_LAYER: target_layer,
        fmt.KEY_PREPROCESSING: json.dumps(
            {
                "mean": list(mean),
                "std": list(std),
                "size": [int(height), int(width)],
                "range": [0, 1],
            }
        ),
        fmt.KEY_TASK: task,
        fmt.KEY_MODEL: model_name,
        fmt.KEY_CLASS_NAMES: json.dumps(list(class_names)),
        fmt.KEY_INPUTS: json.dumps(input_names),
        fmt.KEY_OUTPUTS: json.dumps(output_names),
        fmt.KEY_OPSET: str(opset),
    }
    if method in fmt.EMBEDDING_METHODS:
        props[fmt.KEY_SIMILARITY] = similarity
        props[fmt.KEY_EXPLAIN] = explain
        props[fmt.KEY_REFERENCES] = "input" if baked_references is None else "baked"
        if baked_references is not None:
            props[fmt.KEY_NUM_REFERENCES] = str(baked_references)
    else:
        props[fmt.KEY_CLASS_TARGET] = "input" if class_input else "top1"
    onnx.helper.set_model_props(proto, props)  # type: ignore[arg-type]
    proto.doc_string = (  # type: ignore[attr-defined]
        f"fam-core {method} explanation graph; target layer {target_layer}"
    )
