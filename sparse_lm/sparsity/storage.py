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

Tensor parallelism: the layer may be one rank's shard of a larger weight (`spec`, see
`parallel.layout`). Its budgets k_A and k_B are those of the *whole* layer and are selected
exactly over the tensor-parallel group (`threshold.select_topk_capped`), so a shard's share of B
varies from one reselection to the next. A parameter cannot change size under the optimizer, so
each shard has a fixed number of slots, `capacity` = its fair share k_B/T plus `headroom`; slots
it does not need are unused (index = n_blocks, value 0, never in A, zero gradient). Only when a
shard's exact share exceeds its capacity does the selection deviate from the exact top-k (it then
keeps the shard's own top blocks and fills the budget elsewhere), and that is counted and logged.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from sparse_lm.parallel.layers import (
    collective_device,
    enter_region,
    leave_region,
    mark_sharded,
    tensor_parallel_group,
)
from sparse_lm.parallel.layout import ShardSpec
from sparse_lm.sparsity.init import counter_normal_at, counter_normal_rows
from sparse_lm.sparsity.kernels import SparseMatmul, from_blocks, scatter_blocks, to_blocks
from sparse_lm.sparsity.threshold import ChunkedScores, select_topk_capped, select_topk_positions

# Block-rows scored per chunk at (re)selection: bounds the transient dense rows it regenerates.
SCORE_CHUNK_ELEMENTS = 1 << 20
# With `complement: regenerate`, θ₀'s score per block never changes, so layers whose blocks hold at
# least this many elements (b ≥ 8: the scores are ≤ 1/64 of the dense weight's size) keep them
# after the first selection: a reselection then scores the layer from them and B's values, and
# regenerates only the blocks that enter B, instead of all of θ₀ (0.8 s of counter-based
# hashing per 4M-element layer, ~5% of the step time amortised over 100 steps).
CACHED_SCORES_MIN_BLOCK = 8


def set_sizes(density: float, exploration: float, blocks: int, forward: int | None = None) -> tuple[int, int]:
    """(k_A, k_B): blocks of a layer of `blocks` in the forward set A (⌈D·N⌉, at least one) and the
    backward set B (⌈(D + M)·N⌉, at least A, at most all) — the layer's and the planner's one rule.
    A per-layer allocation (`forward`: the layer's share of A, `allocation.static_budgets`) gives
    the count itself, as an integer, so no density round-trips through a float; B then adds what
    the uniform rule adds beyond A."""
    uniform = max(1, math.ceil(density * blocks))
    extra = math.ceil((density + exploration) * blocks) - uniform
    k_forward = uniform if forward is None else forward
    return k_forward, min(blocks, max(k_forward, k_forward + extra))


def shard_capacity(k_backward: int, parts: int, shard_blocks: int, headroom: float) -> int:
    """Slots of one of `parts` shards of a layer whose B holds `k_backward` blocks."""
    if parts == 1:
        return k_backward
    return min(shard_blocks, math.ceil(k_backward / parts * (1 + headroom)))


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
        spec: ShardSpec | None = None,
        headroom: float = 0.25,
        supar: bool = False,
        forward_blocks: int | None = None,
    ):
        super().__init__()
        if in_features % block or out_features % block:
            shard = " (this rank's tensor-parallel shard)" if spec else ""
            raise ValueError(f"{name}: block size {block} must divide the weight shape "
                             f"[{out_features}, {in_features}]{shard}")
        self.name, self.spec = name, spec
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.block_rows, self.block_cols = out_features // block, in_features // block
        global_rows, global_cols = spec.global_shape(self.shape) if spec else self.shape
        self.row0, self.col0 = spec.offset(self.shape) if spec else (0, 0)
        self.global_in, self.global_blocks = global_cols, (global_rows // block) * (global_cols // block)
        self.k_forward, self.k_backward = set_sizes(density, exploration, self.global_blocks, forward_blocks)
        self.density, self.penalty = self.k_forward / self.global_blocks if forward_blocks else density, penalty
        self.capacity = shard_capacity(self.k_backward, spec.size if spec else 1, self.n_blocks, headroom)
        index_dtype = torch.int32 if self.n_blocks < 2**31 - 1 else torch.int64
        self.values = nn.Parameter(torch.zeros(self.capacity, block, block))
        mark_sharded(self.values, spec)
        self.register_buffer("index", torch.full((self.capacity,), self.n_blocks, dtype=index_dtype))
        self.register_buffer("forward_mask", torch.zeros(self.capacity, dtype=torch.bool))
        self.complement_policy = complement
        if complement == "offload":
            self.register_buffer("complement", torch.zeros(out_features, in_features))
        self.seed, self.stream, self.init_std = 0, 0, 0.0
        self.supar, self.init_gain = supar, 1.0  # see `dense_variance_gain`
        self._initial_scores, self._initial_scores_key = None, None  # see `initial_block_scores`
        self.capped_ranks = 0  # at the last selection: shards whose exact share exceeded capacity

    def _apply(self, fn, recurse=True):
        """`module.to(device)` and `.bfloat16()` (DeepSpeed applies both) leave the offload store
        where it is: it is a dense weight, kept in host memory in fp32 and read only at reselection
        (`complement_rows` copies what it needs to the values' device)."""
        store = self._buffers.pop("complement", None)
        try:
            return super()._apply(fn, recurse)
        finally:
            if store is not None:
                self._buffers["complement"] = store

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def n_blocks(self) -> int:
        return self.block_rows * self.block_cols

    def extra_repr(self) -> str:
        shard = (f", shard {self.spec.rank}/{self.spec.size} of dim {self.spec.dim}, {self.capacity} slots"
                 if self.spec else "")
        return (f"{self.in_features} -> {self.out_features}, block {self.block}, "
                f"|A| {self.k_forward}/{self.global_blocks}, |B| {self.k_backward}/{self.global_blocks}{shard}")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        penalty = self.penalty if self.training else 0.0
        y = SparseMatmul.apply(enter_region(x, self.spec), self.values, self.forward_mask, self.index, self.shape,
                               self.block, penalty, self.density)
        return leave_region(y, self.spec)

    @property
    def group(self):
        """The process group sharing this layer's budget (None: the layer is whole here)."""
        return tensor_parallel_group() if self.spec else None

    @property
    def live(self) -> torch.Tensor:
        """Which slots hold a block of B (the rest are spare capacity)."""
        return self.index.long() < self.n_blocks

    # ------------------------------------------------------------------ the weight outside B
    def initial_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Initial values of block-rows r0..r1-1, dense [rows, in], regenerated from the seed."""
        return self.seeded_rows(r0, r1, self.stream, self.init_std)

    def seeded_rows(self, r0: int, r1: int, stream: int, std: float) -> torch.Tensor:
        """Counter-based normals for block-rows r0..r1-1 of this shard, indexed by *global* element
        position, so any tensor-parallel layout sees the same numbers."""
        b = self.block
        return counter_normal_rows(self.seed, stream, self.global_in, self.row0 + r0 * b, self.col0,
                                   (r1 - r0) * b, self.in_features, std, self.values.device)

    def complement_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Current values outside B for block-rows r0..r1-1 (dense rows; B's own entries stale)."""
        if self.complement_policy == "offload":
            rows = self.complement[r0 * self.block : r1 * self.block]
            return rows.to(self.values.device, copy=True)
        return self.initial_rows(r0, r1)

    def initial_blocks(self, positions: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[n, b, b] initial values of the blocks at grid positions `positions` of this shard,
        regenerated element by element (the same numbers `initial_rows` gives), written into `out`
        (any dtype; default a new fp32 tensor) about SCORE_CHUNK_ELEMENTS at a time: the int64
        positions and the hash's two uniforms are 16 bytes per element, so all of B at once (at
        initialisation) would be a transient four times B's fp32 values."""
        b, positions = self.block, positions.long()
        if out is None:
            out = torch.empty(len(positions), b, b, device=positions.device)
        offsets = torch.arange(b, device=positions.device)
        per = max(1, SCORE_CHUNK_ELEMENTS // (b * b))
        for start in range(0, len(positions), per):
            chunk = positions[start : start + per]
            rows = (self.row0 + chunk // self.block_cols * b).view(-1, 1, 1) + offsets.view(1, -1, 1)
            cols = (self.col0 + chunk % self.block_cols * b).view(-1, 1, 1) + offsets.view(1, 1, -1)
            out[start : start + per] = counter_normal_at(self.seed, self.stream, rows * self.global_in + cols,
                                                         self.init_std)
        return out

    def complement_blocks(self, positions: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[n, b, b] current values outside B of the blocks at `positions` (ascending), in the
        values' dtype, written into `out` when given."""
        if out is None:
            out = self.values.new_empty(len(positions), self.block, self.block)
        if self.complement_policy == "offload":
            out.copy_(self.gather_blocks(positions, self.complement_rows))
            return out
        return self.initial_blocks(positions, out)

    def current_rows(self):
        """A `rows_fn(r0, r1)` giving the weight's current values in block-rows r0..r1-1: the
        complement with B laid over it. It finds a chunk's slots by binary search in one sorted copy
        of the index, made here and dropped with the function, so a pass over all chunks costs one
        sort of B rather than one scan of B per chunk (a 1e8-element layer has ~100 chunks)."""
        index = self.index.long()
        order = torch.argsort(index)
        sorted_index = index[order]  # unused slots (index n_blocks) sort last and fall in no chunk
        values = self.values.detach()
        cols = self.block_cols

        def rows_fn(r0: int, r1: int) -> torch.Tensor:
            lo, hi = torch.searchsorted(sorted_index,
                                        torch.tensor([r0 * cols, r1 * cols], device=index.device)).tolist()
            blocks = to_blocks(self.complement_rows(r0, r1), self.block)
            blocks[sorted_index[lo:hi] - r0 * cols] = values[order[lo:hi]].to(blocks.dtype)
            return from_blocks(blocks, r1 - r0, cols)

        return rows_fn

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
                yield block_sums(to_blocks(rows_fn(r0, r1), b))

        return ChunkedScores(chunks, self.n_blocks, self.values.device)

    def caches_scores(self) -> bool:
        return self.complement_policy == "regenerate" and self.block >= CACHED_SCORES_MIN_BLOCK

    def initial_block_scores(self) -> torch.Tensor:
        """Σ|θ₀| per block of this shard, [n_blocks]: computed once from the seed and kept (not
        saved — the seed, stream and std it depends on rebuild it on demand)."""
        key = (self.seed, self.stream, self.init_std, self.values.device)
        if self._initial_scores_key != key:
            self._initial_scores = torch.cat(list(self.block_scores(self.initial_rows).chunks()))
            self._initial_scores_key = key
        return self._initial_scores

    def current_scores(self) -> torch.Tensor | ChunkedScores:
        """Σ|θ| per block of the current weight (B's values over the complement)."""
        if not self.caches_scores():
            return self.block_scores(self.current_rows())
        scores = self.initial_block_scores().clone()
        live = torch.nonzero(self.live).view(-1)
        scores[self.index.long()[live]] = block_sums(self.values.detach()[live]).to(scores.dtype)
        return scores

    def dense_weight(self, forward_only: bool = True) -> torch.Tensor:
        """The dense [out, in] weight: A only (what the forward pass uses) or all current values.
        For export and tests — training never builds it."""
        if not forward_only:
            rows_fn = self.current_rows()
            return torch.cat([rows_fn(r0, r1) for r0, r1 in self.row_chunks()])
        effective = self.values.detach() * self.forward_mask.view(-1, 1, 1)
        blocks = scatter_blocks(effective, self.index.long(), self.n_blocks)
        return from_blocks(blocks, self.block_rows, self.block_cols)

    # ------------------------------------------------------------------ selection
    def initialize(self, seed: int, stream: int, std: float) -> None:
        """B = the top-(D+M) blocks of |θ₀|, A = the top-D; θ₀ is regenerated in chunks, never whole."""
        self.seed, self.stream, self.init_std = seed, stream, std
        with torch.no_grad():
            if self.complement_policy == "offload":  # fill the store first, then read B from it
                for r0, r1 in self.row_chunks():
                    self.complement[r0 * self.block : r1 * self.block] = self.initial_rows(r0, r1).cpu()
            scores = self.initial_block_scores() if self.caches_scores() else self.block_scores(self.initial_rows)
            self.place(self.select_backward(scores))
            self.forward_mask.copy_(self.select_forward())

    @torch.no_grad()
    def dense_variance_gain(self) -> float:
        """SμPar's init gain: the factor g for which θ₀·g gives A the sum of squares a dense layer
        of the same init has in expectation, rows·cols·σ², so the layer's output variance (for
        white inputs) is the dense layer's. For a random A (`static`) g² ≈ 1/ρ, SμPar's rule; for
        A picked by magnitude (Top-KAST, Spartan) the largest weights already hold more than ρ of
        the variance (65% at ρ = 0.2, element-wise), and 1/√ρ would overshoot it 3×. Summed over
        the tensor-parallel group, so every shard gets the whole layer's gain."""
        total = self.values.detach()[self.forward_mask].double().pow(2).sum().reshape(1)
        if self.group is not None:
            total = total.to(collective_device(self.group))
            dist.all_reduce(total, group=self.group)
        expected = self.global_blocks * self.block**2 * self.init_std**2
        return math.sqrt(expected / float(total))

    def choose(self, rows_fn) -> torch.Tensor:
        """This shard's positions of the layer's top-k_B blocks by Σ|rows_fn| (ascending)."""
        return self.select_backward(self.block_scores(rows_fn))

    def select_backward(self, scores: torch.Tensor | ChunkedScores) -> torch.Tensor:
        """This shard's positions of the layer's top-k_B blocks by `scores` (ascending), selected
        over the tensor-parallel group. Global order for ties: rank-major, row-major within a shard."""
        positions, self.capped_ranks = select_topk_capped(
            scores, self.k_backward, self.capacity, self.group,
            global_offset=(self.spec.rank if self.spec else 0) * self.n_blocks, global_numel=self.global_blocks)
        return positions

    def place(self, positions: torch.Tensor, rows_fn=None) -> None:
        """Fill the slots with the blocks at `positions`, their values read from `rows_fn` (default:
        the complement, block by block — at initialisation θ₀ is then hashed once, for the scores,
        not a second time row by row for the chosen blocks); the remaining slots are unused."""
        n = len(positions)
        self.index.fill_(self.n_blocks)
        self.index[:n] = positions.to(self.index.dtype)
        self.values.zero_()
        if rows_fn is None:
            self.complement_blocks(positions, out=self.values.data[:n])
        else:
            self.values[:n] = self.gather_blocks(positions, rows_fn)

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

    def select_forward(self, k: int | None = None, last: torch.Tensor | None = None,
                       among: torch.Tensor | None = None) -> torch.Tensor:
        """A = the layer's top-k blocks (default k_A) by Σ|θ| within B (the top-D overall, as B
        holds the top D + M), selected over the tensor-parallel group among the used slots (and
        `among` them, a bool per slot, if given). `last` (a bool per slot): slots ranked after
        every other, in their own order, so A takes them only when the others are too few. One
        exact top-k serves both tiers: the others' scores s become 1 + s (≥ 1) and the last ones'
        s / (1 + s) (< 1), both increasing in s."""
        used = torch.nonzero(self.live if among is None else self.live & among).view(-1)
        scores = block_sums(self.values.detach()[used]).float()
        if last is not None:
            tail = last[used]
            scores = torch.where(tail, scores / (1.0 + scores), 1.0 + scores)
        rank = self.spec.rank if self.spec else 0
        picked = select_topk_positions(scores, self.k_forward if k is None else k, self.group,
                                       global_offset=rank * self.capacity)
        mask = torch.zeros(self.capacity, dtype=torch.bool, device=self.values.device)
        mask[used[picked]] = True
        return mask


def block_sums(blocks: torch.Tensor) -> torch.Tensor:
    """Σ|θ| of each [b, b] block of blocks [n, b, b]: the one reduction every block score uses, so
    scores of the same numbers agree to the bit whichever way they were gathered. Summed in fp32
    at least: bf16 values (DeepSpeed's model copy on a GPU) summed in bf16 gave 57 distinct scores
    among 4096 random 16×16 blocks, leaving the selection to ties."""
    return blocks.abs().to(score_dtype(blocks.dtype)).sum(dim=(1, 2))


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores of `dtype` values are summed in: fp32, or fp64 for fp64 values."""
    return torch.promote_types(dtype, torch.float32)
