"""The three products of a sparse linear — forward and input gradient through A, value gradient
at B — each by the path `paths.layer_path` picks."""

from __future__ import annotations

import torch

from sparse_lm.sparsity.kernels import cpu
from sparse_lm.sparsity.kernels.backends import in_place_ops
from sparse_lm.sparsity.kernels.gathered import GatheredProduct, GatheredSddmm, pass_tokens
from sparse_lm.sparsity.kernels.paths import layer_path, record
from sparse_lm.sparsity.kernels.tiles import tile_product, tile_sddmm


def in_place_product(a, values, slots, rows, columns, shape, block, transpose: bool) -> torch.Tensor:
    """a · W_Aᵀ (transpose) or a · W_A by the in-place kernels (`in_place_ops`), A's `slots` (at
    grid `rows`, `columns`) ordered by the block-row (block-column) they write."""
    major, minor, n_major = (rows, columns, shape[0] // block) if transpose else (columns, rows, shape[1] // block)
    order = torch.argsort(major, stable=True)
    starts = torch.zeros(n_major + 1, dtype=torch.long, device=a.device)
    torch.cumsum(torch.bincount(major, minlength=n_major), 0, out=starts[1:])
    return in_place_ops(a, block).block_product(a.contiguous(), values.to(a.dtype).contiguous(), slots[order],
                                                minor[order], starts, n_major * block, transpose)


def sparse_product(a, values, forward_mask, index, shape, block, transpose: bool):
    """a · W_Aᵀ (transpose: the forward) or a · W_A (the input gradient): the result [T, ·] from
    the in-place or tile path, or a `GatheredProduct` to feed with passes (`choose_path`).
    `index`: the stored one (int32); the element kernels read it as it is."""
    cols = shape[1] // block
    n_blocks = (shape[0] // block) * cols
    in_a = forward_mask & (index < n_blocks)
    path = layer_path(a, block, int(torch.count_nonzero(in_a)), shape, len(index))  # .sum() would copy to int64
    record("forward" if transpose else "input_grad", path)
    if path == "in_place" and block == 1:  # the kernel groups the elements itself (a radix sort)
        return cpu.ops().element_product(a.contiguous(), values.view(-1).to(a.dtype), index, in_a, *shape,
                                              transpose)
    index = index.long()
    if path == "tiles":
        effective = values * forward_mask.view(-1, 1, 1).to(values.dtype)
        return tile_product(a, effective, index, shape, block, transpose)
    slots = torch.nonzero(in_a).view(-1)
    rows, columns = index[slots] // cols, index[slots] % cols
    if path == "in_place":
        return in_place_product(a, values, slots, rows, columns, shape, block, transpose)
    blocks = values[slots].to(a.dtype)
    span = pass_tokens(a.shape[0])
    if transpose:  # yᵀ[r] = Σ_c W_rc · xᵀ[c]
        return GatheredProduct(a, blocks, rows, columns, shape[0], span)
    return GatheredProduct(a, blocks.transpose(1, 2), columns, rows, shape[1], span)  # grad_xᵀ[c] = Σ_r W_rcᵀ · gᵀ[r]


def value_gradient(g, x, index, shape, block, grad_values):
    """Fills grad_values with gᵀ·x at B's blocks by the in-place or tile path, or returns a
    `GatheredSddmm` to feed with passes (and None otherwise)."""
    cols = shape[1] // block
    n_blocks = (shape[0] // block) * cols
    in_b = index < n_blocks
    path = layer_path(g, block, int(torch.count_nonzero(in_b)), shape, len(index))
    record("value_grad", path)
    if path == "in_place" and block == 1:  # zeros for unused slots, like grad_values
        grad_values.view(-1).copy_(cpu.ops().element_sddmm(g.contiguous(), x.contiguous(), index, *shape))
        return None
    index = index.long()
    if path == "tiles":
        tile_sddmm(g, x, index, shape, block, grad_values)
        return None
    used = torch.nonzero(in_b).view(-1)
    rows, columns = index[used] // cols, index[used] % cols
    if path == "in_place":
        grads = in_place_ops(g, block).block_sddmm(g.contiguous(), x.contiguous(), rows, columns, block)
        grad_values[used] = grads.to(grad_values.dtype)
        return None
    return GatheredSddmm(g, used, rows, columns, block, pass_tokens(g.shape[0]), shape[1])
