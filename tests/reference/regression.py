"""The training problem the sparse-vs-dense-oracle tests share: a 2-layer MLP regressing random
targets from random inputs, the sparse layers stepped by their optimizer beside the dense oracle."""

from __future__ import annotations

import torch


def regression_step(sparse, optimizer, dense, gen: torch.Generator, dims) -> tuple[float, float, list[torch.Tensor]]:
    """One step on a fresh batch drawn from `gen`: the sparse layers (whole or sharded: layer 0's
    input gradient and layer 1's output are summed over the ranks) take their optimizer step; the
    oracle's forward and backward run on the same batch. Returns both losses and the oracle's
    weights, leaves holding the dense gradients, for its own update."""
    x = torch.randn(64, dims[0][1], generator=gen)
    target = torch.randn(64, dims[1][0], generator=gen)
    loss_s = ((sparse[1](torch.relu(sparse[0](x))) - target) ** 2).mean()
    optimizer.zero_grad()
    loss_s.backward()
    optimizer.step()
    weights = [d.weight() for d in dense]
    loss_d = ((torch.relu(x @ weights[0].T) @ weights[1].T - target) ** 2).mean()
    loss_d.backward()
    return loss_s.item(), loss_d.item(), weights
