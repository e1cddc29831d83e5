"""The tile path: the weight scattered one bounded dense tile of block-rows at a time."""

from __future__ import annotations

import torch

from sparse_lm.sparsity.kernels.layout import gather_tile, scatter_tile, tiles


def tile_product(a, effective, index, shape, block, transpose: bool) -> torch.Tensor:
    """a · Wᵀ ([T, out]; transpose) or a · W ([T, in]), W laid out from `effective` tile by tile."""
    out = a.new_empty(a.shape[0], shape[0]) if transpose else a.new_zeros(a.shape[0], shape[1])
    for r0, r1 in tiles(shape, block):
        tile = scatter_tile(effective, index, r0, r1, shape, block).to(a.dtype)
        if transpose:
            out[:, r0 * block : r1 * block] = a @ tile.T
        else:
            out += a[:, r0 * block : r1 * block] @ tile
    return out


def tile_sddmm(g, x, index, shape, block, grad_values) -> None:
    """Fills grad_values with (gᵀ · x) read out at B's blocks, one dense tile of block-rows at a time."""
    for r0, r1 in tiles(shape, block):
        slots, grads = gather_tile(g[:, r0 * block : r1 * block].T @ x, index, r0, r1, shape, block)
        if slots is None:
            grad_values.copy_(grads)
        else:
            grad_values[slots] = grads.to(grad_values.dtype)
