"""The one result type every explainer returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.fx.experimental.proxy_tensor import get_proxy_mode

Resolution = Literal["input", "feature"]
"""A heatmap's size: the model's ``"input"`` or the target layer's ``"feature"`` map."""
RESOLUTIONS: tuple[str, ...] = ("input", "feature")


@dataclass(frozen=True)
class Explanation:
    """Heatmaps for a batch of images, kept on the model's device as tensors.

    Attributes:
        maps: ``[B, H, W]`` float32 in ``[0, 1]`` at input resolution (bilinear upsampling,
            then min-max normalisation per image).
        raw: ``[B, h, w]`` the map at the target layer's resolution, before upsampling and
            normalisation (FAM: eq. 13).
        weights: ``[B, C]`` channel weights used to combine the activation maps
            (FAM: the min-max normalised contributions of eq. 12).
        scores: ``[B]`` the score that was explained (FAM: the similarity ``S`` of eq. 11;
            for class targets, the class logit).
        method: the explainer's name, e.g. ``"fam"``.
        target_layer: the name of the layer whose activations were combined.
        extras: method-specific tensors (e.g. FAM's un-normalised ``contributions``), and
            strings that say how the map was made: ``"head"`` is the decomposition used
            after the target layer (``"identity"``, ``"linear"``: eq. 16-18 with the head's
            matrix, ``"jacobian"``: the head's Jacobian at each sample). A map with no
            spatial information (a 1x1 target map, a constant map) is all zeros,
            ``extras["flat"]`` ``[B]`` is ``True`` for it and ``extras["flat_reason"]``
            says why (:func:`flat_reason` of the first such map; ``""`` when none is).

    Example:
        >>> e = Explanation(torch.zeros(1, 4, 4), torch.zeros(1, 2, 2), torch.zeros(1, 3),
        ...                 torch.zeros(1), "fam", "layer4")
        >>> len(e), e[0].maps.shape
        (1, torch.Size([1, 4, 4]))
    """

    maps: torch.Tensor
    raw: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor
    method: str
    target_layer: str
    extras: dict[str, torch.Tensor | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        extras = dict(self.extras)  # a copy: the caller's dict is never changed
        if "flat" not in extras:  # no spatial information: say so
            extras["flat"] = self.maps.flatten(1).amax(dim=1) == 0
        if "flat_reason" not in extras and get_proxy_mode() is None:  # not while traced
            flat = extras["flat"]
            first = (
                int(flat.nonzero()[0, 0]) if isinstance(flat, torch.Tensor) and flat.any() else -1
            )
            reason = flat_reason(self.raw[first], self.weights[first]) if first >= 0 else ""
            extras["flat_reason"] = reason
        object.__setattr__(self, "extras", extras)

    def __len__(self) -> int:
        return self.maps.shape[0]

    def __getitem__(self, index: int | slice | torch.Tensor) -> Explanation:
        """The explanation of one item (kept as a batch of one), of a slice, or of the items
        a long tensor of indices selects (in that order)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Explanation(
            maps=self.maps[index],
            raw=self.raw[index],
            weights=self.weights[index],
            scores=self.scores[index],
            method=self.method,
            target_layer=self.target_layer,
            extras={
                name: _item(value, index)
                for name, value in self.extras.items()
                if name != "flat_reason"  # the slice's own first flat map says why
            },
        )

    @property
    def device(self) -> torch.device:
        return self.maps.device

    def to(self, device: torch.device | str) -> Explanation:
        """A copy with every tensor on ``device``."""
        return Explanation(
            maps=self.maps.to(device),
            raw=self.raw.to(device),
            weights=self.weights.to(device),
            scores=self.scores.to(device),
            method=self.method,
            target_layer=self.target_layer,
            extras={
                name: value.to(device) if isinstance(value, torch.Tensor) else value
                for name, value in self.extras.items()
            },
        )

    @staticmethod
    def concat(parts: list[Explanation]) -> Explanation:
        """Join explanations of consecutive batches made by the same explainer."""
        if not parts:
            raise ValueError("Explanation.concat needs at least one explanation")
        first = parts[0]
        return Explanation(
            maps=torch.cat([p.maps for p in parts]),
            raw=torch.cat([p.raw for p in parts]),
            weights=torch.cat([p.weights for p in parts]),
            scores=torch.cat([p.scores for p in parts]),
            method=first.method,
            target_layer=first.target_layer,
            extras={
                k: _cat([p.extras[k] for p in parts]) for k in first.extras if k != "flat_reason"
            },
        )


def flat_reason(raw: torch.Tensor, weights: torch.Tensor) -> str:
    """Why a map with no spatial information is flat: ``raw`` ``[h, w]`` is the map at the
    target layer, ``weights`` ``[N]`` the channel weights that made it.

    Example:
        >>> flat_reason(torch.ones(1, 1), torch.ones(3))
        "the target layer's map is 1x1: it has no spatial information (choose an earlier target layer)"
        >>> flat_reason(torch.zeros(4, 4), torch.zeros(3))
        'every channel weight is zero: the explained score does not change with the target layer'
    """
    if raw.numel() == 1:
        return (
            "the target layer's map is 1x1: it has no spatial information (choose an earlier "
            "target layer)"
        )
    if weights.numel() and not bool(weights.detach().ne(0).any()):
        return "every channel weight is zero: the explained score does not change with the target layer"
    if not bool(raw.detach().ne(0).any()):
        return (
            "the map is all zeros: the target layer's activations are zero where the weights "
            "are not, or the method's ReLU removed every negative value"
        )
    return "the map is constant over the image: the target layer's maps do not vary in space"


def _item(value: torch.Tensor | str, index: slice | torch.Tensor) -> torch.Tensor | str:
    return value[index] if isinstance(value, torch.Tensor) else value


def _cat(values: list[torch.Tensor | str]) -> torch.Tensor | str:
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.cat(values)  # type: ignore[arg-type]
    return values[0]
