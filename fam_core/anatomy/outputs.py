"""Select the explained output of a model: its embedding or its logits.

Models return a tensor, a tuple, a dict or a ``ModelOutput``-like object (Hugging Face
``transformers``). The ``output=`` option of every explainer says which part is explained:

- ``None`` (default): a tensor as it is; the first element of a tuple or list; for a mapping
  or an object with attributes, the first of :data:`DEFAULT_KEYS` that is present and not
  ``None`` (``logits`` before ``image_embeds`` before ``pooler_output``), else its first
  tensor value;
- a ``str``: that key or attribute;
- an ``int``: that index of a tuple or list (or of a mapping's values);
- a callable: ``output(model_outputs) -> tensor``.

An output ``[B, D, 1, 1]`` or ``[B, D, 1]`` is flattened to ``[B, D]``.

Example:
    >>> select_output({"last_hidden_state": torch.zeros(2, 5, 8), "pooler_output": torch.ones(2, 8)}).shape
    torch.Size([2, 8])
    >>> select_output((torch.zeros(2, 3), torch.ones(2, 4)), 1).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

OutputSpec = str | int | Callable[[Any], torch.Tensor] | None
DEFAULT_KEYS: tuple[str, ...] = (
    "logits",
    "image_embeds",
    "embeddings",
    "embedding",
    "pooler_output",
)


def check_output_spec(spec: object) -> None:
    """``TypeError`` unless ``spec`` is an accepted ``output=`` option."""
    if spec is None or isinstance(spec, str) or callable(spec):
        return
    if isinstance(spec, int) and not isinstance(spec, bool):
        return
    raise TypeError(f"output must be None, a key (str), an index (int) or a callable, got {spec!r}")


def select_output(outputs: Any, spec: OutputSpec = None) -> torch.Tensor:
    """The explained tensor of ``outputs`` (see the module docstring)."""
    chosen = _select(outputs, spec)
    if not isinstance(chosen, torch.Tensor):
        raise TypeError(
            f"the selected model output is a {type(chosen).__name__}, expected a tensor; "
            "pass output= (a key, an index or a callable) to choose the embedding or logits"
        )
    if chosen.dim() == 4 and chosen.shape[2:] == (1, 1):
        return chosen.flatten(1)
    if chosen.dim() == 3 and chosen.shape[2] == 1:
        return chosen.flatten(1)
    return chosen


def output_names(outputs: Any) -> tuple[str | int, ...]:
    """The keys of a mapping or ``ModelOutput``, the indices of a tuple or list, ``()`` for a
    tensor: what ``output=`` may name.

    Example:
        >>> output_names({"last_hidden_state": 0, "pooler_output": 1}), output_names((1, 2))
        (('last_hidden_state', 'pooler_output'), (0, 1))
    """
    fields = _fields(outputs)
    if fields is not None:
        return tuple(fields)
    if isinstance(outputs, list | tuple):
        return tuple(range(len(outputs)))
    return ()


def _fields(outputs: Any) -> dict[str, Any] | None:
    if isinstance(outputs, Mapping):
        return dict(outputs)
    if hasattr(outputs, "keys") and hasattr(outputs, "__getitem__"):  # ModelOutput-like
        return {key: outputs[key] for key in outputs.keys()}  # noqa: SIM118
    return None


def _select(outputs: Any, spec: OutputSpec) -> Any:
    if callable(spec):
        return spec(outputs)
    if isinstance(outputs, torch.Tensor):
        if spec is not None:
            raise ValueError(
                f"output={spec!r} selects from a tuple or dict; the model returns a tensor"
            )
        return outputs
    fields = _fields(outputs)
    if isinstance(spec, str):
        if fields is not None and spec in fields:
            return fields[spec]
        if isinstance(getattr(outputs, spec, None), torch.Tensor):  # an attribute, not a key
            return getattr(outputs, spec)
        known = sorted(fields) if fields is not None else []
        raise ValueError(f"the model output has no {spec!r}; it has {known}")
    if isinstance(spec, int):
        values = list(fields.values()) if fields is not None else outputs
        if not isinstance(values, list | tuple):
            raise ValueError(
                f"output={spec} indexes a tuple; the model returns {type(outputs).__name__}"
            )
        if not -len(values) <= spec < len(values):
            raise ValueError(f"output={spec} is out of range for {len(values)} model outputs")
        return values[spec]
    if fields is not None:
        for key in DEFAULT_KEYS:
            if fields.get(key) is not None:
                return fields[key]
        for value in fields.values():
            if isinstance(value, torch.Tensor):
                return value
        raise ValueError(f"the model output has no tensor among {sorted(fields)}")
    if isinstance(outputs, list | tuple) and outputs:
        return outputs[0]
    return outputs


def is_logits(outputs: Any, spec: OutputSpec) -> bool:
    """Whether the selected output is called ``logits`` (a classifier's, by convention)."""
    if spec == "logits":
        return True
    if spec is not None:
        return False
    fields = _fields(outputs)
    return fields is not None and fields.get("logits") is not None
