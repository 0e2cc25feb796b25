"""Input validation shared by the metric modules."""

from __future__ import annotations

import torch


def check_maps(maps: object, name: str = "maps") -> torch.Tensor:
    """A batch of heatmaps ``[B, H, W]`` of floats."""
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, H, W], got {type(maps).__name__}")
    if maps.dim() != 3:
        raise ValueError(f"{name} must be [B, H, W], got shape {tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {maps.dtype}")
    if maps.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch: expected at least one map")
    return maps


def check_masks(masks: object, maps: torch.Tensor, name: str = "masks") -> torch.Tensor:
    """Boolean masks ``[B, H, W]`` matching ``maps``."""
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, H, W], got {type(masks).__name__}")
    if masks.shape != maps.shape:
        raise ValueError(
            f"{name} must have the shape of the maps {tuple(maps.shape)}, got {tuple(masks.shape)}"
        )
    if masks.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {masks.dtype}")
    return masks.to(maps.device)


def check_boxes(boxes: object, batch: int, name: str = "boxes") -> torch.Tensor:
    """Integer boxes ``[B, 4]`` as ``(x0, y0, x1, y1)`` with exclusive ends."""
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, 4], got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape != (batch, 4):
        raise ValueError(f"{name} must be [{batch}, 4] (x0, y0, x1, y1), got {tuple(boxes.shape)}")
    if boxes.is_floating_point() or boxes.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer pixel coordinates, got {boxes.dtype}")
    return boxes.long()


def check_scores(scores: object, name: str) -> torch.Tensor:
    """A vector of scores ``[N]``."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N], got {type(scores).__name__}")
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"{name} must be a non-empty vector [N], got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {scores.dtype}")
    return scores
