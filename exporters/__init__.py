"""ONNX exporters: a model and its explanation head in one graph, run by onnxruntime.

Example:
    >>> import tempfile
    >>> from fam_core.models.backbones import conv4
    >>> from fam_core.exporters import export_model
    >>> folder = tempfile.TemporaryDirectory()
    >>> path = export_model(
    ...     conv4().eval(), method="fam", path=f"{folder.name}/conv4_fam.onnx", input_size=84
    ... )
    >>> from fam_core.graphs.onnx_runtime import OnnxExplainer
    >>> OnnxExplainer(path).method
    'fam'
    >>> folder.cleanup()
"""

from fam_core.extras import require

require("export", "onnx", "onnxruntime")  # written with onnx, checked with onnxruntime

from fam_core.exporters.export import OPSET, build_graph, export_model  # noqa: E402
from fam_core.exporters.heads import CAMGraph, ExplanationGraph, FAMGraph, GradFAMGraph  # noqa: E402

__all__ = [
    "OPSET",
    "CAMGraph",
    "ExplanationGraph",
    "FAMGraph",
    "GradFAMGraph",
    "build_graph",
    "export_model",
]
