"""The contract of an exported explanation graph: tensor names and metadata keys.

:mod:`fam_core.exporters` writes files that follow it and :mod:`fam_core.graphs.onnx_runtime` reads them, so
a server can configure itself from the file alone.

Inputs (``B`` is dynamic):

- ``image`` ``[B, 3, H, W]`` float32, already normalised with the ``preprocessing`` metadata;
- ``references`` ``[K, D]`` float32 (``fam``/``gradfam`` graphs whose references are not baked);
- ``class_index`` ``[B]`` int64 (``cam``/``gradcam`` graphs exported with ``class_input``).

Outputs:

- ``embedding`` ``[B, D]`` (``fam``/``gradfam``) or ``logits`` ``[B, C]`` (``cam``/``gradcam``);
- ``scores`` ``[B, K]``: similarity to each reference (``fam``/``gradfam``);
- ``class_index`` ``[B]`` int64: the explained class (``cam``/``gradcam`` top-1 graphs);
- ``heatmap`` ``[B, H, W]`` in ``[0, 1]`` at input resolution;
- ``heatmap_lowres`` ``[B, h, w]``: the map at the target layer, before upsampling;
- ``weights`` ``[B, N]``: the channel weights that combined the activation maps.

Metadata props (strings; JSON where noted): see the ``KEY_*`` constants.
"""

from __future__ import annotations

from collections.abc import Mapping

from fam_core.explainers.registry import CAPABILITIES, onnx_methods

FORMAT_VERSION = "1"

INPUT_IMAGE = "image"
INPUT_REFERENCES = "references"
INPUT_CLASS_INDEX = "class_index"

OUTPUT_EMBEDDING = "embedding"
OUTPUT_LOGITS = "logits"
OUTPUT_SCORES = "scores"
OUTPUT_CLASS_INDEX = "class_index"  # only in top-1 graphs, where it is no input
OUTPUT_HEATMAP = "heatmap"
OUTPUT_HEATMAP_LOWRES = "heatmap_lowres"
OUTPUT_WEIGHTS = "weights"

KEY_FORMAT = "fam.format_version"
KEY_VERSION = "version"  # fam_core version that wrote the file
KEY_METHOD = "method"  # fam | gradfam | cam | gradcam
KEY_TARGET_LAYER = "target_layer"
KEY_PREPROCESSING = (
    "preprocessing"  # JSON {"mean": [..], "std": [..], "size": [H, W], "range": [0, 1]}
)
KEY_SIMILARITY = "similarity"  # cosine | dot | euclidean (fam, gradfam)
KEY_EXPLAIN = "explain"  # "mean" over the K references, or "best" (top-scoring one only)
KEY_REFERENCES = "references"  # "input" or "baked"
KEY_NUM_REFERENCES = "num_references"  # K when baked
KEY_CLASS_TARGET = "class_target"  # "top1" or "input" (cam, gradcam)
KEY_TASK = "task"  # embedding | classifier
KEY_MODEL = "model"
KEY_CLASS_NAMES = "class_names"  # JSON list
KEY_INPUTS = "inputs"  # JSON list of input names
KEY_OUTPUTS = "outputs"  # JSON list of output names
KEY_OPSET = "opset"
KEY_NORMALISATION = "normalisation"  # JSON list: the steps that read a foreign file (graft)
KEY_EXPLAINED_OUTPUT = "explained_output"  # grafted graphs: the foreign value explained
KEY_GRAPH_OUTPUT = "graph_output"  # grafted graphs: the foreign graph's output it stands for
KEY_OUTPUT_ACTIVATION = "output_activation"  # softmax | log_softmax | sigmoid after the logits
KEY_OUTPUT_NORMALISATION = "output_normalisation"  # the ops that L2-normalise the output

OUTPUT_ACTIVATIONS: tuple[str, ...] = ("softmax", "log_softmax", "sigmoid")
"""What a grafted classifier's graph applied after the logits it explains: the ``logits``
output holds the logits, and the scores a server reports apply the activation back
(softmax for ``softmax`` and ``log_softmax``, whose softmax is the probabilities; the
element-wise ``sigmoid`` for ``sigmoid``)."""

METHODS: tuple[str, ...] = onnx_methods()
"""The methods ``fam export`` writes: those that declare an ``onnx_task``
(:data:`fam_core.explainers.registry.CAPABILITIES`)."""
EMBEDDING_METHODS: tuple[str, ...] = onnx_methods("embedding")
CLASSIFIER_METHODS: tuple[str, ...] = onnx_methods("classifier")
NOT_EXPORTED: dict[str, str] = {
    name: caps.onnx_refusal for name, caps in CAPABILITIES.items() if caps.onnx_refusal
}
"""Registered methods the export refuses by name, with the reason."""


def is_explanation_graph(metadata: Mapping[str, str]) -> bool:
    """Whether a graph's metadata props mark it as one ``fam export`` wrote (or the graft
    made): it names its :data:`KEY_METHOD` and :data:`KEY_PREPROCESSING`. Any other ONNX
    file is a plain one, grafted before it explains.

    Example:
        >>> is_explanation_graph({"method": "fam", "preprocessing": "{}"})
        True
        >>> is_explanation_graph({"producer": "pytorch"})
        False
    """
    return KEY_METHOD in metadata and KEY_PREPROCESSING in metadata


def check_exportable(method: str) -> None:
    """Raise ``ValueError`` unless ``method`` is one of :data:`METHODS`, naming the method
    and why it is not exported.

    Example:
        >>> check_exportable("liftcam")
        Traceback (most recent call last):
        ...
        ValueError: cannot export method 'liftcam' to ONNX: LIFT-CAM runs Captum's DeepLift (hooks and a second pass from the reference), which has no ONNX graph; exportable methods: ('fam', 'gradfam', 'cam', 'gradcam')
    """
    if method in METHODS:
        return
    if method in NOT_EXPORTED:
        raise ValueError(
            f"cannot export method {method!r} to ONNX: {NOT_EXPORTED[method]}; "
            f"exportable methods: {METHODS}"
        )
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
