"""Localisation metrics: does the map point at the discriminative region?

From FAM (Liao et al.), section V-B, and An8Flower (Oramas et al., ICLR 2019), section 4.3:

- :func:`energy_pointing_proportion` -- energy-based pointing game, eq. 19;
- :func:`box_iou` -- IoU of the box estimated from the map with the ground-truth box, eq. 20;
- :func:`pointing_game` -- the plain pointing game (the maximum falls in the region);
- :func:`mask_iou_curve` / :func:`area_under_iou_curve` -- pixel IoU with the ground-truth mask
  over a sweep of thresholds and the area under that curve (An8Flower, Table 1).

Every function is batched: maps ``[B, H, W]`` in, one value per map ``[B]`` out (curves
``[B, T]``), on the maps' device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fam_core.metrics._checks import check_boxes, check_maps, check_masks

BOX_THRESHOLD = 0.2
"""Fraction of the map's maximum used to binarise it before boxing (eq. 20, following CAM)."""

IOU_THRESHOLDS = tuple(i / 20 for i in range(21))
"""Default sweep of :func:`mask_iou_curve`: 0, 0.05, ..., 1 on min-max normalised maps."""


def boxes_to_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boolean masks ``[B, H, W]`` of boxes ``[B, 4]`` ``(x0, y0, x1, y1)``, ends exclusive.

    Example:
        >>> boxes_to_masks(torch.tensor([[1, 0, 3, 2]]), 3, 4).int()[0]
        tensor([[0, 1, 1, 0],
                [0, 1, 1, 0],
                [0, 0, 0, 0]], dtype=torch.int32)
    """
    boxes = check_boxes(boxes, boxes.shape[0] if isinstance(boxes, torch.Tensor) else 0)
    ys = torch.arange(height, device=boxes.device).view(1, height, 1)
    xs = torch.arange(width, device=boxes.device).view(1, 1, width)
    x0, y0, x1, y1 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


def energy_pointing_proportion(maps: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Share of the map's energy inside the ground-truth region, eq. 19.

    ``Proportion = sum_{(i,j) in bbox} norm(up(L))_ij / sum_{(i,j) in image} norm(up(L))_ij``

    Args:
        maps: ``[B, H, W]`` non-negative maps at input resolution (``Explanation.maps``).
        regions: ``[B, 4]`` integer boxes ``(x0, y0, x1, y1)`` (the paper's bbox) or
            ``[B, H, W]`` boolean masks.

    Returns:
        ``[B]`` proportions in ``[0, 1]``; a map without energy scores 0.

    Example:
        >>> mask = torch.zeros(1, 4, 4, dtype=torch.bool); mask[0, :2] = True
        >>> energy_pointing_proportion(mask.float(), mask)
        tensor([1.])
    """
    maps = check_maps(maps)
    region = _as_region(regions, maps)
    if (maps < 0).any():
        raise ValueError("maps must be non-negative for the energy pointing game (eq. 19)")
    inside = (maps * region).flatten(1).sum(dim=1)
    total = maps.flatten(1).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(1e-12), torch.zeros_like(total))


def pointing_game(maps: torch.Tensor, regions: torch.Tensor, *, tolerance: int = 0) -> torch.Tensor:
    """Hit (1.0) when the map's maximum lies in the region (within ``tolerance`` pixels), else 0.

    Ties take the first maximum in row-major order. ``[B]`` float tensor; its mean is the
    pointing-game accuracy.

    Example:
        >>> maps = torch.zeros(2, 3, 3); maps[0, 0, 0] = 1; maps[1, 2, 2] = 1
        >>> mask = torch.zeros(2, 3, 3, dtype=torch.bool); mask[:, 0, 0] = True
        >>> pointing_game(maps, mask)
        tensor([1., 0.])
    """
    maps = check_maps(maps)
    region = _as_region(regions, maps)
    if not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"tolerance must be an int >= 0 pixels, got {tolerance!r}")
    if tolerance:
        size = 2 * tolerance + 1
        region = F.max_pool2d(region.float().unsqueeze(1), size, 1, tolerance).squeeze(1) > 0
    peak = maps.flatten(1).argmax(dim=1)
    return region.flatten(1).gather(1, peak.unsqueeze(1)).squeeze(1).float()


def connected_components(binary: torch.Tensor) -> torch.Tensor:
    """Label 8-connected components of boolean images ``[B, H, W]``, in torch.

    Background is 0; each component gets the largest ``1 + flat pixel index`` it contains
    (labels are not consecutive). Labels spread by 3x3 max-pooling restricted to the
    foreground until nothing changes.

    Example:
        >>> x = torch.tensor([[[1, 0, 1], [1, 0, 0], [0, 0, 1]]], dtype=torch.bool)
        >>> connected_components(x)
        tensor([[[4, 0, 3],
                 [4, 0, 0],
                 [0, 0, 9]]])
    """
    if not isinstance(binary, torch.Tensor) or binary.dim() != 3 or binary.dtype != torch.bool:
        raise TypeError("connected_components takes a bool tensor [B, H, W]")
    batch, height, width = binary.shape
    index = torch.arange(1, height * width + 1, device=binary.device, dtype=torch.float64)
    labels = torch.where(binary, index.view(1, height, width), 0.0).unsqueeze(1)
    foreground = binary.unsqueeze(1)
    for _ in range(height * width):
        grown = torch.where(foreground, F.max_pool2d(labels, 3, 1, 1), 0.0)
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.squeeze(1).long()


def largest_component_boxes(binary: torch.Tensor) -> torch.Tensor:
    """Box ``[B, 4]`` ``(x0, y0, x1, y1)`` (ends exclusive) of each image's largest component.

    Among equally large components the one with the smallest label wins; an empty image
    gives the empty box ``(0, 0, 0, 0)``.

    Example:
        >>> x = torch.zeros(1, 5, 5, dtype=torch.bool); x[0, 1:3, 1:4] = True; x[0, 4, 4] = True
        >>> largest_component_boxes(x)
        tensor([[1, 1, 4, 3]])
    """
    labels = connected_components(binary)
    batch, height, width = labels.shape
    flat = labels.flatten(1)
    counts = torch.zeros(batch, height * width + 1, device=labels.device, dtype=torch.long)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    counts[:, 0] = 0
    best = counts.argmax(dim=1)  # first (smallest) label among the largest
    chosen = (labels == best.view(-1, 1, 1)) & (best.view(-1, 1, 1) > 0)
    rows, cols = chosen.any(dim=2), chosen.any(dim=1)
    y0 = rows.to(torch.int8).argmax(dim=1)
    x0 = cols.to(torch.int8).argmax(dim=1)
    y1 = height - rows.flip(1).to(torch.int8).argmax(dim=1)
    x1 = width - cols.flip(1).to(torch.int8).argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    return torch.where(chosen.flatten(1).any(dim=1, keepdim=True), boxes, 0)


def estimated_boxes(maps: torch.Tensor, threshold: float = BOX_THRESHOLD) -> torch.Tensor:
    """The box estimated from a map (eq. 20): binarise at ``threshold * max``, box the
    largest connected component. ``[B, 4]``.

    Example:
        >>> m = torch.zeros(1, 6, 6); m[0, 1:3, 2:5] = 1.0; m[0, 5, 0] = 0.1
        >>> estimated_boxes(m)
        tensor([[2, 1, 5, 3]])
    """
    maps = check_maps(maps)
    _check_fraction(threshold, "threshold")
    peak = maps.flatten(1).amax(dim=1).view(-1, 1, 1)
    return largest_component_boxes((maps >= threshold * peak) & (peak > 0))


def box_iou(
    maps: torch.Tensor, boxes: torch.Tensor, *, threshold: float = BOX_THRESHOLD
) -> torch.Tensor:
    """IoU of the estimated box with the ground-truth box, eq. 20.

    ``IoU = sum_{(i,j) in bbox_e ∩ bbox_g} 1 / sum_{(i,j) in bbox_e ∪ bbox_g} 1``, where
    ``bbox_e`` boxes the largest connected component of ``map >= threshold * max(map)``
    (threshold 0.2 as in the paper, following CAM).

    Args:
        maps: ``[B, H, W]`` maps.
        boxes: ``[B, 4]`` ground-truth boxes ``(x0, y0, x1, y1)``, ends exclusive.
        threshold: fraction of the maximum used to binarise.

    Returns:
        ``[B]`` IoU in ``[0, 1]``.

    Example:
        >>> m = torch.zeros(1, 8, 8); m[0, 2:6, 2:6] = 1.0
        >>> box_iou(m, torch.tensor([[2, 2, 6, 6]]))
        tensor([1.])
    """
    maps = check_maps(maps)
    truth = check_boxes(boxes, maps.shape[0]).to(maps.device)
    return boxes_iou(estimated_boxes(maps, threshold), truth)


def boxes_iou(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Pixel IoU of pairs of boxes ``[B, 4]`` (ends exclusive); two empty boxes give 0.

    Example:
        >>> boxes_iou(torch.tensor([[0, 0, 2, 2]]), torch.tensor([[1, 0, 3, 2]]))
        tensor([0.3333])
    """
    first, second = first.long(), second.long()
    width = torch.minimum(first[:, 2], second[:, 2]) - torch.maximum(first[:, 0], second[:, 0])
    height = torch.minimum(first[:, 3], second[:, 3]) - torch.maximum(first[:, 1], second[:, 1])
    inter = width.clamp_min(0) * height.clamp_min(0)
    union = _area(first) + _area(second) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), 0.0).float()


def mask_iou_curve(
    maps: torch.Tensor,
    masks: torch.Tensor,
    thresholds: tuple[float, ...] | torch.Tensor = IOU_THRESHOLDS,
) -> torch.Tensor:
    """Pixel IoU of ``{map >= t}`` with the ground-truth mask for each threshold ``t``.

    ``IoU(t) = |{map >= t} ∩ M| / |{map >= t} ∪ M|`` (An8Flower, section 4.3). Maps are
    expected min-max normalised to ``[0, 1]`` as every explainer returns them.

    Returns:
        ``[B, T]`` IoU per map and threshold.

    Example:
        >>> mask = torch.zeros(1, 4, 4, dtype=torch.bool); mask[0, 1:3, 1:3] = True
        >>> mask_iou_curve(mask.float(), mask, (0.0, 0.5, 1.0))
        tensor([[0.2500, 1.0000, 1.0000]])
    """
    maps = check_maps(maps)
    masks = check_masks(masks, maps)
    levels = _thresholds(thresholds, maps)
    binary = maps.unsqueeze(1) >= levels.view(1, -1, 1, 1)  # [B, T, H, W]
    truth = masks.unsqueeze(1)
    inter = (binary & truth).flatten(2).sum(dim=2)
    union = (binary | truth).flatten(2).sum(dim=2)
    return torch.where(union > 0, inter / union.clamp_min(1), 0.0).float()


def area_under_iou_curve(
    maps: torch.Tensor,
    masks: torch.Tensor,
    thresholds: tuple[float, ...] | torch.Tensor = IOU_THRESHOLDS,
) -> torch.Tensor:
    """Area under the IoU curve of :func:`mask_iou_curve` (trapezoid rule), ``[B]``.

    ``AUC = sum_k (t_{k+1} - t_k) (IoU(t_k) + IoU(t_{k+1})) / 2``; with the default sweep over
    ``[0, 1]`` it lies in ``[0, 1]`` (An8Flower reports it in percent, Table 1).

    Example:
        >>> mask = torch.zeros(1, 4, 4, dtype=torch.bool); mask[0, 1:3, 1:3] = True
        >>> area_under_iou_curve(mask.float(), mask, (0.0, 1.0))
        tensor([0.6250])
    """
    maps = check_maps(maps)
    levels = _thresholds(thresholds, maps)
    curve = mask_iou_curve(maps, masks, levels)
    return torch.trapezoid(curve, levels.to(curve.dtype), dim=1)


def _thresholds(thresholds: tuple[float, ...] | torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    levels = torch.as_tensor(thresholds, dtype=maps.dtype, device=maps.device).flatten()
    if levels.numel() < 2 or not bool((levels[1:] > levels[:-1]).all()):
        raise ValueError(
            f"thresholds must be at least two strictly increasing values, got {thresholds!r}"
        )
    return levels


def _as_region(regions: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    if isinstance(regions, torch.Tensor) and regions.dim() == 2:
        boxes = check_boxes(regions, maps.shape[0], "regions")
        return boxes_to_masks(boxes, maps.shape[1], maps.shape[2]).to(maps.device)
    return check_masks(regions, maps, "regions")


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)


def _check_fraction(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
