"""Spartan's soft top-k: the budget holds, the implicit gradient equals autograd through the
unrolled solver, and a budget shared by several ranks gives the single-process answer."""

from __future__ import annotations

import torch

from sparse_lm.sparsity.soft_topk import soft_topk, solve_offset
from tests.distributed import run_distributed


def _case(n=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    c = torch.randint(1, 5, (n,), generator=gen).double()  # unequal block costs
    return u, c, 0.3 * float(c.sum())


def test_budget_is_met_and_large_beta_approaches_the_hard_selection():
    u, c, k = _case()
    for beta in (1.0, 10.0, 200.0):
        m = soft_topk(u, c, k, beta)
        assert abs(float((c * m).sum()) - k) <= 1e-8 * k
        assert torch.all((m >= 0) & (m <= 1))
    order = torch.argsort(u, descending=True)  # hard: best unit values until the budget is spent
    hard = torch.zeros_like(u)
    hard[order[torch.cumsum(c[order], 0) <= k]] = 1
    assert float((m - hard).abs().mean()) < 0.02


def _unrolled(u, c, k, beta, steps=40):
    """μ by Newton iterations kept whole in the autograd graph, from a start that does not depend
    on u (found by bisection without a graph): the reference for the implicit gradient."""
    z = beta * u
    with torch.no_grad():
        lo, hi = -50.0 - float(z.max()), 50.0 - float(z.min())
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if float((c * torch.sigmoid(z + mid)).sum()) > k else (mid, hi)
    mu = torch.tensor(0.5 * (lo + hi) + 0.5, dtype=u.dtype)  # a little off: the iterations must do work
    for _ in range(steps):
        m = torch.sigmoid(z + mu)
        mu = mu - ((c * m).sum() - k) / (c * m * (1 - m)).sum()
    return torch.sigmoid(z + mu)


def test_implicit_gradient_matches_autograd_through_the_solver():
    u, c, k = _case(n=50, seed=3)
    g = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    for beta in (2.0, 15.0):
        a = u.clone().requires_grad_(True)
        (soft_topk(a, c, k, beta) * g).sum().backward()
        b = u.clone().requires_grad_(True)
        (_unrolled(b, c, k, beta) * g).sum().backward()
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-9), beta
    assert torch.autograd.gradcheck(lambda x: soft_topk(x, c, k, 5.0), (u.clone().requires_grad_(True),))


def _sharded_body(rank, world, u, c, k, beta, g):
    group = torch.distributed.group.WORLD
    part = slice(rank * len(u) // world, (rank + 1) * len(u) // world)
    x = u[part].clone().requires_grad_(True)
    m = soft_topk(x, c[part], k, beta, group)
    (m * g[part]).sum().backward()
    return m.detach(), x.grad, solve_offset(u[part], c[part], k, beta, group)


def test_a_budget_shared_by_ranks_matches_one_process():
    u, c, k = _case(n=120, seed=4)
    g = torch.randn(120, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x = u.clone().requires_grad_(True)
    m = soft_topk(x, c, k, 8.0)
    (m * g).sum().backward()
    for world in (2, 4):
        results = run_distributed(_sharded_body, world, u, c, k, 8.0, g, timeout=60)
        assert len({mu for _, _, mu in results}) == 1  # every rank solves the same μ
        assert torch.allclose(torch.cat([r[0] for r in results]), m.detach(), rtol=1e-9, atol=1e-12)
        assert torch.allclose(torch.cat([r[1] for r in results]), x.grad, rtol=1e-9, atol=1e-12)


def test_saturated_mask_has_zero_gradient_not_a_division_by_zero():
    """A gap in u around the threshold far wider than 1/β: every mⱼ is exactly 0 or 1 in float64."""
    u = torch.tensor([0.0, 0.1, 5.0, 5.1], dtype=torch.float64, requires_grad=True)
    m = soft_topk(u, torch.ones(4, dtype=torch.float64), 2.0, 1000.0)
    assert m.tolist() == [0.0, 0.0, 1.0, 1.0]
    m.sum().backward()
    assert u.grad.tolist() == [0.0, 0.0, 0.0, 0.0]
