"""The oracle for Spartan inside Top-KAST's B (docs/design/spartan.md), written the textbook way: a
dense θ, boolean block masks, the soft mask built from plain tensor operations and differentiated
by autograd, AdamW written out (inherited from the Top-KAST oracle).

Independent of `sparse_lm.sparsity.soft_topk`: μ is found by bisection (no Newton, no implicit
formula) and the gradient comes from autograd through one Newton correction taken from that
root — at a root, the derivative of a Newton step is the implicit derivative, so autograd alone
produces ∂m/∂u here. The schedules are the formulas of `sparse_lm.sparsity.spartan`'s docstring.
"""

from __future__ import annotations

import math

import torch

from tests.reference.dense_topkast import DenseTopKASTLinear


def soft_topk_reference(u: torch.Tensor, k: float, beta: float) -> torch.Tensor:
    """σ(β u + μ) with Σ = k (unit costs), differentiable in u."""
    z = beta * u.double()
    lo, hi = -60.0 - float(z.detach().max()), 60.0 - float(z.detach().min())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(torch.sigmoid(z.detach() + mid).sum()) < k else (lo, mid)
    mu = torch.tensor(0.5 * (lo + hi), dtype=torch.float64)
    m = torch.sigmoid(z + mu)
    mu = mu - (m.sum() - k) / (m * (1 - m)).sum()  # one Newton step from the root: carries dμ/du
    return torch.sigmoid(z + mu)


class DenseSpartanLinear(DenseTopKASTLinear):
    """B by magnitude as in Top-KAST (inherited `select`); A and the soft mask per the schedule."""

    def __init__(self, *args, beta: float, **kwargs):
        super().__init__(*args, **kwargs)
        dtype = torch.get_default_dtype()  # the initialiser gives float32; follow the model's dtype
        self.theta, self.theta0 = self.theta.to(dtype), self.theta0.to(dtype)
        self.exp_avg, self.exp_avg_sq = self.exp_avg.to(dtype), self.exp_avg_sq.to(dtype)
        self.beta_target = beta * self.block
        self.budget = self.k_forward
        self.k_now, self.beta, self.frozen = self.k_backward, 0.0, False

    def block_scores(self, theta: torch.Tensor) -> torch.Tensor:
        b = self.block
        return theta.abs().view(self.grid[0], b, self.grid[1], b).sum(dim=(1, 3)).reshape(-1) / b**2

    def advance(self, progress: float, frozen: bool, repick: bool) -> None:
        self.k_now = round(self.k_backward + (self.budget - self.k_backward) * progress)
        self.beta, self.frozen = self.beta_target * progress, frozen
        if repick:
            in_b = torch.where(self.B, self.block_scores(self.theta), torch.tensor(-1.0))
            self.A = self.top(in_b, self.k_now)

    def soft_blocks(self, theta: torch.Tensor) -> torch.Tensor:
        """Spartan's soft mask per block of the whole grid (0 outside B), differentiable in θ:
        σ(β·u/ū + μ) over B's unit values u, ū their mean, Σ = k_now."""
        scores = self.block_scores(theta)[self.B]
        if self.k_now >= self.k_backward:
            soft_b = torch.ones_like(scores)
        else:
            scale = float(scores.detach().mean())
            soft_b = soft_topk_reference(scores / scale, self.k_now, self.beta).to(theta.dtype)
        return torch.zeros(self.B.numel(), dtype=theta.dtype).masked_scatter(self.B, soft_b)

    def weight(self):
        """(θ as a leaf, the straight-through weight: value θ·1_A, gradient of θ·m)."""
        theta = self.theta.clone().requires_grad_()
        hard = self.blocks_to_dense(self.A).to(theta.dtype)
        if self.frozen:
            return theta, theta * hard
        soft = self.blocks_to_dense(self.soft_blocks(theta))
        return theta, theta * soft + (theta * hard - theta * soft).detach()

    def enter(self, new_B: torch.Tensor) -> None:
        """Make `new_B` the candidate set as a reselection does: blocks that enter start with zero
        moments, blocks that leave return to θ₀ (`regenerate`)."""
        entering, leaving = self.blocks_to_dense(new_B & ~self.B), self.blocks_to_dense(self.B & ~new_B)
        self.exp_avg = self.exp_avg.masked_fill(entering, 0)
        self.exp_avg_sq = self.exp_avg_sq.masked_fill(entering, 0)
        if self.complement == "regenerate":
            self.theta = torch.where(leaving, self.theta0.to(self.theta.dtype), self.theta)
        self.B = new_B


def adamw(theta, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """torch.optim.AdamW's update of one tensor, written out: (θ, m, v) after step `step`."""
    beta1, beta2 = betas
    exp_avg = exp_avg.lerp(grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    denom = exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step) + eps
    theta = theta * (1 - lr * weight_decay) - (lr / (1 - beta1**step)) * exp_avg / denom
    return theta, exp_avg, exp_avg_sq
