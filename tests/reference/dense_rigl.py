"""The oracle for always-sparse RigL: the textbook dense version (dense θ, a boolean block mask,
the dense gradient from autograd, AdamW written out), simple enough to be trusted by reading.

RigL keeps θ = 0 outside A. An update drops the k blocks of A with the smallest Σ|θ| and grows,
among all other blocks (a dropped one included), the k with the largest Σ|∂L/∂W|; blocks new to A
start at zero with zero moments, dropped ones that are not regrown become zero.
"""

from __future__ import annotations

import math

import torch

from sparse_lm.sparsity.init import counter_normal
from tests.reference.dense_topkast import masked_adamw


class DenseRigLLinear:
    def __init__(self, out_features, in_features, density, block, seed, stream, std):
        self.shape, self.block = (out_features, in_features), block
        self.grid = (out_features // block, in_features // block)
        n = self.grid[0] * self.grid[1]
        self.k = max(1, math.ceil(density * n))
        theta0 = counter_normal(seed, stream, 0, out_features * in_features, std).view(self.shape).double()
        noise = counter_normal(seed, stream ^ 0x5BD1E995, 0, out_features * in_features, 1.0).view(self.shape)
        self.A = self.top(self.block_sums(noise.double()), self.k)  # the static start: a seeded random set
        self.theta = theta0 * self.dense(self.A)
        self.exp_avg = torch.zeros(self.shape, dtype=torch.float64)
        self.exp_avg_sq = torch.zeros(self.shape, dtype=torch.float64)

    def block_sums(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        return x.abs().view(self.grid[0], b, self.grid[1], b).sum(dim=(1, 3)).reshape(-1)

    def dense(self, mask_blocks: torch.Tensor) -> torch.Tensor:
        b = self.block
        return mask_blocks.view(*self.grid, 1, 1).expand(*self.grid, b, b).transpose(1, 2).reshape(self.shape)

    @staticmethod
    def top(scores: torch.Tensor, k: int) -> torch.Tensor:
        """Top-k blocks, ties by lowest index (a stable descending sort)."""
        mask = torch.zeros(scores.numel(), dtype=torch.bool)
        mask[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
        return mask

    def weight(self) -> torch.Tensor:
        """θ (zero outside A) as a leaf that collects the dense gradient."""
        return self.theta.clone().requires_grad_()

    def update(self, dense_grad: torch.Tensor, k: int) -> None:
        # Scores are ranked in float32, as the sharded select does.
        in_a = torch.where(self.A, self.block_sums(self.theta).float(), torch.tensor(-1.0))
        kept = self.top(in_a, self.k - k)
        grow = torch.where(kept, torch.tensor(math.inf), self.block_sums(dense_grad).float())
        new_a = self.top(grow, self.k)
        entering, leaving = self.dense(new_a & ~self.A), self.dense(self.A & ~new_a)
        for t in (self.theta, self.exp_avg, self.exp_avg_sq):
            t[entering] = 0
            t[leaving] = 0
        self.A = new_a

    def adamw(self, grad, step, lr, betas, eps, weight_decay) -> None:
        """torch.optim.AdamW's update on A's entries only."""
        masked_adamw(self, self.dense(self.A), grad, step, lr, betas, eps, weight_decay)
