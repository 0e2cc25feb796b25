"""Sanity check: cascading model-parameter randomisation (Adebayo et al., NeurIPS 2018).

Taha et al. (supplementary Figs. S5-S6) use it on retrieval networks: re-initialise the
weights from the top layer down, one layer more at each step, explain the same images with
the randomised model, and compare each map with the map of the trained model by Spearman
rank correlation ``rho = 1 - 6 sum_i d_i^2 / (n (n^2 - 1))`` (Pearson correlation of the
ranks; tied values share their average rank). A method whose maps depend on the learned
weights loses the correlation; a map that ignores the model keeps ``rho = 1`` and fails.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from fam_core.metrics._checks import check_maps

MapFunction = Callable[[nn.Module], torch.Tensor]
"""Explains the fixed evaluation images with the given model: ``model -> maps [B, H, W]``.
It must recompute the target from that model (e.g. the prototype's embedding)."""

PASS_THRESHOLD = 0.5
"""A method passes when the mean rank correlation, once every layer is randomised, is below
this value (the maps changed substantially)."""


@dataclass(frozen=True)
class RandomisationResult:
    """Mean Spearman correlation after each cascading step and the verdict.

    ``layers[i]`` is the layer randomised at step ``i`` (together with all before it);
    ``correlations[i]`` the mean rank correlation with the trained model's maps.
    """

    layers: tuple[str, ...]
    correlations: tuple[float, ...]
    threshold: float

    @property
    def final_correlation(self) -> float:
        return self.correlations[-1]

    @property
    def passed(self) -> bool:
        return self.final_correlation < self.threshold


def rank(values: torch.Tensor) -> torch.Tensor:
    """Ranks ``[B, n]`` (1-based) of each row of ``values`` ``[B, n]``; ties get their average.

    Example:
        >>> rank(torch.tensor([[0.5, 0.1, 0.5, 0.9]]))
        tensor([[2.5000, 1.0000, 2.5000, 4.0000]], dtype=torch.float64)
    """
    batch, count = values.shape
    sorted_values, order = torch.sort(values, dim=1, stable=True)
    new_group = torch.ones_like(sorted_values, dtype=torch.long)
    new_group[:, 1:] = (sorted_values[:, 1:] != sorted_values[:, :-1]).long()
    group = new_group.cumsum(dim=1) - 1 + count * torch.arange(batch, device=values.device)[:, None]
    positions = torch.arange(1, count + 1, device=values.device, dtype=torch.float64).expand(
        batch, count
    )
    sums = torch.zeros(batch * count, dtype=torch.float64, device=values.device)
    sizes = torch.zeros_like(sums)
    sums.scatter_add_(0, group.flatten(), positions.flatten())
    sizes.scatter_add_(0, group.flatten(), torch.ones_like(positions).flatten())
    average = (sums / sizes.clamp_min(1))[group]
    ranks = torch.empty_like(average)
    return ranks.scatter_(1, order, average)


def spearman(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation ``[B]`` of maps ``[B, H, W]`` (or ``[B, n]``) pairwise.

    A constant map has no ranking: two constant maps correlate 1 when equal, else 0; a
    constant map against a varying one correlates 0.

    Example:
        >>> a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        >>> spearman(a, a ** 3), spearman(a, -a)
        (tensor([1.]), tensor([-1.]))
    """
    if first.shape != second.shape or first.dim() < 2:
        raise ValueError(
            f"spearman needs two batches of the same shape, got {tuple(first.shape)} "
            f"and {tuple(second.shape)}"
        )
    a, b = rank(first.flatten(1)), rank(second.flatten(1).to(first.device))
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    norm = a.norm(dim=1) * b.norm(dim=1)
    rho = (a * b).sum(dim=1) / norm.clamp_min(1e-300)
    both_constant = (a.norm(dim=1) == 0) & (b.norm(dim=1) == 0)
    equal = (first.flatten(1) == second.flatten(1).to(first.device)).all(dim=1)
    fallback = (both_constant & equal).to(rho.dtype)
    return torch.where(norm > 0, rho, fallback).float()


def cascade_layers(model: nn.Module) -> list[str]:
    """Top-level children that hold parameters, from the output back to the input."""
    names = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    if not names:
        raise ValueError("the model has no top-level layer with parameters to randomise")
    return names[::-1]


def randomise_(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise every convolution / linear weight (and bias) of ``module`` in place.

    Weights are drawn from PyTorch's default (Kaiming-uniform) initialisation with ``generator``;
    normalisation layers keep their statistics and affine parameters so activations keep their
    range, as in Adebayo et al.'s cascading randomisation.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        for sub in module.modules():
            if isinstance(sub, _NormBase):
                continue
            if isinstance(sub, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
                sub.reset_parameters()


@torch.no_grad()
def cascading_randomisation(
    model: nn.Module,
    explain: MapFunction,
    *,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    threshold: float = PASS_THRESHOLD,
) -> RandomisationResult:
    """Run the cascading randomisation test on a copy of ``model`` (the model is unchanged).

    Args:
        model: the trained model.
        explain: ``model -> maps [B, H, W]`` for a fixed batch of images (see :data:`MapFunction`).
        layers: names of top-level children to randomise, top first (default:
            :func:`cascade_layers`).
        seed: seed of the re-initialisation.
        threshold: pass when the final mean correlation is below it.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> model, x = conv4().eval(), torch.rand(2, 3, 84, 84)
        >>> ignores_model = lambda m: x.mean(dim=1)
        >>> cascading_randomisation(model, ignores_model).passed
        False
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    names = list(cascade_layers(model) if layers is None else layers)
    children = dict(model.named_children())
    unknown = [n for n in names if n not in children]
    if unknown or not names:
        raise ValueError(f"unknown layers {unknown}; expected names from {list(children)}")
    with torch.enable_grad():
        reference = check_maps(explain(model)).detach()
    randomised = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    correlations = []
    for name in names:
        randomise_(randomised.get_submodule(name), generator)
        with torch.enable_grad():
            maps = check_maps(explain(randomised)).detach()
        correlations.append(float(spearman(reference, maps).mean()))
    return RandomisationResult(tuple(names), tuple(correlations), threshold)
