"""Encode computed tensors into results: predictions, float16 heatmaps, embeddings, overlays.

A heatmap with no spatial information (all zeros or constant) is never served as an
explanation without a word: its :attr:`~fam_core.pipeline.request.Heatmap.warning` says why,
and the ``fam_core.pipeline`` logger writes a warning line.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fam_core.explainers.postprocess import min_max, upsample
from fam_core.explanation import flat_reason
from fam_core.images.resize import as_size
from fam_core.pipeline.jobs import Computed
from fam_core.pipeline.models import ServedModel
from fam_core.pipeline.request import ExplainRequest, ExplainResult, Heatmap, Match
from fam_core.render import overlay, to_png_bytes

LOGGER = logging.getLogger("fam_core.pipeline")
FLAT_WARNING = "the heatmap is flat, not an explanation: {reason}"


def heatmap_bytes(heatmap: torch.Tensor) -> bytes:
    """``[H, W]`` values as float16 little-endian bytes (the wire format of every front door).

    Example:
        >>> heatmap_bytes(torch.tensor([[0.0, 1.0]]))
        b'\\x00\\x00\\x00<'
    """
    return heatmap.detach().to(torch.float16).cpu().numpy().astype("<f2").tobytes()


def heatmap_from_bytes(data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`heatmap_bytes`: a float32 tensor of ``shape``."""
    return torch.from_numpy(np.frombuffer(data, dtype="<f2").astype(np.float32).reshape(shape))


def heatmap_at(
    computed: Computed, index: int, resolution: str, size: int | tuple[int, int]
) -> torch.Tensor:
    """Item ``index``'s heatmap in ``[0, 1]`` at ``"input"`` (``size``: a side or ``(H, W)``)
    or ``"feature"`` size.

    Input resolution is :func:`~fam_core.explainers.postprocess.upsample` of the raw map (bilinear,
    then min-max), as in ``ChannelExplainer.__call__``; feature resolution is the min-max of the raw map.
    Maps the method made at the resolution asked are used as they are.
    """
    if computed.raw is None:
        raise ValueError("this result has no heatmap")
    raw = computed.raw[index : index + 1]
    if resolution == "feature":
        if computed.feature_maps is not None:
            return computed.feature_maps[index]
        return min_max(raw.float(), dim=(1, 2))[0]
    if computed.maps is not None:
        return computed.maps[index]
    return upsample(raw, as_size(size))[0]


def encode_result(
    served: ServedModel,
    request: ExplainRequest,
    computed: Computed,
    index: int,
    pixels: torch.Tensor,
) -> ExplainResult:
    """The result for item ``index`` of ``computed``; ``pixels`` is its ``[3, H, W]`` input."""
    scores = computed.scores[index].float().cpu()
    predicted = int(computed.predicted[index])
    references = bool(request.references)
    if served.task == "classifier":
        prediction = Match(served.label(predicted), predicted, float(scores[predicted]))
        top: tuple[Match, ...] = ()
    else:
        count = min(max(request.top_k, 1), scores.numel())
        values, indices = scores.topk(count) if count else (scores, scores.long())
        top = tuple(
            Match(_match_label(served, int(i), references), int(i), float(v))
            for v, i in zip(values.tolist(), indices.tolist(), strict=True)
        )
        prediction = top[0] if top else Match("self", -1, 1.0)
    heatmap = None
    overlay_png = None
    if computed.raw is not None:
        values = heatmap_at(computed, index, request.resolution, served.config.image_size)
        height, width = values.shape
        warning = flat_warning(computed, index, values)
        if warning:
            LOGGER.warning("model %r, method %r: %s", served.name, computed.method, warning)
        heatmap = Heatmap(
            data=heatmap_bytes(values),
            shape=(int(height), int(width)),
            method=computed.method,
            target_layer=computed.target_layer,
            resolution=request.resolution,
            warning=warning,
        )
        if request.overlay:
            overlay_png = to_png_bytes(overlay(pixels, values.float()))
    embedding = computed.outputs[index].detach().float().cpu() if request.embedding else None
    return ExplainResult(
        prediction=prediction,
        scores=tuple(scores.tolist()),
        top_k=top,
        heatmap=heatmap,
        explained_score=0.0 if computed.explained is None else float(computed.explained[index]),
        embedding=None if embedding is None else embedding.numpy().astype("<f4").tobytes(),
        embedding_dim=0 if embedding is None else int(embedding.numel()),
        overlay_png=overlay_png,
    )


def flat_warning(computed: Computed, index: int, values: torch.Tensor) -> str:
    """The warning of item ``index``'s heatmap ``values`` ``[H, W]``: ``""`` unless the map
    is all zeros or constant (flagged by the explainer, or found here: a feature-resolution
    map of a 1x1 layer, a graph that does not flag its maps)."""
    flagged = computed.flat is not None and bool(computed.flat[index])
    if not flagged and bool(values.amax() > values.amin()):
        return ""
    reason = computed.flat_reason
    if not reason and computed.raw is not None:
        raw = computed.raw[index]
        reason = flat_reason(raw, raw.new_ones(1))
    return FLAT_WARNING.format(reason=reason)


def _match_label(served: ServedModel, index: int, references: bool) -> str:
    return f"reference {index}" if references else served.label(index)
