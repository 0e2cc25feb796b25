"""The mu-Lasso of Oramas et al. (eq. 1), solved by spectral projected gradient.

    W* = argmin_W ||X^T W - L^T||_F^2   subject to  ||w_j||_1 <= mu  for every class j

Here ``X`` is ``[N, m]`` (one descriptor per row) and ``L`` ``[N, C]`` one-hot labels, so the
objective is ``||X W - L||_F^2`` with ``W`` ``[m, C]``. Spectral projected gradient (Birgin,
Martinez, Raydan; van den Berg & Friedlander): a Barzilai-Borwein step, the exact Euclidean
projection onto the L1 ball (Duchi et al. 2008), and a non-monotone Armijo line search.
"""

from __future__ import annotations

import torch


def project_l1_ball(values: torch.Tensor, radius: float) -> torch.Tensor:
    """Exact Euclidean projection of every column of ``values`` ``[m, C]`` onto the L1 ball.

    Example:
        >>> project_l1_ball(torch.tensor([[3.0], [1.0]]), 2.0)
        tensor([[2.],
                [0.]])
    """
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    magnitudes = values.abs()
    inside = magnitudes.sum(dim=0) <= radius
    sorted_desc = magnitudes.sort(dim=0, descending=True).values
    cumulative = sorted_desc.cumsum(dim=0) - radius
    index = torch.arange(1, values.shape[0] + 1, dtype=values.dtype, device=values.device)
    positive = sorted_desc - cumulative / index.unsqueeze(1) > 0
    count = positive.sum(dim=0).clamp_min(1)  # rho
    theta = cumulative.gather(0, (count - 1).unsqueeze(0)).squeeze(0) / count.to(values.dtype)
    projected = values.sign() * (magnitudes - theta).clamp_min(0)
    return torch.where(inside, values, projected)


def solve_mu_lasso(
    features: torch.Tensor,
    targets: torch.Tensor,
    mu: float,
    *,
    iterations: int = 2000,
    tolerance: float = 1e-8,
    memory: int = 10,
) -> torch.Tensor:
    """``W`` ``[m, C]`` minimising ``||features W - targets||_F^2`` with ``||w_j||_1 <= mu``.

    Stops when the projected-gradient step ``||P(W - g) - W||_inf`` falls below
    ``tolerance`` (the first-order optimality condition) or after ``iterations``.

    Example:
        >>> w = solve_mu_lasso(torch.eye(2), torch.tensor([[3.0], [1.0]]), 2.0)
        >>> torch.allclose(w, torch.tensor([[2.0], [0.0]]), atol=1e-5)
        True
    """
    if features.dim() != 2 or targets.dim() != 2 or features.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected features [N, m] and targets [N, C], got {tuple(features.shape)} and "
            f"{tuple(targets.shape)}"
        )
    x, y = features.double(), targets.double()

    def objective(w: torch.Tensor) -> torch.Tensor:
        return (x @ w - y).square().sum()

    def gradient(w: torch.Tensor) -> torch.Tensor:
        return 2 * x.T @ (x @ w - y)

    w = project_l1_ball(torch.zeros(x.shape[1], y.shape[1], dtype=x.dtype), mu)
    g = gradient(w)
    history = [float(objective(w))]
    lipschitz = 2 * torch.linalg.matrix_norm(x, ord=2).square().clamp_min(1e-12)
    step = float(1 / lipschitz)
    for _ in range(iterations):
        if (project_l1_ball(w - g, mu) - w).abs().max() < tolerance:
            break
        direction = project_l1_ball(w - step * g, mu) - w
        slope = float((g * direction).sum())
        reference = max(history[-memory:])
        t = 1.0
        while True:  # non-monotone Armijo backtracking
            candidate = w + t * direction
            value = float(objective(candidate))
            if value <= reference + 1e-4 * t * slope or t < 1e-10:
                break
            t *= 0.5
        new_g = gradient(candidate)
        s, r = candidate - w, new_g - g
        curvature = float((s * r).sum())
        step = float((s * s).sum()) / curvature if curvature > 0 else float(1 / lipschitz)
        step = min(max(step, 1e-10), 1e10)  # Barzilai-Borwein (spectral) step
        w, g = candidate, new_g
        history.append(value)
    return w.to(features.dtype)
