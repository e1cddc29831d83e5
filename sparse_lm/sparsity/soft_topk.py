"""Spartan's soft top-k over blocks (docs/design/spartan.md): the entropy-regularised transport relaxation
of "keep the best blocks within a cost budget", with its gradient by implicit differentiation.

For block values u (Σ|θ| per cost unit), costs c and a budget k, the soft mask is
mⱼ = σ(β·uⱼ + μ), with the scalar μ the unique value where Σⱼ cⱼ mⱼ = k (the threshold τ of the
paper's σ(β(u − τ) + μ) is folded into μ: only their combination is determined). Σ cⱼ mⱼ grows
monotonically with μ, so μ is found by safeguarded Newton steps on a bracket — the same point
Spartan's log-space Sinkhorn reaches, in a handful of iterations instead of up to a hundred. With a
process group (blocks of one budget spread over tensor/pipeline ranks), each iteration all-reduces
two numbers, Σ c m and its derivative Σ c s, never the blocks.

Backward: differentiating Σ cⱼ mⱼ(u, μ(u)) = k gives ∂μ/∂uₗ = −β cₗ sₗ / Σ cᵢ sᵢ with
sⱼ = mⱼ(1 − mⱼ), hence for an upstream gradient g:
∂L/∂uₗ = β sₗ (gₗ − cₗ · Σⱼ gⱼ sⱼ / Σᵢ cᵢ sᵢ) — two more all-reduced sums under a group.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

NEWTON_STEPS = 60
TOLERANCE = 1e-12  # relative, on Σ c m − k (looser lets the μ error drift two runs apart under Adam)


def _sums(values: list[torch.Tensor], group) -> list[float]:
    total = torch.stack([v.double() for v in values])
    if group is not None:
        dist.all_reduce(total, group=group)
    return total.tolist()


def solve_offset(u: torch.Tensor, c: torch.Tensor, k: float, beta: float, group=None) -> float:
    """μ with Σ c·σ(β u + μ) = k over all ranks of `group` (identical on every rank).

    Requires 0 < k < Σ c (a budget of nothing or everything has no finite μ)."""
    z = beta * u.double()
    c = c.double()
    z_lo, z_hi = _extremes(z, group)
    total = _sums([c.sum()], group)[0]
    if not 0 < k < total:
        raise ValueError(f"budget k={k} must lie strictly between 0 and the total cost {total}")
    # σ(z + μ) ≥ σ(z_lo + μ) for every block, so μ ≤ logit(k/total) − z_lo; symmetric bound below.
    target = math.log(k / (total - k))
    lo, hi = target - z_hi, target - z_lo
    mu = 0.5 * (lo + hi)
    for _ in range(NEWTON_STEPS):
        m = torch.sigmoid(z + mu)
        mass, slope = _sums([(c * m).sum(), (c * m * (1 - m)).sum()], group)
        excess = mass - k
        if abs(excess) <= TOLERANCE * k:
            break
        if excess > 0:
            hi = mu
        else:
            lo = mu
        step = mu - excess / slope if slope > 0 else math.nan
        mu = step if lo < step < hi else 0.5 * (lo + hi)  # Newton inside the bracket, else bisect
    return mu


def _extremes(z: torch.Tensor, group) -> tuple[float, float]:
    """(min, max) of z over the group."""
    both = torch.tensor([-z.min().item() if z.numel() else -math.inf, z.max().item() if z.numel() else -math.inf],
                        dtype=torch.float64, device=z.device)
    if group is not None:
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return -float(both[0]), float(both[1])


class SoftTopK(torch.autograd.Function):
    """m = soft_topk(u, c, k, β[, group]): the soft mask, with the implicit gradient in backward."""

    @staticmethod
    def forward(ctx, u, c, k, beta, group=None):
        mu = solve_offset(u.detach(), c, k, beta, group)
        m = torch.sigmoid(beta * u.double() + mu).to(u.dtype)
        ctx.save_for_backward(m, c)
        ctx.beta, ctx.group = beta, group
        return m

    @staticmethod
    def backward(ctx, grad):
        m, c = ctx.saved_tensors
        s = (m * (1 - m)).double()
        g = grad.double()
        gs, cs = _sums([(g * s).sum(), (c.double() * s).sum()], ctx.group)
        # Every mⱼ saturated to exactly 0 or 1 (a gap in u wider than ~37/β around the threshold):
        # s = 0 everywhere, and so is the gradient.
        grad_u = ctx.beta * s * (g - c.double() * (gs / cs if cs > 0 else 0.0))
        return grad_u.to(grad.dtype), None, None, None, None


def soft_topk(u: torch.Tensor, c: torch.Tensor, k: float, beta: float, group=None) -> torch.Tensor:
    return SoftTopK.apply(u, c, k, beta, group)
