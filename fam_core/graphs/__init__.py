"""Exported explanation graphs (ONNX): the contract the exporters write
(:mod:`fam_core.graphs.onnx_format`) and onnxruntime running them
(:mod:`fam_core.graphs.onnx_runtime`). Exporting needs the ``export`` extra, running only
``onnx``.
"""
