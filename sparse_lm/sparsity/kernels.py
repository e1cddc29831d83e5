"""Products with a weight held only as B's blocks: forward through A, input gradient through A,
value gradient sampled at B (SDDMM).

Portable reference kernels in plain torch. The weight is visited in *tiles* of whole block-rows;
a tile is scattered dense for one matmul and dropped — like an activation, it never outlives the
call, and `MAX_TILE_ELEMENTS` bounds it whatever the layer size. The value gradient of a tile is a
dense [rows × in] product of which only B's blocks are read out (the sampled product); it too is
transient. Faster kernels (block-gather bmm on CPU, Triton on GPU) replace these tile loops without
changing the layout.

Layout, shared with `storage.SparseLinear`: a weight of shape [out, in] is a grid of
(out/b) × (in/b) blocks of b×b (b = 1: elements); `index[s]` is the row-major grid position of
the block in slot s and `values[s]` its b×b numbers. Slots are in no particular order (see
`storage`), so a tile finds its slots by one scan of `index`; a layer within one tile needs none.
"""

from __future__ import annotations

import torch

# Largest transient dense tile, in elements (16M fp32 = 64 MiB); at least one block-row is used.
MAX_TILE_ELEMENTS = 1 << 24


def to_blocks(rows: torch.Tensor, block: int) -> torch.Tensor:
    """Dense [R·b, C·b] rows → [R·C, b, b] blocks in row-major grid order."""
    block_rows, block_cols = rows.shape[0] // block, rows.shape[1] // block
    return rows.view(block_rows, block, block_cols, block).transpose(1, 2).reshape(-1, block, block)


def from_blocks(blocks: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    """[R·C, b, b] blocks in row-major grid order → dense [R·b, C·b] rows (inverse of `to_blocks`)."""
    block = blocks.shape[-1]
    return blocks.view(block_rows, block_cols, block, block).transpose(1, 2).reshape(block_rows * block, block_cols * block)


def slots_in_rows(index: torch.Tensor, r0: int, r1: int, block_rows: int, block_cols: int):
    """(slots, grid positions relative to block-row r0) of B's blocks in block-rows r0..r1-1.

    `index` is int64. Found by one scan of B per tile, not kept sorted: a persistent sort order
    would cost more memory (8–16 bytes per slot) than B's values themselves. Unused slots (index
    = block_rows · block_cols) fall in no tile, except in the whole-layer case, where callers drop
    them (`scatter_blocks` / `gather_blocks`).
    """
    if r0 == 0 and r1 == block_rows:
        return None, index  # the whole layer: every slot, in slot order
    inside = (index >= r0 * block_cols) & (index < r1 * block_cols)
    slots = torch.nonzero(inside).view(-1)
    return slots, index[slots] - r0 * block_cols


def _tiles(shape: tuple[int, int], block: int):
    """(first, last) block-rows per tile: contiguous ranges bounded by MAX_TILE_ELEMENTS."""
    block_rows = shape[0] // block
    per_tile = max(1, MAX_TILE_ELEMENTS // (block * shape[1]))
    for r0 in range(0, block_rows, per_tile):
        yield r0, min(block_rows, r0 + per_tile)


def scatter_blocks(values: torch.Tensor, local: torch.Tensor, n: int) -> torch.Tensor:
    """[n, b, b]: zeros with values[i] at grid position local[i]. A position equal to n marks an
    unused slot (a tensor-parallel shard's spare capacity, see `storage`) and is dropped."""
    out = values.new_zeros(n + 1, *values.shape[1:])
    out[local] = values
    return out[:n]


def gather_blocks(blocks: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """blocks[local], with zeros for unused slots (local == len(blocks))."""
    n = blocks.shape[0]
    unused = (local >= n).view(-1, 1, 1)
    return blocks[local.clamp(max=n - 1)].masked_fill_(unused, 0)


def _scatter_tile(values, index, r0, r1, shape, block) -> torch.Tensor:
    """Dense [rows, in] tile of block-rows r0..r1-1 from B's values (zeros elsewhere)."""
    rows, cols = shape[0] // block, shape[1] // block
    slots, local = slots_in_rows(index, r0, r1, rows, cols)
    tile = scatter_blocks(values if slots is None else values[slots], local, (r1 - r0) * cols)
    return from_blocks(tile, r1 - r0, cols)


def _gather_tile(grad_tile, index, r0, r1, shape, block):
    """(slots or None for all, their b×b gradients) of B's blocks inside a dense [rows, in] tile."""
    rows, cols = shape[0] // block, shape[1] // block
    slots, local = slots_in_rows(index, r0, r1, rows, cols)
    return slots, gather_blocks(to_blocks(grad_tile, block), local)


class SparseMatmul(torch.autograd.Function):
    """y = x · W_Aᵀ where W_A holds `values * forward_mask` at grid positions `index`; the
    gradient for `values` covers all of B.

    With `penalty` λ > 0 the value gradient gets Top-KAST's exploration penalty, λ·θ on A and
    λ·θ / D on B \\ A (ALGORITHMS.md §1), so that clipping and the optimizer see the gradient a
    dense Top-KAST would. Only x (an activation) is saved for backward; A's effective values are
    rebuilt there rather than kept alive between the passes.
    """

    @staticmethod
    def forward(ctx, x, values, forward_mask, stored_index, shape, block, penalty, density):
        index = stored_index.long()  # transient: the int64 copy is not kept for backward
        effective = values * forward_mask.view(-1, 1, 1).to(values.dtype)
        x2 = x.reshape(-1, shape[1])
        out = x2.new_empty(x2.shape[0], shape[0])
        for r0, r1 in _tiles(shape, block):
            tile = _scatter_tile(effective, index, r0, r1, shape, block).to(x2.dtype)
            out[:, r0 * block : r1 * block] = x2 @ tile.T
        ctx.save_for_backward(x, values, forward_mask, stored_index)
        ctx.shape, ctx.block, ctx.penalty, ctx.density = shape, block, penalty, density
        return out.view(*x.shape[:-1], shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, values, forward_mask, stored_index = ctx.saved_tensors
        index = stored_index.long()
        shape, block = ctx.shape, ctx.block
        x2 = x.reshape(-1, shape[1])
        g2 = grad_out.reshape(-1, shape[0])
        grad_x = torch.zeros_like(x2) if ctx.needs_input_grad[0] else None
        grad_values = torch.zeros_like(values) if ctx.needs_input_grad[1] else None
        effective = values * forward_mask.view(-1, 1, 1).to(values.dtype) if grad_x is not None else None
        for r0, r1 in _tiles(shape, block):
            g_rows = g2[:, r0 * block : r1 * block]
            if grad_x is not None:
                grad_x += g_rows @ _scatter_tile(effective, index, r0, r1, shape, block).to(g2.dtype)
            if grad_values is not None:
                slots, grads = _gather_tile(g_rows.T @ x2, index, r0, r1, shape, block)
                if slots is None:
                    grad_values.copy_(grads)
                else:
                    grad_values[slots] = grads.to(values.dtype)
        if grad_values is not None and ctx.penalty:
            scale = torch.where(forward_mask, ctx.penalty, ctx.penalty / ctx.density).to(values.dtype)
            grad_values += scale.view(-1, 1, 1) * values
        return (grad_x.view(x.shape) if grad_x is not None else None), grad_values, None, None, None, None, None, None
