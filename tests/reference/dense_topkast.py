"""The oracle for always-sparse Top-KAST: the textbook dense version (dense θ, boolean masks,
masked gradient, AdamW written out), as simple as possible so it can be trusted by reading.

The sparse trainer must follow it step by step: same θ₀ (the counter-based initialiser), same
selections, same updates. With `complement: offload` this is the paper's exact semantics; with
`regenerate` an entry that leaves B returns to its initial value, which the oracle mimics.
"""

from __future__ import annotations

import math

import torch

from sparse_lm.sparsity.init import counter_normal


class DenseTopKASTLinear:
    def __init__(self, out_features, in_features, density, exploration, block, penalty, complement, seed, stream, std,
                 promote="any"):
        self.shape, self.block = (out_features, in_features), block
        self.grid = (out_features // block, in_features // block)
        n = self.grid[0] * self.grid[1]
        self.k_forward = max(1, math.ceil(density * n))
        self.k_backward = min(n, max(self.k_forward, math.ceil((density + exploration) * n)))
        self.density, self.penalty, self.complement, self.promote = density, penalty, complement, promote
        self.theta0 = counter_normal(seed, stream, 0, out_features * in_features, std).view(self.shape)
        self.theta = self.theta0.clone()
        self.exp_avg = torch.zeros(self.shape)
        self.exp_avg_sq = torch.zeros(self.shape)
        self.B = self.A = None
        self.select()

    def blocks_to_dense(self, mask_blocks: torch.Tensor) -> torch.Tensor:
        b = self.block
        return mask_blocks.view(*self.grid, 1, 1).expand(*self.grid, b, b).transpose(1, 2).reshape(self.shape)

    def top(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Top-k blocks, ties by lowest index (a stable descending sort)."""
        mask = torch.zeros(scores.numel(), dtype=torch.bool)
        mask[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
        return mask

    def select(self, max_new: int | None = None) -> None:
        """Re-pick B and A; with `max_new`, A's top k_A − max_new blocks stay in B and A, and A's
        other blocks are the top of B without them (`sparsity.churn_cap`)."""
        b = self.block
        scores = self.theta.abs().view(self.grid[0], b, self.grid[1], b).sum(dim=(1, 3)).reshape(-1)
        kept = None
        if max_new is not None and self.A is not None and max_new < self.k_forward:
            kept = self.top(torch.where(self.A, scores, torch.tensor(-1.0)), self.k_forward - max_new)
        new_B = self.top(scores if kept is None else torch.where(kept, torch.tensor(math.inf), scores),
                         self.k_backward)
        fresh = torch.zeros_like(new_B)
        if self.B is not None:
            fresh = new_B & ~self.B
            entering = self.blocks_to_dense(fresh)
            leaving = self.blocks_to_dense(self.B & ~new_B)
            self.exp_avg[entering] = 0
            self.exp_avg_sq[entering] = 0
            if self.complement == "regenerate":
                self.theta[leaving] = self.theta0[leaving]
        self.B = new_B
        in_b = torch.where(new_B, scores, torch.tensor(-1.0))
        if self.promote == "trained":  # blocks new to B rank after the ones that stayed, in their own order
            in_b = torch.where(new_B, torch.where(fresh, scores / (1.0 + scores), 1.0 + scores), in_b)
        if kept is None:
            self.A = self.top(in_b, self.k_forward)
        else:
            self.A = kept | self.top(torch.where(kept, torch.tensor(-1.0), in_b), max_new)

    def weight(self) -> torch.Tensor:
        """θ·1_A as a leaf that collects the dense gradient."""
        return (self.theta * self.blocks_to_dense(self.A)).requires_grad_()

    def gradient(self, dense_grad: torch.Tensor) -> torch.Tensor:
        """Top-KAST's gradient: at B only, plus the exploration penalty (λ on A, λ/D on B \\ A)."""
        on_a = self.blocks_to_dense(self.A)
        on_b = self.blocks_to_dense(self.B)
        scale = torch.where(on_a, self.penalty, self.penalty / self.density)
        return torch.where(on_b, dense_grad + scale * self.theta, torch.zeros(()))

    def adamw(self, grad, step, lr, betas, eps, weight_decay) -> None:
        """torch.optim.AdamW's update, applied to B's entries only (others are frozen)."""
        masked_adamw(self, self.blocks_to_dense(self.B), grad, step, lr, betas, eps, weight_decay)


def masked_adamw(layer, on: torch.Tensor, grad, step, lr, betas, eps, weight_decay) -> None:
    """torch.optim.AdamW's update written out, applied to `layer`'s θ and moments where `on`."""
    beta1, beta2 = betas
    theta = layer.theta * (1 - lr * weight_decay)
    exp_avg = layer.exp_avg.lerp(grad, 1 - beta1)
    exp_avg_sq = layer.exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)) + eps
    theta = theta - (lr / (1 - beta1**step)) * exp_avg / denom
    layer.theta = torch.where(on, theta, layer.theta)
    layer.exp_avg = torch.where(on, exp_avg, layer.exp_avg)
    layer.exp_avg_sq = torch.where(on, exp_avg_sq, layer.exp_avg_sq)
