"""How B's blocks are laid out and moved between block and dense form: `index[s]` is the
row-major grid position of slot s's b×b block (b = 1: elements), `values[s]` its numbers; unused
slots have index = the number of blocks and take part in no product."""

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
    return (blocks.view(block_rows, block_cols, block, block).transpose(1, 2)
            .reshape(block_rows * block, block_cols * block))


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


def tiles(shape: tuple[int, int], block: int):
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


def scatter_tile(values, index, r0, r1, shape, block) -> torch.Tensor:
    """Dense [rows, in] tile of block-rows r0..r1-1 from B's values (zeros elsewhere)."""
    rows, cols = shape[0] // block, shape[1] // block
    slots, local = slots_in_rows(index, r0, r1, rows, cols)
    tile = scatter_blocks(values if slots is None else values[slots], local, (r1 - r0) * cols)
    return from_blocks(tile, r1 - r0, cols)


def gather_tile(grad_tile, index, r0, r1, shape, block):
    """(slots or None for all, their b×b gradients) of B's blocks inside a dense [rows, in] tile."""
    rows, cols = shape[0] // block, shape[1] // block
    slots, local = slots_in_rows(index, r0, r1, rows, cols)
    return slots, gather_blocks(to_blocks(grad_tile, block), local)
