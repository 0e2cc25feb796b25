"""Target sensitivity: does the map show the object that made THIS match?

A scene holds ``P`` objects (flowers) with one region each (its discriminative part); the
query scene is explained against the reference of one object. The metrics below read, per
map, the share of energy (FAM eq. 19) and the pointing hit on every object's region, and
split them into the matched object and the others. A map that ignores the target scores
the same whichever reference it explains, which :func:`target_sensitivity` measures by
explaining the same scene against every object's reference in turn:

    gap(s)  = mean_j ( E_j(L_j) - mean_{k != j} E_k(L_j) )     energy on the referenced part
                                                               minus mean energy on the others
    rho(s)  = mean_{j < k} Spearman(L_j, L_k)                  rank correlation between maps

where ``L_j`` is the map of the scene explained against object ``j``'s reference and
``E_k(L)`` the share of ``L``'s energy in object ``k``'s region. A target-blind map has
``gap = 0`` on average and ``rho = 1``.

Example:
    >>> maps = torch.zeros(1, 2, 2, 4)
    >>> maps[0, 0, :, :2], maps[0, 1, :, 2:] = 1.0, 1.0  # each map lights its own object
    >>> boxes = torch.tensor([[[0, 0, 2, 2], [2, 0, 4, 2]]])
    >>> gap, rho = target_sensitivity(maps, boxes, torch.tensor([[True, True]]))
    >>> gap, rho
    (tensor([1.]), tensor([-1.]))
"""

from __future__ import annotations

import torch

from fam_core.metrics._checks import check_maps
from fam_core.metrics.localisation import energy_pointing_proportion, pointing_game
from fam_core.metrics.sanity import spearman

__all__ = ["matched_and_others", "part_hits", "part_shares", "target_sensitivity"]


def part_shares(maps: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Share of each map's energy in each object's region (eq. 19 per object), ``[B, P]``.

    Args:
        maps: ``[B, H, W]`` non-negative maps.
        regions: ``[B, P, 4]`` boxes ``(x0, y0, x1, y1)`` or ``[B, P, H, W]`` bool masks.

    Example:
        >>> maps = torch.tensor([[[1.0, 3.0]]])
        >>> part_shares(maps, torch.tensor([[[0, 0, 1, 1], [1, 0, 2, 1]]]))
        tensor([[0.2500, 0.7500]])
    """
    maps, regions = _check(maps, regions)
    objects = regions.shape[1]
    repeated = maps.repeat_interleave(objects, dim=0)
    return energy_pointing_proportion(repeated, regions.flatten(0, 1)).view(-1, objects)


def part_hits(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pointing-game hit (1.0 or 0.0) of each map on each object's mask, ``[B, P]``.

    Example:
        >>> maps = torch.tensor([[[1.0, 3.0]]])
        >>> masks = torch.tensor([[[[True, False]], [[False, True]]]])
        >>> part_hits(maps, masks)
        tensor([[0., 1.]])
    """
    maps, masks = _check(maps, masks)
    objects = masks.shape[1]
    repeated = maps.repeat_interleave(objects, dim=0)
    return pointing_game(repeated, masks.flatten(0, 1)).view(-1, objects)


def matched_and_others(
    values: torch.Tensor, matched: torch.Tensor, present: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-object values ``[B, P]`` into the matched object's ``[B]`` and the mean over
    the other present objects ``[B]`` (objects with ``present`` False are padding).

    Example:
        >>> values = torch.tensor([[0.5, 0.1, 0.3, 9.0]])
        >>> matched_and_others(values, torch.tensor([0]), torch.tensor([[True, True, True, False]]))
        (tensor([0.5000]), tensor([0.2000]))
    """
    present = _check_present(present, values.shape)
    matched = torch.as_tensor(matched, device=values.device).long().flatten()
    if matched.shape != (values.shape[0],):
        raise ValueError(f"matched must be [{values.shape[0]}] object indices, got {matched.shape}")
    if (matched < 0).any() or (matched >= values.shape[1]).any():
        raise ValueError(f"matched indices must lie in [0, {values.shape[1]})")
    rows = torch.arange(values.shape[0], device=values.device)
    if not present[rows, matched].all():
        raise ValueError("every matched object must be present")
    others = present.clone()
    others[rows, matched] = False
    if not others.any(dim=1).all():
        raise ValueError("every row needs at least one other present object")
    mean_others = (values * others).sum(dim=1) / others.sum(dim=1)
    return values[rows, matched], mean_others


def target_sensitivity(
    maps: torch.Tensor, regions: torch.Tensor, present: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gap [S], rho [S])`` of each scene (module docstring).

    Args:
        maps: ``[S, P, H, W]``: ``maps[s, j]`` explains scene ``s`` against object ``j``'s
            reference (rows of absent objects are ignored).
        regions: ``[S, P, 4]`` boxes or ``[S, P, H, W]`` bool masks of the objects.
        present: ``[S, P]`` bool, at least two objects per scene.

    Example:
        >>> same = torch.rand(1, 1, 3, 3).expand(1, 3, 3, 3)  # a target-blind method
        >>> boxes = torch.tensor([[[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3]]])
        >>> gap, rho = target_sensitivity(same, boxes, torch.ones(1, 3, dtype=torch.bool))
        >>> gap.abs().item() < 1e-6, rho.item()
        (True, 1.0)
    """
    if not isinstance(maps, torch.Tensor) or maps.dim() != 4:
        raise ValueError("maps must be a tensor [S, P, H, W]: scene s explained against object j")
    scenes, objects = maps.shape[:2]
    present = _check_present(present, (scenes, objects))
    if (present.sum(dim=1) < 2).any():
        raise ValueError("every scene needs at least two present objects")
    if regions.shape[:2] != (scenes, objects):
        raise ValueError(
            f"regions must start with [S, P] = {(scenes, objects)}, got {regions.shape}"
        )
    flat = maps.flatten(0, 1)  # [S*P, H, W], row s*P + j
    shares = part_shares(flat, regions.repeat_interleave(objects, dim=0)).view(
        scenes, objects, objects
    )  # [s, j (reference), k (region)]
    gaps = torch.zeros(scenes, objects, device=maps.device)
    for j in range(objects):
        rows = present[:, j]
        if rows.any():
            matched = torch.full((int(rows.sum()),), j, device=maps.device)
            own, others = matched_and_others(shares[rows, j], matched, present[rows])
            gaps[rows, j] = own - others
    gap = (gaps * present).sum(dim=1) / present.sum(dim=1)
    pairs = torch.zeros(scenes, device=maps.device)
    total = torch.zeros(scenes, device=maps.device)
    for j in range(objects):
        for k in range(j + 1, objects):
            both = present[:, j] & present[:, k]
            if both.any():
                pairs[both] += spearman(maps[both, j], maps[both, k]).to(pairs.device)
                total[both] += 1
    return gap, pairs / total


def _check(maps: torch.Tensor, regions: object) -> tuple[torch.Tensor, torch.Tensor]:
    maps = check_maps(maps)
    if not isinstance(regions, torch.Tensor) or regions.dim() not in (3, 4):
        raise ValueError("regions must be boxes [B, P, 4] or bool masks [B, P, H, W]")
    if regions.shape[0] != maps.shape[0]:
        raise ValueError(f"regions are for {regions.shape[0]} maps, got {maps.shape[0]} maps")
    return maps, regions


def _check_present(present: object, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    if not isinstance(present, torch.Tensor) or present.dtype != torch.bool:
        raise TypeError("present must be a bool tensor [B, P]")
    if tuple(present.shape) != tuple(shape):
        raise ValueError(f"present must be {tuple(shape)}, got {tuple(present.shape)}")
    return present
