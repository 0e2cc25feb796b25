"""mu-Lasso: exact L1-ball projection; solutions satisfy the constraint and the KKT conditions."""

from __future__ import annotations

import torch

from fam_core.explainers.relevant.mu_lasso import project_l1_ball, solve_mu_lasso


def test_projection_by_hand_and_against_its_optimality():
    v = torch.tensor([[3.0, 0.5], [-1.0, 0.2], [0.5, -0.1]])
    p = project_l1_ball(v, 2.0)
    # column 0: theta = 1 -> (2, 0, 0); column 1 is inside the ball and unchanged
    assert torch.allclose(p[:, 0], torch.tensor([2.0, 0.0, 0.0]))
    assert torch.equal(p[:, 1], v[:, 1])
    # |v| = (3, 2, 1.5), radius 4: theta = (6.5 - 4) / 3 -> (2.1667, 1.1667, 0.6667)
    q = project_l1_ball(torch.tensor([[3.0], [-2.0], [1.5]]), 4.0)
    assert torch.allclose(q.flatten(), torch.tensor([3 - 5 / 6, -(2 - 5 / 6), 1.5 - 5 / 6]))
    assert torch.isclose(q.abs().sum(), torch.tensor(4.0))


def test_orthonormal_design_has_the_projection_as_answer():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.3, 0.2]])
    w = solve_mu_lasso(torch.eye(4), targets, mu=1.5)
    assert torch.allclose(w, project_l1_ball(targets, 1.5), atol=1e-6)


def test_random_problem_satisfies_constraint_and_kkt():
    torch.manual_seed(0)
    x = torch.randn(30, 12).double()
    y = torch.nn.functional.one_hot(torch.randint(0, 3, (30,)), 3).double()
    mu = 0.8
    w = solve_mu_lasso(x, y, mu, iterations=5000, tolerance=1e-12)
    assert (w.abs().sum(dim=0) <= mu + 1e-9).all()
    g = 2 * x.T @ (x @ w - y)
    for j in range(3):
        column, grad = w[:, j], g[:, j]
        active = column.abs() > 1e-9
        if column.abs().sum() < mu - 1e-6:  # interior: the gradient vanishes
            assert grad.abs().max() < 1e-5
            continue
        # on the sphere: -g_i = lambda sign(w_i) on the support, |g_i| <= lambda elsewhere
        lam = (-grad[active] * column[active].sign()).mean()
        assert lam > 0
        assert torch.allclose(
            -grad[active] * column[active].sign(), lam.expand(int(active.sum())), atol=1e-5
        )
        assert (grad[~active].abs() <= lam + 1e-5).all()
    # a solution with a much larger mu (unconstrained least squares) fits better
    free = solve_mu_lasso(x, y, 1e3, iterations=5000)
    assert (x @ free - y).square().sum() < (x @ w - y).square().sum()
