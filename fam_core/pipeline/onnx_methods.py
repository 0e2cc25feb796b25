"""The explanation methods a plain ONNX file serves: one grafted graph per method.

A file ``fam export`` wrote holds the one method baked into it. A plain file (see
:func:`fam_core.exporters.graft.graft_onnx`) takes every method the graft can put onto it:
:func:`graftable_methods` says which, and why not the others; :class:`GraftedMethods` grafts
each of them once, on first use, and keeps the graph (one lock per method, since the server
runs requests concurrently).

Example:
    >>> reasons = graftable_methods("classifier", head="jacobian")
    >>> [method for method, reason in reasons.items() if reason is None]
    ['gradcam']
    >>> reasons["cam"], reasons["scorefam"]
    ('the head is not global average pooling + linear', 'not exportable to ONNX')
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fam_core.explainers import available_methods
from fam_core.graphs import onnx_format as fmt
from fam_core.graphs.onnx_runtime import OnnxExplainer
from fam_core.messages import first_line
from fam_core.pipeline.errors import NotFound

_TASK_METHODS = {"embedding": fmt.EMBEDDING_METHODS, "classifier": fmt.CLASSIFIER_METHODS}
_LINEAR_HEADS = ("identity", "linear")  # what CAM reads its class weights from


def graftable_methods(
    task: str, head: str | None = None, error: str | None = None
) -> dict[str, str | None]:
    """For each method (the graft's first, then every registered one): ``None`` when it can
    be grafted onto a ``task`` graph, else why not.

    ``head`` is the head the graft found (its ``head`` metadata: ``"identity"``,
    ``"linear"`` or ``"jacobian"``; ``None``: not known yet, taken as linear); ``error``
    the reason no head can be grafted at all.

    Example:
        >>> graftable_methods("embedding")["cam"]
        'grafted onto classifiers only (an embedding model takes fam, gradfam)'
    """
    own = _TASK_METHODS[task]
    reasons: dict[str, str | None] = {}
    for method in (*own, *fmt.METHODS, *available_methods()):
        if method in reasons:
            continue
        if method not in fmt.METHODS:
            detail = fmt.NOT_EXPORTED.get(method)
            reasons[method] = "not exportable to ONNX" + (f": {detail}" if detail else "")
        elif method not in own:
            other = "embedding models" if task == "classifier" else "classifiers"
            article = "an" if task == "embedding" else "a"
            label = "embedding model" if task == "embedding" else task
            reasons[method] = (
                f"grafted onto {other} only ({article} {label} takes {', '.join(own)})"
            )
        elif error is not None:
            reasons[method] = f"the graph cannot be grafted: {error}"
        elif method == "cam" and head is not None and head not in _LINEAR_HEADS:
            reasons[method] = "the head is not global average pooling + linear"
        else:
            reasons[method] = None
    return reasons


def served_methods(reasons: Mapping[str, str | None]) -> tuple[str, ...]:
    """The methods :func:`graftable_methods` found no reason against, in its order."""
    return tuple(method for method, reason in reasons.items() if reason is None)


class GraftedMethods:
    """The graphs of a plain ONNX file, one per method, grafted with the same ``options``.

    ``first`` is the graph grafted at load (the default method): its ``head`` metadata
    decides which other methods the file takes. Every other method is grafted on its first
    :meth:`runner` call, under a lock of its own, and kept.
    """

    def __init__(
        self, path: Path, options: Mapping[str, Any], task: str, first: OnnxExplainer
    ) -> None:
        self.path = path
        self._options = {key: value for key, value in options.items() if key != "method"}
        self.reasons = graftable_methods(task, first.metadata.get("head"))
        self._runners = {first.method: first}
        self._locks = {method: threading.Lock() for method in served_methods(self.reasons)}

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods this file is grafted with (or will be, on first use)."""
        return served_methods(self.reasons)

    def refusal(self, method: str) -> str | None:
        """Why ``method`` is not served (``None``: it is)."""
        if method not in self.reasons:
            return f"unknown method {method!r}"
        reason = self.reasons[method]
        return None if reason is None else f"method {method!r}: {reason}"

    def runner(self, method: str) -> OnnxExplainer:
        """The graph of ``method``, grafted now if this is its first use; :class:`NotFound`
        (:meth:`refusal`) for a method the file does not take, or whose graft failed."""
        refusal = self.refusal(method)
        if refusal is not None:
            raise NotFound(refusal)
        with self._locks[method]:
            if method not in self._runners:
                try:
                    self._runners[method] = OnnxExplainer(
                        self.path, graft={**self._options, "method": method}
                    )
                except (OSError, ValueError) as error:
                    self.reasons[method] = f"cannot be grafted: {first_line(error)}"
                    raise NotFound(f"method {method!r}: {self.reasons[method]}") from None
            return self._runners[method]
