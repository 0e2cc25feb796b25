"""Target-sensitivity metrics (fam_core.metrics.target) against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from fam_core.metrics.target import (
    matched_and_others,
    part_hits,
    part_shares,
    target_sensitivity,
)

# a 1x6 strip with three one-pixel-wide-by-two objects: A = cols 0-1, B = cols 2-3, C = cols 4-5
BOXES = torch.tensor([[[0, 0, 2, 1], [2, 0, 4, 1], [4, 0, 6, 1]]])


def _masks() -> torch.Tensor:
    masks = torch.zeros(1, 3, 1, 6, dtype=torch.bool)
    for j in range(3):
        masks[0, j, 0, 2 * j : 2 * j + 2] = True
    return masks


def test_part_shares_by_hand() -> None:
    maps = torch.tensor([[[1.0, 1.0, 2.0, 0.0, 4.0, 2.0]]])  # total 10
    expected = torch.tensor([[0.2, 0.2, 0.6]])
    assert torch.allclose(part_shares(maps, BOXES), expected)
    assert torch.allclose(part_shares(maps, _masks()), expected)  # boxes == masks here


def test_part_hits_by_hand() -> None:
    maps = torch.tensor([[[1.0, 1.0, 2.0, 0.0, 4.0, 2.0]]])
    assert part_hits(maps, _masks()).tolist() == [[0.0, 0.0, 1.0]]


def test_matched_and_others_by_hand() -> None:
    values = torch.tensor([[0.2, 0.2, 0.6], [0.5, 0.1, 7.0]])
    present = torch.tensor([[True, True, True], [True, True, False]])
    own, others = matched_and_others(values, torch.tensor([2, 1]), present)
    assert torch.allclose(own, torch.tensor([0.6, 0.1]))
    assert torch.allclose(others, torch.tensor([0.2, 0.5]))  # padding (7.0) is ignored


def test_target_sensitivity_by_hand() -> None:
    # map against A: energy 3 on A, 1 on B, 0 on C -> shares (.75, .25, 0): own - others = .625
    # map against B: (0, 1, 1) / 2 -> .5 - .25 = .25
    # map against C: (1, 1, 2) / 4 -> .5 - .25 = .25          gap = (.625 + .25 + .25) / 3
    maps = torch.tensor(
        [
            [
                [[3.0, 0.0, 1.0, 0.0, 0.0, 0.0]],
                [[0.0, 0.0, 1.0, 0.0, 0.0, 1.0]],
                [[1.0, 0.0, 0.0, 1.0, 2.0, 0.0]],
            ]
        ]
    )
    present = torch.ones(1, 3, dtype=torch.bool)
    gap, rho = target_sensitivity(maps, BOXES, present)
    assert torch.allclose(gap, torch.tensor([(0.625 + 0.25 + 0.25) / 3]))
    expected = [
        _pearson_of_ranks(maps[0, j, 0], maps[0, k, 0]) for j, k in ((0, 1), (0, 2), (1, 2))
    ]
    assert torch.allclose(rho, torch.tensor([sum(expected) / 3]), atol=1e-6)


def _pearson_of_ranks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman with average ranks for ties, written out independently."""

    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        out = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for t in range(i, j + 1):
                out[order[t]] = (i + j) / 2 + 1
            i = j + 1
        return out

    ra, rb = ranks(a.tolist()), ranks(b.tolist())
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb)


def test_a_target_blind_method_has_zero_gap_and_unit_correlation() -> None:
    blind = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(0)).expand(4, 3, 6, 6)
    boxes = torch.tensor([[0, 0, 2, 6], [2, 0, 4, 6], [4, 0, 6, 6]]).expand(4, 3, 4)
    gap, rho = target_sensitivity(blind.contiguous(), boxes, torch.ones(4, 3, dtype=torch.bool))
    assert torch.allclose(gap, torch.zeros(4), atol=1e-6)  # sum_j (E_j - mean_{k!=j} E_k) = 0
    assert torch.allclose(rho, torch.ones(4))


def test_padding_objects_are_ignored() -> None:
    maps = torch.zeros(1, 3, 1, 6)
    maps[0, 0, 0, 0], maps[0, 1, 0, 2] = 1.0, 1.0  # perfect on A and B
    maps[0, 2] = torch.rand(1, 6)  # the absent object's map: anything
    present = torch.tensor([[True, True, False]])
    gap, rho = target_sensitivity(maps, BOXES, present)
    assert torch.allclose(gap, torch.tensor([1.0]))  # own 1, other present 0
    assert rho.shape == (1,) and rho.item() < 0


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: target_sensitivity(torch.zeros(1, 2, 3), BOXES, torch.ones(1, 3).bool()), "maps"),
        (
            lambda: target_sensitivity(torch.zeros(1, 3, 1, 6), BOXES, torch.tensor([[1, 0, 0]])),
            "bool",
        ),
        (
            lambda: target_sensitivity(
                torch.zeros(1, 3, 1, 6), BOXES, torch.tensor([[True, False, False]])
            ),
            "two present",
        ),
        (
            lambda: matched_and_others(
                torch.zeros(1, 3), torch.tensor([2]), torch.tensor([[True, True, False]])
            ),
            "present",
        ),
        (lambda: part_shares(torch.zeros(1, 1, 6), torch.zeros(2, 3, 4).long()), "regions"),
    ],
)
def test_bad_inputs_are_refused(call, error) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        call()
