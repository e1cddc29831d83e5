"""The pure-torch gathered path: activation slabs gathered per block into reused workspaces, one
`bmm` per chunk of blocks, the tokens a pass at a time."""

from __future__ import annotations

import torch

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


def pass_tokens(tokens: int) -> int:
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


class Transposed:
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


class GatheredProduct:
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


class GatheredSddmm:
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


def run_passes(tensors: list[torch.Tensor], block: int, feed) -> None:
    """feed(t0, *passes) for every pass of tokens t0.., where passes are that pass of each of the
    activations `tensors` [T, ·], transposed (`Transposed`)."""
    tokens = tensors[0].shape[0]
    span = pass_tokens(tokens)
    views = [Transposed(a, block, span) for a in tensors]
    for t0 in range(0, tokens, span):
        feed(t0, *(view(t0, min(span, tokens - t0)) for view in views))
