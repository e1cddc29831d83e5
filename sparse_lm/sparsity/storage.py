"""A linear layer that stores only its backward set B: values, grid positions, A-membership.

Per layer (one tensor-parallel shard of it, once the parallel layers land) this module holds:

* `values` — the nn.Parameter, [|B|, b, b] (b = 1 for element granularity). Its gradient and the
  optimizer's moments are |B|-sized too: DeepSpeed sees an ordinary parameter.
* `index` — int32 (int64 beyond 2^31 blocks) row-major grid position of each slot's block.
* `forward_mask` — which slots are in A.
* `complement` (only with `complement: offload`) — the current values of the *whole* weight, on
  the host, read and written only at reselection. With `regenerate` (the default) an entry
  outside B is its initial value, recomputed from (seed, layer, position) by `init.counter_normal`.

Slots are stable: a reselection moves an entering block into the slot of a leaving one, so the
optimizer only needs the changed slots' moments zeroed (see `topkast.reselect`). Nothing of dense
size persists between steps (the offload store is the paper's exact semantics, kept off-device).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparse_lm.sparsity.init import counter_normal
from sparse_lm.sparsity.kernels import SparseMatmul, from_blocks, slots_in_rows, to_blocks
from sparse_lm.sparsity.threshold import ChunkedScores, select_topk_positions

# Block-rows scored per chunk at (re)selection: bounds the transient dense rows it regenerates.
SCORE_CHUNK_ELEMENTS = 1 << 20


class SparseLinear(nn.Module):
    """y = x · W_Aᵀ with W stored as B only. Built empty; `initialize` picks B and A from |θ₀|."""

    def __init__(
        self,
        name: str,
        in_features: int,
        out_features: int,
        density: float,
        exploration: float,
        block: int = 1,
        penalty: float = 0.0,
        complement: str = "regenerate",
    ):
        super().__init__()
        if in_features % block or out_features % block:
            raise ValueError(f"{name}: block size {block} must divide the weight shape [{out_features}, {in_features}]")
        self.name = name
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.block_rows, self.block_cols = out_features // block, in_features // block
        n_blocks = self.block_rows * self.block_cols
        self.density, self.penalty = density, penalty
        self.k_forward = max(1, math.ceil(density * n_blocks))
        self.k_backward = min(n_blocks, max(self.k_forward, math.ceil((density + exploration) * n_blocks)))
        index_dtype = torch.int32 if n_blocks < 2**31 else torch.int64
        self.values = nn.Parameter(torch.zeros(self.k_backward, block, block))
        self.register_buffer("index", torch.zeros(self.k_backward, dtype=index_dtype))
        self.register_buffer("forward_mask", torch.zeros(self.k_backward, dtype=torch.bool))
        self.complement_policy = complement
        if complement == "offload":
            self.register_buffer("complement", torch.zeros(out_features, in_features))
        self.seed, self.stream, self.init_std = 0, 0, 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def n_blocks(self) -> int:
        return self.block_rows * self.block_cols

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, block {self.block}, "
                f"|A| {self.k_forward}/{self.n_blocks}, |B| {self.k_backward}/{self.n_blocks}")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        penalty = self.penalty if self.training else 0.0
        return SparseMatmul.apply(x, self.values, self.forward_mask, self.index, self.shape, self.block,
                                  penalty, self.density)

    # ------------------------------------------------------------------ the weight outside B
    def initial_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Initial values of block-rows r0..r1-1, dense [rows, in], regenerated from the seed."""
        width = self.in_features
        start, count = r0 * self.block * width, (r1 - r0) * self.block * width
        return counter_normal(self.seed, self.stream, start, count, self.init_std, self.values.device).view(-1, width)

    def complement_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Current values outside B for block-rows r0..r1-1 (dense rows; B's own entries stale)."""
        if self.complement_policy == "offload":
            rows = self.complement[r0 * self.block : r1 * self.block]
            return rows.to(self.values.device, copy=True)
        return self.initial_rows(r0, r1)

    def current_rows(self, r0: int, r1: int) -> torch.Tensor:
        """The weight's current values in block-rows r0..r1-1: the complement with B laid over it."""
        rows = self.complement_rows(r0, r1)
        slots, local = slots_in_rows(self.index.long(), r0, r1, self.block_rows, self.block_cols)
        blocks = to_blocks(rows, self.block)
        values = self.values.detach()
        blocks[local] = (values if slots is None else values[slots]).to(blocks.dtype)
        return from_blocks(blocks, r1 - r0, self.block_cols)

    def row_chunks(self):
        """(first, last) block-rows per scoring chunk, about SCORE_CHUNK_ELEMENTS each."""
        per = max(1, SCORE_CHUNK_ELEMENTS // (self.block * self.in_features))
        for r0 in range(0, self.block_rows, per):
            yield r0, min(self.block_rows, r0 + per)

    def block_scores(self, rows_fn) -> ChunkedScores:
        """Σ|θ| per block over the whole weight, one chunk of block-rows at a time (row-major grid)."""
        b = self.block

        def chunks():
            for r0, r1 in self.row_chunks():
                rows = rows_fn(r0, r1).abs()
                yield rows.view(r1 - r0, b, self.block_cols, b).sum(dim=(1, 3)).reshape(-1)

        return ChunkedScores(chunks, self.n_blocks, self.values.device)

    def dense_weight(self, forward_only: bool = True) -> torch.Tensor:
        """The dense [out, in] weight: A only (what the forward pass uses) or all current values.
        For export and tests — training never builds it."""
        if not forward_only:
            return torch.cat([self.current_rows(r0, r1) for r0, r1 in self.row_chunks()])
        blocks = self.values.new_zeros(self.n_blocks, self.block, self.block, requires_grad=False)
        blocks[self.index.long()] = self.values.detach() * self.forward_mask.view(-1, 1, 1)
        return from_blocks(blocks, self.block_rows, self.block_cols)

    # ------------------------------------------------------------------ selection
    def initialize(self, seed: int, stream: int, std: float) -> None:
        """B = the top-(D+M) blocks of |θ₀|, A = the top-D; θ₀ is regenerated in chunks, never whole."""
        self.seed, self.stream, self.init_std = seed, stream, std
        with torch.no_grad():
            positions = select_topk_positions(self.block_scores(self.initial_rows), self.k_backward)
            self.index.copy_(positions.to(self.index.dtype))
            if self.complement_policy == "offload":  # fill the store first, then read B from it
                for r0, r1 in self.row_chunks():
                    self.complement[r0 * self.block : r1 * self.block] = self.initial_rows(r0, r1).cpu()
            self.values.copy_(self.gather_blocks(positions, self.complement_rows))
            self.forward_mask.copy_(self.select_forward())

    def gather_blocks(self, positions: torch.Tensor, rows_fn) -> torch.Tensor:
        """[len(positions), b, b] values at grid positions (sorted ascending), read chunk by chunk."""
        out = self.values.new_empty(len(positions), self.block, self.block)
        bounds = torch.tensor([r0 * self.block_cols for r0, _ in self.row_chunks()] + [self.n_blocks])
        cuts = torch.searchsorted(positions.cpu(), bounds).tolist()
        for (r0, r1), lo, hi in zip(self.row_chunks(), cuts, cuts[1:]):
            if lo == hi:
                continue
            out[lo:hi] = to_blocks(rows_fn(r0, r1), self.block)[positions[lo:hi] - r0 * self.block_cols]
        return out

    def select_forward(self) -> torch.Tensor:
        """A = the top-D blocks by Σ|θ| within B (the top-D overall, as B holds the top D + M)."""
        scores = self.values.detach().abs().sum(dim=(1, 2)).float()
        mask = torch.zeros(self.k_backward, dtype=torch.bool, device=self.values.device)
        mask[select_topk_positions(scores, self.k_forward)] = True
        return mask
