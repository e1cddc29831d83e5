"""Products with a weight held only as B's blocks: forward through A, input gradient through A,
value gradient sampled at B (SDDMM).

Two CPU paths in plain torch, picked per product by `use_blocks` (numbers: docs/bench/step.md):

* *Gathered blocks* (b ≥ 16, at most a fraction of the grid: `use_blocks`). Tokens are taken
  `GATHER_TOKENS` at a time and their activations transposed once to [features, t], so that the
  block-column a block needs is one contiguous [b, t] slab: the slabs a chunk of block-rows needs
  are gathered by one `index_select` (one copy of b·t numbers each, where a [t, b] strip of the
  untransposed activations is t copies of b), and one `torch.bmm` multiplies the stacked blocks
  by them, giving the block-rows' outputs transposed, each written by one contiguous copy; the
  pass's output is transposed back once. Slots are grouped by how many blocks their block-row
  (block-column, for the input gradient) holds, so every block-row of a batch reduces over the
  same number of blocks *inside* the bmm and writes its output once — no padding, no
  accumulation. The value gradient of B's slots is the same gather: a gᵀ slab times the stacked x
  slabs, transposed, summed over the passes. Work and memory scale with the number of blocks, not
  the dense size; the transposed activations (a pass's worth) and the chunks
  (`GATHER_CHUNK_ELEMENTS`) live in workspaces reused pass after pass. Against strips this made
  the sparse training step 1.1–1.25× faster (b = 16 and 32, D = 0.05–0.2); transposing is now a
  good part of the cost.
* *Dense tiles* (element mode, or most blocks present). The weight is visited in tiles of whole
  block-rows; a tile is scattered dense for one matmul and dropped — like an activation, it never
  outlives the call, and `MAX_TILE_ELEMENTS` bounds it whatever the layer size. The value gradient
  of a tile is a dense [rows × in] product of which only B's blocks are read out. Element mode
  (b = 1, where a gather would move 4 bytes per index) always takes this path: it costs a dense
  product plus the scatter (0.65–0.95× dense speed, from D = 1 down to 0.05). torch's sparse
  products were no clear gain: `csr @ xᵀ` ran at 1.1× dense speed at D = 0.05 and 0.9× at 0.1,
  `sparse.sampled_addmm` at 1.4× for 5% of entries and 0.9× for 10% — before building the CSR
  tensors (a sort of the slots) that each call would need.

Layout, shared with `storage.SparseLinear`: a weight of shape [out, in] is a grid of
(out/b) × (in/b) blocks of b×b (b = 1: elements); `index[s]` is the row-major grid position of
the block in slot s and `values[s]` its b×b numbers. Slots are in no particular order (see
`storage`), so a product finds its slots by one scan of `index`; unused slots (index = number of
blocks) take part in none.
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


# The gathered path copies b·t contiguous numbers per slab and does b multiply-adds per number
# copied, so its cost against the dense tile falls with b and grows with the fraction f of the grid
# a product visits. Measured crossovers (a 4096×1024 weight, 1024 tokens, 1 CPU thread; forward /
# input gradient / value gradient): f ≈ 0.45 / 0.4 / 0.37 at b = 16, 0.6 / 0.6 / 0.5 at b = 32,
# 0.55 / > 0.6 / 0.4 at b = 64 (times vary by ±15% on a shared machine). The rule: b ≥
# MIN_GATHER_BLOCK and f ≤ min(MAX_GATHER_FRACTION, b / GATHER_BLOCK_SCALE) — 0.36 at b = 16,
# 0.45 from b = 32 on.
MIN_GATHER_BLOCK = 16
GATHER_BLOCK_SCALE = 45
MAX_GATHER_FRACTION = 0.45


def use_blocks(block: int, n_slots: int, n_blocks: int) -> bool:
    """Whether a product over `n_slots` of a layer's `n_blocks` blocks takes the gathered path."""
    limit = min(MAX_GATHER_FRACTION, block / GATHER_BLOCK_SCALE)
    return block >= MIN_GATHER_BLOCK and n_slots <= limit * n_blocks


# Tokens are taken GATHER_TOKENS at a time, which bounds the transposed copies and the workspaces
# whatever the batch (passes of 256 tokens ran as fast as one of 1024, or a little faster); slabs
# are gathered, and products written, into workspaces reused chunk after chunk, each at most
# GATHER_CHUNK_ELEMENTS (or one block-row's worth): a fresh tensor per chunk would cost more in
# page faults than the copy itself.
GATHER_TOKENS = 256
GATHER_CHUNK_ELEMENTS = 1 << 20


def _groups(major: torch.Tensor, minor: torch.Tensor, n_major: int, max_slots: int) -> list:
    """Slots grouped by how many slots share their major (block-row or block-column), in chunks of
    at most `max_slots` slots (or one major): [(majors [m], minors [m, k], slots [m, k])], where
    slots are positions in `major` / `minor`."""
    counts = torch.bincount(major, minlength=n_major)
    order = torch.argsort(counts[major] * n_major + major)  # by count, then major: a major's slots adjoin
    sizes, lengths = torch.unique_consecutive(counts[major[order]], return_counts=True)
    chunks, start = [], 0
    for k, length in zip(sizes.tolist(), lengths.tolist()):
        group = order[start : start + length].view(-1, k)
        start += length
        step = max(1, max_slots // k)
        chunks += [(major[slots[:, 0]], minor[slots], slots) for slots in group.split(step)]
    return chunks


def _passes(a: torch.Tensor, block: int, major, minor, n_major):
    """(tokens per pass, `_groups` chunks of at most GATHER_CHUNK_ELEMENTS of slabs, workspaces
    for the slabs of a chunk's minors and of its majors), for activations a [T, ·]."""
    span = max(1, min(a.shape[0], GATHER_TOKENS))
    chunks = _groups(major, minor, n_major, max(1, GATHER_CHUNK_ELEMENTS // (span * block)))
    minors = a.new_empty(span * block * max((minors.numel() for _, minors, _ in chunks), default=0))
    majors = a.new_empty(span * block * max((len(majors) for majors, _, _ in chunks), default=0))
    return span, chunks, minors, majors


def _transposed(a: torch.Tensor, block: int, workspace: torch.Tensor) -> torch.Tensor:
    """[t, n·b] activations → [n, b, t] (in the workspace): block-column c is the slab [c], one
    piece of memory."""
    out = workspace[: a.numel()].view(a.shape[1], a.shape[0])
    out.copy_(a.T)
    return out.view(a.shape[1] // block, block, a.shape[0])


def _slabs(a_t: torch.Tensor, columns: torch.Tensor, workspace: torch.Tensor) -> torch.Tensor:
    """[m, k·b, t] view of the workspace: for each row of `columns` [m, k], its k slabs of a_t
    [n, b, t] stacked."""
    m, k = columns.shape
    out = workspace[: m * k * a_t.shape[1] * a_t.shape[2]].view(m * k, *a_t.shape[1:])
    torch.index_select(a_t, 0, columns.view(-1), out=out)
    return out.view(m, k * a_t.shape[1], a_t.shape[2])


def _gathered_product(a, blocks, major, minor, n_out) -> torch.Tensor:
    """[T, n_out]: block-column i of the result is Σ (blocks[s] · a[:, minor[s]-block]ᵀ)ᵀ over the
    slots s with major[s] = i (zeros where there are none)."""
    (tokens, n_in), block = a.shape, blocks.shape[-1]
    out = a.new_empty(tokens, n_out)
    span, chunks, slabs, products = _passes(a, block, major, minor, n_out // block)
    lefts = [blocks[slots].transpose(1, 2).reshape(len(slots), block, -1) for _, _, slots in chunks]  # [W_s1 W_s2 …]
    empty = torch.ones(n_out // block, dtype=torch.bool, device=a.device)
    empty[major] = False
    empty = torch.nonzero(empty).view(-1)
    a_ws, out_ws = a.new_empty(n_in * span), a.new_empty(n_out * span)
    for t0 in range(0, tokens, span):
        t = min(span, tokens - t0)
        a_t = _transposed(a[t0 : t0 + t], block, a_ws)
        out_t = out_ws[: n_out * t].view(n_out // block, block, t).index_fill_(0, empty, 0)
        for (majors, minors, _), left in zip(chunks, lefts):
            product = products[: len(majors) * block * t].view(len(majors), block, t)
            torch.bmm(left, _slabs(a_t, minors, slabs), out=product)
            out_t.index_copy_(0, majors, product)
        out[t0 : t0 + t] = out_t.view(n_out, t).T
    return out


def _gathered_sddmm(g, x, rows, cols, block) -> torch.Tensor:
    """[n, b, b]: g[:, rows[s]-block]ᵀ · x[:, cols[s]-block] for each slot s."""
    tokens = g.shape[0]
    out = g.new_zeros(len(rows), block, block)
    span, chunks, x_slabs, g_slabs = _passes(g, block, rows, cols, g.shape[1] // block)
    g_ws, x_ws = g.new_empty(g.shape[1] * span), x.new_empty(x.shape[1] * span)
    for t0 in range(0, tokens, span):
        g_t, x_t = _transposed(g[t0 : t0 + span], block, g_ws), _transposed(x[t0 : t0 + span], block, x_ws)
        for majors, minors, slots in chunks:
            m, k = minors.shape
            product = torch.bmm(_slabs(g_t, majors.view(m, 1), g_slabs), _slabs(x_t, minors, x_slabs).transpose(1, 2))
            out.index_add_(0, slots.view(-1), product.view(m, block, k, block).transpose(1, 2).reshape(m * k, block, block))
    return out


def _tile_product(a, effective, index, shape, block, transpose: bool) -> torch.Tensor:
    """a · Wᵀ ([T, out]; transpose) or a · W ([T, in]), W laid out from `effective` tile by tile."""
    out = a.new_empty(a.shape[0], shape[0]) if transpose else a.new_zeros(a.shape[0], shape[1])
    for r0, r1 in _tiles(shape, block):
        tile = _scatter_tile(effective, index, r0, r1, shape, block).to(a.dtype)
        if transpose:
            out[:, r0 * block : r1 * block] = a @ tile.T
        else:
            out += a[:, r0 * block : r1 * block] @ tile
    return out


def _tile_sddmm(g, x, index, shape, block, grad_values) -> None:
    """Fills grad_values with (gᵀ · x) read out at B's blocks, one dense tile of block-rows at a time."""
    for r0, r1 in _tiles(shape, block):
        slots, grads = _gather_tile(g[:, r0 * block : r1 * block].T @ x, index, r0, r1, shape, block)
        if slots is None:
            grad_values.copy_(grads)
        else:
            grad_values[slots] = grads.to(grad_values.dtype)


def _product(a, values, forward_mask, index, shape, block, transpose: bool) -> torch.Tensor:
    """a · W_Aᵀ (transpose: the forward) or a · W_A (the input gradient), by the path `use_blocks`
    picks."""
    cols = shape[1] // block
    n_blocks = (shape[0] // block) * cols
    slots = torch.nonzero(forward_mask & (index < n_blocks)).view(-1)
    if not use_blocks(block, len(slots), n_blocks):
        effective = values * forward_mask.view(-1, 1, 1).to(values.dtype)
        return _tile_product(a, effective, index, shape, block, transpose)
    blocks = values[slots].to(a.dtype)
    rows, columns = index[slots] // cols, index[slots] % cols
    if transpose:  # yᵀ[r] = Σ_c W_rc · xᵀ[c]
        return _gathered_product(a, blocks, rows, columns, shape[0])
    return _gathered_product(a, blocks.transpose(1, 2), columns, rows, shape[1])  # grad_xᵀ[c] = Σ_r W_rcᵀ · gᵀ[r]


class SparseMatmul(torch.autograd.Function):
    """y = x · W_Aᵀ where W_A holds `values * forward_mask` at grid positions `index`; the
    gradient for `values` covers all of B.

    With `penalty` λ > 0 the value gradient gets Top-KAST's exploration penalty, λ·θ on A and
    λ·θ / D on B \\ A (ALGORITHMS.md §1), so that clipping and the optimizer see the gradient a
    dense Top-KAST would. Only x (an activation) is saved for backward; A's slots and effective
    values are found again there rather than kept alive between the passes.
    """

    @staticmethod
    def forward(ctx, x, values, forward_mask, stored_index, shape, block, penalty, density):
        x2 = x.reshape(-1, shape[1])
        out = _product(x2, values, forward_mask, stored_index.long(), shape, block, transpose=True)
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
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = _product(g2, values, forward_mask, index, shape, block, transpose=False).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_values = torch.zeros_like(values)
            n_blocks = (shape[0] // block) * (shape[1] // block)
            used = torch.nonzero(index < n_blocks).view(-1)
            if use_blocks(block, len(used), n_blocks):
                rows, cols = index[used] // (shape[1] // block), index[used] % (shape[1] // block)
                grad_values[used] = _gathered_sddmm(g2, x2, rows, cols, block).to(values.dtype)
            else:
                _tile_sddmm(g2, x2, index, shape, block, grad_values)
            if ctx.penalty:
                scale = torch.where(forward_mask, ctx.penalty, ctx.penalty / ctx.density).to(values.dtype)
                grad_values += scale.view(-1, 1, 1) * values
        return grad_x, grad_values, None, None, None, None, None, None

