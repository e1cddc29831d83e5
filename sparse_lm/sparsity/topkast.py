"""Top-KAST (docs/design/topkast.md) on `SparseLinear` layers: re-picking A and B every R steps, and
keeping the optimizer's state attached to the right entries.

Reselection of one layer, all in bounded memory:
1. score every block of the weight, Σ|θ| — B's current values over the complement (regenerated or
   offloaded), one chunk of block-rows at a time — and find the top-(D+M) positions exactly
   (`threshold.select_topk_positions`, the histogram select that also runs over a process group);
2. blocks that stay keep their slot, value and Adam moments; each entering block takes the slot of
   a leaving one with its complement value; the leaving block's value goes back to the offload
   store (with `regenerate` it returns to its initial value);
3. the moments of the re-used slots are zeroed, A is re-picked as the top-D within B.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sparse_lm.config import SparsityConfig
from sparse_lm.optim_state import write_slots, zero_moments
from sparse_lm.parallel.layers import collective_device
from sparse_lm.sparsity.storage import SparseLinear
from sparse_lm.sparsity.threshold import ChunkedScores


def sparse_layers(model: nn.Module) -> list[SparseLinear]:
    return [m for m in model.modules() if isinstance(m, SparseLinear)]


def initialize_static(layer: SparseLinear, seed: int, stream: int, std: float) -> None:
    """`method: static`: B = A = a seeded random set of blocks (same size as Top-KAST's A), fixed."""
    layer.initialize(seed, stream, std)  # values and offload store from θ₀ ...
    noise = lambda r0, r1: layer.seeded_rows(r0, r1, stream ^ 0x5BD1E995, 1.0)  # noqa: E731
    with torch.no_grad():  # ... then the positions re-drawn at random, independent of |θ₀|
        layer.place(layer.choose(noise), layer.initial_rows)
        layer.forward_mask.copy_(layer.live)


@dataclass
class LayerChange:
    """Blocks of B and of A that are new after a reselection (this shard's counts), and how many of
    A's new blocks were not in B before: they come straight from the complement, untrained by this
    run's optimizer since they left (or ever), which is what separates churn inside B from churn
    that reaches the forward pass from outside it."""

    entered_b: int
    entered_a: int
    entered_a_from_outside: int = 0


@torch.no_grad()
def reselect(layer: SparseLinear, optimizer: torch.optim.Optimizer | None, pick_forward: bool = True,
             scores: torch.Tensor | ChunkedScores | None = None, entering_values=None,
             promote: str = "any", max_entering_a: int | None = None) -> LayerChange:
    """Re-pick B and A from current magnitudes; see the module docstring for the steps. With
    `pick_forward=False` A is left to the caller (Spartan re-picks it against the new budget) and
    `entered_a` is 0: picking it here too would cost one more sharded top-k per layer for nothing.
    Another method may rank blocks by its own `scores` (default: Σ|θ| of the current weight) and
    give entering blocks its own values (`entering_values(positions)`, default: the complement's).
    `promote="trained"` keeps blocks that have just entered B out of A unless the blocks that stayed
    in B are too few: a newcomer is first trained in B \\ A, instead of reaching the forward pass
    at its complement value (`sparsity.promote`). `max_entering_a` = m caps A's change
    (`sparsity.churn_cap`): A's top k_A − m blocks by Σ|θ| stay in B and in A (scored +∞ for B's
    pick, as RigL keeps its kept set), and A's other m blocks are the top of the new B without
    them, so at most m blocks enter A — RigL's drop-and-grow, grown by magnitude within B.

    A shard's number of used slots may change (see `storage`): entering blocks fill the slots of
    leaving ones, then unused ones; slots left over become unused (value 0, moments 0)."""
    old_positions = layer.index.long().clone()
    old_forward = old_positions[layer.forward_mask]
    scores = layer.current_scores() if scores is None else scores
    kept = None  # the slots of A's blocks that stay in A whatever B's scores say (a capped change)
    if max_entering_a is not None and max_entering_a < layer.k_forward:
        kept = layer.select_forward(layer.k_forward - max_entering_a, among=layer.forward_mask)
        scores = ranked_first(scores, old_positions[kept], layer.n_blocks)
    new_positions = layer.select_backward(scores)
    staying = layer.live & _members(old_positions, new_positions, layer.n_blocks)
    entering = new_positions[~_members(new_positions, old_positions, layer.n_blocks)]  # ascending
    free = torch.nonzero(~staying).view(-1)  # slots of leaving blocks and unused slots, ascending
    newcomers = None
    if len(free):
        leaving = free[old_positions[free] < layer.n_blocks]
        if layer.complement_policy == "offload" and len(leaving):
            _store_blocks(layer, old_positions[leaving], layer.values[leaving])
        filled, emptied = free[: len(entering)], free[len(entering) :]
        new_values = layer.values.new_zeros(len(free), layer.block, layer.block)
        new_values[: len(entering)] = (entering_values or layer.complement_blocks)(entering)
        write_slots(layer.values, free, new_values)
        layer.index[filled] = entering.to(layer.index.dtype)
        if promote == "trained":
            newcomers = torch.zeros_like(layer.live)
            newcomers[filled] = True
        layer.index[emptied] = layer.n_blocks
        zero_moments(optimizer, layer.values, free)
    if not pick_forward:
        return LayerChange(entered_b=len(entering), entered_a=0)
    if kept is None:
        layer.forward_mask.copy_(layer.select_forward(last=newcomers))
    else:  # kept blocks stayed in B, so in their slots
        grown = layer.select_forward(max_entering_a, last=newcomers, among=~kept) if max_entering_a else kept
        layer.forward_mask.copy_(kept | grown)
    new_forward = layer.index.long()[layer.forward_mask]
    entered_a = int((~_members(new_forward, old_forward, layer.n_blocks)).sum())
    from_outside = int(_members(new_forward, entering, layer.n_blocks).sum())
    return LayerChange(entered_b=len(entering), entered_a=entered_a, entered_a_from_outside=from_outside)


def ranked_first(scores: torch.Tensor | ChunkedScores, positions: torch.Tensor, n_blocks: int) -> ChunkedScores:
    """`scores` with the blocks at `positions` scored +∞, chunk by chunk (a byte per block of the
    grid, transient, marks them), so an exact top-k of at least as many keeps them: the kept set
    of a capped Top-KAST reselection and of a RigL update."""
    first = torch.zeros(n_blocks, dtype=torch.bool, device=positions.device)
    first[positions] = True
    scores = ChunkedScores.of(scores)

    def chunks():
        offset = 0
        for chunk in scores.chunks():
            marked = first[offset : offset + len(chunk)].to(chunk.device)
            offset += len(chunk)
            yield chunk.masked_fill(marked, math.inf)

    return ChunkedScores(chunks, scores.numel, scores.device)


def cosine_decayed(start: float, step: int, end: float) -> float:
    """start/2·(1 + cos(πt / end)), 0 from `end` on (and for end = 0): RigL's decay of its update
    fraction, also Top-KAST's `churn_cap`."""
    return start / 2 * (1 + math.cos(math.pi * min(1.0, step / end))) if end else 0.0


def _members(values: torch.Tensor, of: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """values[i] ∈ `of`, for grid positions ≤ n_blocks (n_blocks: an unused slot), through a bitmap
    of the grid: a byte per block, transient (a quarter of the layer's fp32 weight in element
    mode). Sorting for a binary search (and `torch.isin` before it) was ~20% of an element-mode
    reselection of a 4M-element layer: 0.43–0.52 s → 0.35–0.36 s of CPU time with this and the
    in-place Box–Muller (`init`)."""
    present = torch.zeros(n_blocks + 1, dtype=torch.bool, device=values.device)
    present[of] = True
    return present[values]


def _store_blocks(layer: SparseLinear, positions: torch.Tensor, values: torch.Tensor) -> None:
    """Write blocks back into the offload store (a [out, in] host tensor) at grid positions."""
    b = layer.block
    grid = layer.complement.view(layer.block_rows, b, layer.block_cols, b).permute(0, 2, 1, 3)
    positions = positions.cpu()
    grid[positions // layer.block_cols, positions % layer.block_cols] = values.detach().cpu().to(grid.dtype)


class TopKAST:
    """The schedule: reselect every `reselect_every` steps until `freeze_masks_after` · steps."""

    def __init__(self, model: nn.Module, cfg: SparsityConfig, total_steps: int, group=None, reselects: bool = True):
        """`group`: the ranks whose layers together form the model (tensor × pipeline), or None.
        `reselects`: whether the method re-picks its sets at all (a static mask or dense does not)."""
        self.layers, self.group = sparse_layers(model), group
        self.every = cfg.reselect_every
        self.active = reselects and (bool(self.layers) or group is not None)
        self.freeze_at = cfg.freeze_masks_after * total_steps
        self.promote, self.churn_cap = cfg.promote, cfg.churn_cap

    def due(self, step: int) -> bool:
        return self.active and step % self.every == 0 and step < self.freeze_at

    def start(self, step: int) -> None:
        """Before the first step of a run or of a resumed one: nothing to prepare for Top-KAST."""

    def describe(self) -> str | None:
        """A line for the run's log about the schedule, if it has more to say than the config."""
        return None

    def stats(self) -> dict[str, float] | None:
        """This rank's sparse linears for the run's log, or None without any: how many, the
        parameters their dense weights would add beyond the stored values (`dense_extra`), and the
        forward density (the blocks of A over all blocks, weighted by block area)."""
        if not self.layers:
            return None
        kept = sum(layer.k_forward * layer.block**2 for layer in self.layers)
        return {
            "layers": len(self.layers),
            "dense_extra": sum(layer.out_features * layer.in_features - layer.values.numel() for layer in self.layers),
            "forward_density": kept / sum(layer.global_blocks * layer.block**2 for layer in self.layers),
        }

    def churn_fraction(self, step: int) -> float | None:
        """The most of A the reselection after step t may replace, c/2·(1 + cos(πt / T_end)) with
        c = `churn_cap` and T_end the freezing step — RigL's decay of its update fraction — or
        None without a cap."""
        return None if self.churn_cap is None else cosine_decayed(self.churn_cap, step, self.freeze_at)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> dict[str, float] | None:
        """After optimizer step `step`: reselect when due; returns the reselection's record."""
        if not self.due(step):
            return None
        fraction = self.churn_fraction(step)
        if fraction is None:
            return self.reselect_all(optimizer)
        record = self.reselect_all(optimizer, update=lambda layer: reselect(
            layer, optimizer, promote=self.promote, max_entering_a=math.floor(fraction * layer.k_forward)))
        return {**record, "churn_cap": fraction}

    def reselect_all(self, optimizer: torch.optim.Optimizer | None, pick_forward: bool = True,
                     update=None) -> dict[str, float]:
        """Reselect every layer; the fractions of the whole model's A and B that changed and the
        number of layers that hit a shard's slot capacity, summed over tensor-parallel shards and
        pipeline stages (each layer's budget counted once, by its tensor-parallel rank 0), and the
        fraction of A that entered it from outside B (`a_from_outside`, ≤ `changed_a`). Without
        `pick_forward` A is the caller's to pick, and to report. `update(layer)`: another method's
        per-layer reselection returning its `LayerChange` (default: `reselect`)."""
        started = time.perf_counter()
        update = update or (lambda layer: reselect(layer, optimizer, pick_forward, promote=self.promote))
        changes = [update(layer) for layer in self.layers]
        first = [layer for layer in self.layers if layer.spec is None or layer.spec.rank == 0]
        counts = torch.tensor([sum(c.entered_b for c in changes), sum(c.entered_a for c in changes),
                               sum(c.entered_a_from_outside for c in changes),
                               sum(layer.capped_ranks > 0 for layer in first),
                               sum(layer.k_backward for layer in first), sum(layer.k_forward for layer in first)],
                              dtype=torch.float64, device=collective_device(self.group))
        if self.group is not None:
            dist.all_reduce(counts, group=self.group)
        entered_b, entered_a, from_outside, capped, k_b, k_a = counts.tolist()
        record = {"changed_b": entered_b / k_b, "capacity_bound_layers": int(capped),
                  "seconds": time.perf_counter() - started}
        if pick_forward:
            record["changed_a"] = entered_a / k_a
            record["a_from_outside"] = from_outside / k_a
        return record


def verify_replicas(layers: list[SparseLinear], group, step: int) -> None:
    """Raise on every rank if the data-parallel replicas in `group` hold different sparse sets.

    One all-reduce of (checksum, −checksum) with MAX: equal replicas give max == −(−max)."""
    from sparse_lm.errors import UserError

    total = 0.0
    for i, layer in enumerate(layers):  # slot-order sensitive: replicas must agree slot for slot
        index = layer.index.double()
        weights = torch.arange(len(index), dtype=torch.float64, device=index.device) % 9973 + 1
        total += float((index * weights).sum()) * (i + 1) + float((layer.forward_mask.double() * weights).sum())
    both = torch.tensor([total, -total], dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if float(both[0]) != -float(both[1]):
        raise UserError(f"step {step}: data-parallel replicas selected different sparse sets (checksums "
                        f"{float(both[0]):.6g} vs {-float(both[1]):.6g}); parallel.verify_replicas caught a "
                        "non-deterministic reselection — please report it with the config")
