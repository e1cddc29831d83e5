"""Products with a weight held only as B's blocks: forward through A, input gradient through A,
value gradient sampled at B (SDDMM) — without ever forming the dense weight or its gradient.

Each product takes one of three paths, picked by `choose_path` from the block size b and the
fraction of the block grid it covers (`IN_PLACE_LIMITS`, `ELEMENT_IN_PLACE_LIMIT`, `GATHER_LIMITS`):
*in place* (compiled CPU kernels, or Triton on a GPU, that read B's blocks or elements where they
lie), *gathered* (pure torch: activation slabs gathered per block into a reused workspace, one
`bmm`), or *tiles* (the weight scattered one bounded dense tile at a time). The limits are the
measured crossovers against dense. Layout, shared with `storage.SparseLinear`: `index[s]` is the
row-major grid position of slot s's b×b block (b = 1: elements), `values[s]` its numbers; unused
slots (index = number of blocks) take part in no product. How each path works and why:
docs/design/kernels.md.
"""

from __future__ import annotations

import collections
import contextlib

import torch

from sparse_lm.sparsity import compiled, triton_blocks

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


# The largest fraction f of a layer's block grid each block path takes, by block size b (the entry
# of the largest size ≤ b applies; smaller blocks take the tiles). Both paths do b multiply-adds
# per number they move, so their cost against the dense tile falls with b and grows with f. Set
# from the crossovers against the tile path in docs/bench/kernels.md (`tools/bench_kernels.py`: a
# 4096×1024 weight, 1024 tokens, 1 CPU thread, forward / input gradient / value gradient; times
# vary by ±15% on a shared machine): in place, b = 16 is level with the tiles at f ≈ 0.6, b = 32
# at ≈ 0.75, b = 64 at ≈ 0.9, while b = 8 is slower than dense from f = 0.1 on (one BLAS call per
# 8×8 block); gathered, b = 8 is level at f ≈ 0.25, b = 16 at ≈ 0.45, b = 32 at ≈ 0.55, b = 64 at
# ≈ 0.6. The limits sit a little below, where the block path is still clearly ahead. Elements in
# place are level with the tiles at f ≈ 0.25 (input and value gradients) to 0.3 (forward).
IN_PLACE_LIMITS = {16: 0.6, 32: 0.7, 64: 0.8}
ELEMENT_IN_PLACE_LIMIT = 0.25
GATHER_LIMITS = {8: 0.2, 16: 0.4, 32: 0.5, 64: 0.55}


def _within(limits: dict, block: int, n_slots: int, n_blocks: int) -> bool:
    sizes = [size for size in limits if size <= block]
    return bool(sizes) and n_slots <= limits[max(sizes)] * n_blocks


def use_in_place(block: int, n_slots: int, n_blocks: int) -> bool:
    """Whether a product over `n_slots` of a layer's `n_blocks` blocks takes the in-place path
    (where in-place kernels can run at all: `in_place_ops`). Elements (b = 1) have kernels
    of their own; blocks of 2–15 have none worth taking (one BLAS call per small block)."""
    if block == 1:
        return n_slots <= ELEMENT_IN_PLACE_LIMIT * n_blocks
    return _within(IN_PLACE_LIMITS, block, n_slots, n_blocks)


def use_blocks(block: int, n_slots: int, n_blocks: int) -> bool:
    """Whether such a product takes the gathered path where the in-place one cannot run."""
    return _within(GATHER_LIMITS, block, n_slots, n_blocks)


PATHS = ("in_place", "gathered", "tiles")
_forced_path: str | None = None


@contextlib.contextmanager
def forced_path(path: str):
    """Every product inside the block takes `path` (one of PATHS), whatever the rules say: for the
    benchmarks and tests that compare the paths on the same numbers."""
    global _forced_path
    if path not in PATHS:
        raise ValueError(f"forced_path: path must be one of {PATHS}, got {path!r}")
    previous, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = previous


_recorders: list[collections.Counter] = []


@contextlib.contextmanager
def recorded_paths():
    """A Counter of (product, path) for every product run inside the block — product one of
    "forward", "input_grad", "value_grad", path one of PATHS — so that a test can assert which
    path its products really took (and fail if a rule change routes them elsewhere). Outside such
    a block recording costs one test of an empty list per product."""
    counts: collections.Counter = collections.Counter()
    _recorders.append(counts)
    try:
        yield counts
    finally:
        _recorders.remove(counts)


def _record(product: str, path: str) -> None:
    for counts in _recorders:
        counts[product, path] += 1


def in_place_ops(a: torch.Tensor, block: int):
    """The kernels of the in-place path for activations like `a` and blocks of `block`: the
    compiled CPU ones (`compiled`), the Triton ones (`triton_blocks`: a GPU, b ≥ 16), or None."""
    if compiled.supports(a):
        return compiled.ops()
    if block > 1 and triton_blocks.supports(a, block):
        return triton_blocks
    return None


def choose_path(a: torch.Tensor, block: int, n_slots: int, n_blocks: int) -> str:
    """One of PATHS: the path of a product over `n_slots` of a layer's `n_blocks` blocks, on
    activations like `a`."""
    if _forced_path is not None:
        if _forced_path == "in_place" and in_place_ops(a, block) is None:
            raise RuntimeError(f"forced_path: no in-place kernels take {a.dtype} on {a.device} with blocks of {block}")
        return _forced_path
    if use_in_place(block, n_slots, n_blocks) and in_place_ops(a, block) is not None:
        return "in_place"
    return "gathered" if use_blocks(block, n_slots, n_blocks) else "tiles"


# Tokens are taken GATHER_TOKENS at a time, which bounds the transposed copies and the workspaces
# whatever the batch (passes of 256 tokens ran as fast as one of 1024, or a little faster); slabs
# are gathered, and products written, into workspaces reused chunk after chunk, each at most
# GATHER_CHUNK_ELEMENTS and at most the layer's weight (or one block-row's worth): a fresh tensor
# per chunk would cost more in page faults than the copy itself (2M or 4M-element chunks were no
# faster than 1M, within this machine's ±10%, same process).
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


def _span(tokens: int) -> int:
    """Tokens per pass."""
    return max(1, min(tokens, GATHER_TOKENS))


def _chunks(a: torch.Tensor, span: int, block: int, major, minor, n_major, weight_numel: int):
    """(`_groups` chunks of at most GATHER_CHUNK_ELEMENTS (and `weight_numel`) of slabs,
    workspaces for the slabs of a chunk's minors and of its majors), for passes of `span` tokens
    of activations like `a`."""
    limit = min(GATHER_CHUNK_ELEMENTS, weight_numel)
    chunks = _groups(major, minor, n_major, max(1, limit // (span * block)))
    minors = a.new_empty(span * block * max((minors.numel() for _, minors, _ in chunks), default=0))
    majors = a.new_empty(span * block * max((len(majors) for majors, _, _ in chunks), default=0))
    return chunks, minors, majors


class _Transposed:
    """Passes of activations a [T, n·b] as [n, b, t]: block-column c is the slab [c], one piece of
    memory. One workspace, reused pass after pass."""

    def __init__(self, a: torch.Tensor, block: int, span: int):
        self.a, self.block = a, block
        self.workspace = a.new_empty(a.shape[1] * span)

    def __call__(self, t0: int, t: int) -> torch.Tensor:
        out = self.workspace[: t * self.a.shape[1]].view(self.a.shape[1], t)
        out.copy_(self.a[t0 : t0 + t].T)
        return out.view(self.a.shape[1] // self.block, self.block, t)


def _slabs(a_t: torch.Tensor, columns: torch.Tensor, workspace: torch.Tensor) -> torch.Tensor:
    """[m, k·b, t] view of the workspace: for each row of `columns` [m, k], its k slabs of a_t
    [n, b, t] stacked."""
    m, k = columns.shape
    out = workspace[: m * k * a_t.shape[1] * a_t.shape[2]].view(m * k, *a_t.shape[1:])
    torch.index_select(a_t, 0, columns.view(-1), out=out)
    return out.view(m, k * a_t.shape[1], a_t.shape[2])


class _GatheredProduct:
    """out [T, n_out] whose block-column i is Σ (blocks[s] · a[:, minor[s]-block]ᵀ)ᵀ over the slots
    s with major[s] = i (zeros where there are none), computed pass by pass from transposed
    activations (`add`)."""

    def __init__(self, a, blocks, major, minor, n_out: int, span: int):
        self.block = block = blocks.shape[-1]
        self.n_out = n_out
        self.out = a.new_empty(a.shape[0], n_out)
        self.chunks, self.slabs, self.products = _chunks(a, span, block, major, minor, n_out // block,
                                                         n_out * a.shape[1])
        self.lefts = [blocks[slots].transpose(1, 2).reshape(len(slots), block, -1)  # [W_s1 W_s2 …]
                      for _, _, slots in self.chunks]
        empty = torch.ones(n_out // block, dtype=torch.bool, device=a.device)
        empty[major] = False
        self.empty = torch.nonzero(empty).view(-1)
        self.out_ws = a.new_empty(n_out * span)

    def add(self, t0: int, a_t: torch.Tensor) -> None:
        """Tokens t0.. of the output from their transposed activations a_t [n_in/b, b, t]."""
        block, t = self.block, a_t.shape[2]
        out_t = self.out_ws[: self.n_out * t].view(self.n_out // block, block, t).index_fill_(0, self.empty, 0)
        for (majors, minors, _), left in zip(self.chunks, self.lefts):
            product = self.products[: len(majors) * block * t].view(len(majors), block, t)
            torch.bmm(left, _slabs(a_t, minors, self.slabs), out=product)
            out_t.index_copy_(0, majors, product)
        self.out[t0 : t0 + t] = out_t.view(self.n_out, t).T


class _GatheredSddmm:
    """[n, b, b]: g[:, rows[s]-block]ᵀ · x[:, cols[s]-block] for each of B's slots `slots` [n]
    (rows, cols: their grid positions), summed pass by pass (`add`) from transposed g and x.

    Each chunk's products accumulate over the passes in place (`baddbmm_`), in the bmm's own
    [m, b, k·b] layout, and are rearranged into blocks once (`result`): rearranging and adding
    them pass by pass moved as many numbers as the transposes themselves (the SDDMM ran 1.5×
    slower). The accumulators hold as many numbers as the result (B's slots), never a dense weight."""

    def __init__(self, g, slots, rows, cols, block: int, span: int, n_in: int):
        self.block, self.slots = block, slots
        self.chunks, self.x_slabs, self.g_slabs = _chunks(g, span, block, rows, cols, g.shape[1] // block,
                                                          g.shape[1] * n_in)
        self.sums = [g.new_zeros(len(majors), block, minors.shape[1] * block) for majors, minors, _ in self.chunks]
        self.out = g.new_empty(len(rows), block, block)

    def add(self, g_t: torch.Tensor, x_t: torch.Tensor) -> None:
        for (majors, minors, _), acc in zip(self.chunks, self.sums):
            acc.baddbmm_(_slabs(g_t, majors.view(-1, 1), self.g_slabs),
                         _slabs(x_t, minors, self.x_slabs).transpose(1, 2))

    def result(self) -> torch.Tensor:
        for (_, minors, slots), acc in zip(self.chunks, self.sums):
            m, k = minors.shape
            self.out[slots.view(-1)] = (acc.view(m, self.block, k, self.block).transpose(1, 2)
                                        .reshape(m * k, self.block, self.block))
        return self.out


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


def element_keys_fit(shape: tuple[int, int], capacity: int) -> bool:
    """Whether the element kernels can pack (row, column, slot) of a layer with `capacity` slots in
    one 64-bit word (their radix sort's; true for any layer below ~2^40 elements)."""
    return sum(max(n - 1, 0).bit_length() for n in (*shape, capacity + 1)) <= 64


def _layer_path(a, block: int, n_slots: int, shape: tuple[int, int], capacity: int) -> str:
    """`choose_path` for a product over `n_slots` of a [out, in] layer's blocks; elements of a layer
    too large for the element kernels' keys take the tiles."""
    path = choose_path(a, block, n_slots, (shape[0] // block) * (shape[1] // block))
    if path == "in_place" and block == 1 and not element_keys_fit(shape, capacity):
        return "tiles"
    return path


def _in_place_product(a, values, slots, rows, columns, shape, block, transpose: bool) -> torch.Tensor:
    """a · W_Aᵀ (transpose) or a · W_A by the in-place kernels (`in_place_ops`), A's `slots` (at
    grid `rows`, `columns`) ordered by the block-row (block-column) they write."""
    major, minor, n_major = (rows, columns, shape[0] // block) if transpose else (columns, rows, shape[1] // block)
    order = torch.argsort(major, stable=True)
    starts = torch.zeros(n_major + 1, dtype=torch.long, device=a.device)
    torch.cumsum(torch.bincount(major, minlength=n_major), 0, out=starts[1:])
    return in_place_ops(a, block).block_product(a.contiguous(), values.to(a.dtype).contiguous(), slots[order],
                                                minor[order], starts, n_major * block, transpose)


def _product(a, values, forward_mask, index, shape, block, transpose: bool):
    """a · W_Aᵀ (transpose: the forward) or a · W_A (the input gradient): the result [T, ·] from
    the in-place or tile path, or a `_GatheredProduct` to feed with passes (`choose_path`).
    `index`: the stored one (int32); the element kernels read it as it is."""
    cols = shape[1] // block
    n_blocks = (shape[0] // block) * cols
    in_a = forward_mask & (index < n_blocks)
    path = _layer_path(a, block, int(torch.count_nonzero(in_a)), shape, len(index))  # .sum() would copy to int64
    _record("forward" if transpose else "input_grad", path)
    if path == "in_place" and block == 1:  # the kernel groups the elements itself (a radix sort)
        return compiled.ops().element_product(a.contiguous(), values.view(-1).to(a.dtype), index, in_a, *shape,
                                              transpose)
    index = index.long()
    if path == "tiles":
        effective = values * forward_mask.view(-1, 1, 1).to(values.dtype)
        return _tile_product(a, effective, index, shape, block, transpose)
    slots = torch.nonzero(in_a).view(-1)
    rows, columns = index[slots] // cols, index[slots] % cols
    if path == "in_place":
        return _in_place_product(a, values, slots, rows, columns, shape, block, transpose)
    blocks = values[slots].to(a.dtype)
    span = _span(a.shape[0])
    if transpose:  # yᵀ[r] = Σ_c W_rc · xᵀ[c]
        return _GatheredProduct(a, blocks, rows, columns, shape[0], span)
    return _GatheredProduct(a, blocks.transpose(1, 2), columns, rows, shape[1], span)  # grad_xᵀ[c] = Σ_r W_rcᵀ · gᵀ[r]


def _value_gradient(g, x, index, shape, block, grad_values):
    """Fills grad_values with gᵀ·x at B's blocks by the in-place or tile path, or returns a
    `_GatheredSddmm` to feed with passes (and None otherwise)."""
    cols = shape[1] // block
    n_blocks = (shape[0] // block) * cols
    in_b = index < n_blocks
    path = _layer_path(g, block, int(torch.count_nonzero(in_b)), shape, len(index))
    _record("value_grad", path)
    if path == "in_place" and block == 1:  # zeros for unused slots, like grad_values
        grad_values.view(-1).copy_(compiled.ops().element_sddmm(g.contiguous(), x.contiguous(), index, *shape))
        return None
    index = index.long()
    if path == "tiles":
        _tile_sddmm(g, x, index, shape, block, grad_values)
        return None
    used = torch.nonzero(in_b).view(-1)
    rows, columns = index[used] // cols, index[used] % cols
    if path == "in_place":
        grads = in_place_ops(g, block).block_sddmm(g.contiguous(), x.contiguous(), rows, columns, block)
        grad_values[used] = grads.to(grad_values.dtype)
        return None
    return _GatheredSddmm(g, used, rows, columns, block, _span(g.shape[0]), shape[1])


def _run_passes(tensors: list[torch.Tensor], block: int, feed) -> None:
    """feed(t0, *passes) for every pass of tokens t0.., where passes are that pass of each of the
    activations `tensors` [T, ·], transposed (`_Transposed`)."""
    tokens = tensors[0].shape[0]
    span = _span(tokens)
    views = [_Transposed(a, block, span) for a in tensors]
    for t0 in range(0, tokens, span):
        feed(t0, *(view(t0, min(span, tokens - t0)) for view in views))


class SparseMatmul(torch.autograd.Function):
    """y = x · W_Aᵀ where W_A holds `values * forward_mask` at grid positions `index`; the
    gradient for `values` covers all of B.

    With `penalty` λ > 0 the value gradient gets Top-KAST's exploration penalty, λ·θ on A and
    λ·θ / D on B \\ A (docs/design/topkast.md), so that clipping and the optimizer see the gradient a
    dense Top-KAST would. Only x (an activation) is saved for backward; A's slots and effective
    values are found again there rather than kept alive between the passes.
    """

    @staticmethod
    def forward(ctx, x, values, forward_mask, stored_index, shape, block, penalty, density):
        x2 = x.reshape(-1, shape[1])
        out = _product(x2, values, forward_mask, stored_index, shape, block, transpose=True)
        if isinstance(out, _GatheredProduct):
            product = out
            _run_passes([x2], block, product.add)
            out = product.out
        ctx.save_for_backward(x, values, forward_mask, stored_index)
        ctx.shape, ctx.block, ctx.penalty, ctx.density = shape, block, penalty, density
        return out.view(*x.shape[:-1], shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, values, forward_mask, index = ctx.saved_tensors
        shape, block = ctx.shape, ctx.block
        x2 = x.reshape(-1, shape[1])
        g2 = grad_out.reshape(-1, shape[0])
        grad_x = grad_values = product = sddmm = None
        if ctx.needs_input_grad[0]:
            grad_x = product = _product(g2, values, forward_mask, index, shape, block, transpose=False)
        if ctx.needs_input_grad[1]:
            grad_values = torch.zeros_like(values)
            sddmm = _value_gradient(g2, x2, index, shape, block, grad_values)
        gathered = isinstance(product, _GatheredProduct)
        if gathered or sddmm is not None:  # one pass over the tokens for both: gᵀ is transposed once

            def feed(t0, g_t, *x_t):
                if gathered:
                    product.add(t0, g_t)
                if sddmm is not None:
                    sddmm.add(g_t, *x_t)

            _run_passes([g2, x2] if sddmm is not None else [g2], block, feed)
        if gathered:
            grad_x = product.out
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        if sddmm is not None:
            grad_values[sddmm.slots] = sddmm.result().to(values.dtype)
        if grad_values is not None and ctx.penalty:
            scale = torch.where(forward_mask, ctx.penalty, ctx.penalty / ctx.density).to(values.dtype)
            grad_values += scale.view(-1, 1, 1) * values
        return grad_x, grad_values, None, None, None, None, None, None

