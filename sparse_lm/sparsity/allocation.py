"""How Spartan splits the model's forward budget over its sparse layers (docs/design/spartan.md).

Every allocation spends the same total: Σ_l ⌈ρ·N_l⌉ blocks of A (N_l = blocks of layer l), what
`uniform` gives, so runs that differ only in allocation cost the same sparse forward FLOPs. A
layer's share is capped by its candidate set B (A ⊆ B): ⌈(ρ + M)·N_l⌉ blocks, or N_l with
`candidates: dense`. Storage never depends on the allocation — B, and so every shard's slots, are
sized as in Top-KAST — so a checkpoint loads under any layout; a layer's share is a `budget`
buffer saved with it.

* `uniform`: ρ in every layer.
* `erk` (Erdős–Rényi-Kernel, as in RigL): density ∝ (n_in + n_out)/(n_in·n_out), scaled to the
  total; layers that would exceed their cap are held at it and the rest re-scaled.
* `pipeline_balanced` (ours): equal post-sparsity forward FLOPs per pipeline stage. Stages differ in
  dense work (the LM head sits on the last one; DeepSpeed may give stages unequal numbers of
  blocks), so the sparse FLOPs are water-filled against it: stage s gets f_s blocks with
  dense_s + f_s·q equal across stages (q = 2b² FLOPs per block per token) within one block, then
  f_s is spread over the stage's layers in proportion to their size.
* `global`: one hard threshold on the unit value uⱼ = Σ|θ|/b² (every block costs the same
  2b² FLOPs per token) over the candidate blocks of all layers, by the sharded histogram select
  over the tensor × pipeline group (docs/design/threshold.md).

The first three depend only on the config (`static_budgets`); `global` is recomputed from
the weights at every reselection of B (`reallocate`). Between reallocations each layer's soft
top-k runs against its own budget over its tensor-parallel group. That is where we depart from
one model-wide μ: a pipeline stage runs its forward and backward at times of its own (1F1B), so a
collective over all stages inside them would serialise or deadlock the schedule; budgets move
between layers only at reallocation, outside the forward and backward passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparse_lm.config import RunConfig
from sparse_lm.methods.registry import method_of
from sparse_lm.parallel.layers import collective_device
from sparse_lm.parallel.layout import BLOCK_LINEAR_NAMES, block_linear_shapes, linear_name, stage_of
from sparse_lm.sparsity.storage import set_sizes
from sparse_lm.sparsity.threshold import select_topk_positions

DYNAMIC = ("global",)


@dataclass(frozen=True)
class LayerShape:
    """A sparse linear of the whole model: canonical name, global [rows, cols], pipeline stage."""

    name: str
    rows: int
    cols: int
    stage: int


def sparse_linear_shapes(cfg: RunConfig) -> list[LayerShape]:
    """The model's sparse linears in forward order, placed on `cfg.parallel.pipeline` stages."""
    m = cfg.model
    dims = block_linear_shapes(m)
    shapes = []
    for i in range(m.n_layers):
        for leaf in BLOCK_LINEAR_NAMES:
            if leaf in cfg.sparsity.targets:
                name = linear_name(i, leaf)
                shapes.append(LayerShape(name, *dims[leaf], stage_of(name, m.n_layers, cfg.parallel.pipeline)))
    return shapes


def _blocks(shape: LayerShape, block: int) -> int:
    return (shape.rows // block) * (shape.cols // block)


def layer_caps(cfg: RunConfig) -> dict[str, int]:
    """Most blocks of A a layer may get: its candidate set B under Spartan, the whole layer where
    B is sized from A (the method's `budget_cap`)."""
    method = method_of(cfg.sparsity.method)
    return {shape.name: method.budget_cap(cfg.sparsity, _blocks(shape, cfg.sparsity.block))
            for shape in sparse_linear_shapes(cfg)}


def uniform_budgets(cfg: RunConfig) -> dict[str, int]:
    """⌈ρ·N_l⌉ per layer (at least one block), as `SparseLinear` sizes A (`storage.set_sizes`)."""
    return {shape.name: set_sizes(cfg.sparsity.density, 0.0, _blocks(shape, cfg.sparsity.block))[0]
            for shape in sparse_linear_shapes(cfg)}


def stage_dense_flops(cfg: RunConfig) -> list[float]:
    """Forward FLOPs per token of each pipeline stage outside its sparse linears: attention
    (2·seq·d per layer, Kaplan et al.'s count), block linears left dense, and the LM head."""
    m, p = cfg.model, cfg.parallel.pipeline
    flops = [0.0] * p
    dense = sum(2 * rows * cols for leaf, (rows, cols) in block_linear_shapes(m).items()
                if leaf not in cfg.sparsity.targets)
    for i in range(m.n_layers):
        flops[stage_of(f"layers.{i}", m.n_layers, p)] += 2 * cfg.train.seq_len * m.d_model + dense
    flops[stage_of("lm_head", m.n_layers, p)] += 2 * m.d_model * m.vocab_size
    return flops


def stage_flops(cfg: RunConfig, budgets: dict[str, int]) -> list[float]:
    """Forward FLOPs per token of each stage with the sparse linears at `budgets` blocks of A."""
    flops = stage_dense_flops(cfg)
    per_block = 2 * cfg.sparsity.block**2
    for shape in sparse_linear_shapes(cfg):
        flops[shape.stage] += per_block * budgets[shape.name]
    return flops


def static_budgets(cfg: RunConfig) -> dict[str, int]:
    """Blocks of A per layer (canonical name) for the config's allocation; a dynamic allocation
    starts from `uniform`."""
    budgets = uniform_budgets(cfg)
    if cfg.sparsity.allocation == "erk":
        return _erk(cfg, sum(budgets.values()))
    if cfg.sparsity.allocation == "pipeline_balanced":
        return _pipeline_balanced(cfg, sum(budgets.values()))
    return budgets


def _erk(cfg: RunConfig, total: int) -> dict[str, int]:
    shapes, caps, block = sparse_linear_shapes(cfg), layer_caps(cfg), cfg.sparsity.block
    weight = {s.name: (s.rows + s.cols) / (s.rows * s.cols) for s in shapes}
    held: set[str] = set()
    while True:  # scale the free layers to the budget left after those held at their cap
        left = total - sum(caps[name] for name in held)
        free = [s for s in shapes if s.name not in held]
        scale = left / sum(weight[s.name] * _blocks(s, block) for s in free)
        over = {s.name for s in free if weight[s.name] * scale * _blocks(s, block) > caps[s.name]}
        if not over:
            break
        held |= over
    real = [caps[s.name] if s.name in held else weight[s.name] * scale * _blocks(s, block) for s in shapes]
    counts = apportion(real, total, [1] * len(shapes), [caps[s.name] for s in shapes])
    return {s.name: k for s, k in zip(shapes, counts)}


def _pipeline_balanced(cfg: RunConfig, total: int) -> dict[str, int]:
    shapes, caps = sparse_linear_shapes(cfg), layer_caps(cfg)
    per_block = 2 * cfg.sparsity.block**2
    stages = range(cfg.parallel.pipeline)
    dense = [flops / per_block for flops in stage_dense_flops(cfg)]  # in blocks
    members = [[s for s in shapes if s.stage == stage] for stage in stages]
    lo = [len(m) for m in members]
    hi = [sum(caps[s.name] for s in m) for m in members]

    def spent(level: float) -> float:
        return sum(min(max(level - dense[s], lo[s]), hi[s]) for s in stages)

    low, high = min(dense) - 1.0, max(dense) + total + 1.0
    for _ in range(200):  # spent() is continuous and non-decreasing in the level
        middle = 0.5 * (low + high)
        low, high = (middle, high) if spent(middle) < total else (low, middle)
    real = [min(max(high - dense[s], lo[s]), hi[s]) for s in stages]
    per_stage = apportion(real, total, lo, hi)
    budgets = {}
    for stage, m in zip(stages, members):
        sizes = [_blocks(s, cfg.sparsity.block) for s in m]
        shares = [per_stage[stage] * n / sum(sizes) for n in sizes]
        for s, k in zip(m, apportion(shares, per_stage[stage], [1] * len(m), [caps[s.name] for s in m])):
            budgets[s.name] = k
    return budgets


def apportion(real: list[float], total: int, lo: list[int], hi: list[int]) -> list[int]:
    """Integers within [lo, hi] summing to `total`, each the floor or ceiling of `real` where the
    bounds allow: the remainder goes to the largest fractional parts (Hamilton's method), which
    keeps stages water-filled to a common level within one unit of each other."""
    counts = [min(max(math.floor(r), a), b) for r, a, b in zip(real, lo, hi)]
    short = total - sum(counts)
    step = 1 if short > 0 else -1
    order = sorted(range(len(real)), key=lambda i: (-(real[i] - counts[i]) * step, i))
    while short:
        moved = False
        for i in order:
            if short and lo[i] <= counts[i] + step <= hi[i]:
                counts[i] += step
                short -= step
                moved = True
        if not moved:
            raise ValueError(f"cannot split {total} blocks within the per-layer bounds")
    return counts


@torch.no_grad()
def reallocate(layers: list, total: int, group: dist.ProcessGroup | None) -> None:
    """`global`: give each layer the blocks of its B that lie above one threshold on the unit
    value over all `layers` of all ranks of `group` (tensor × pipeline), exactly `total` in all.

    `layers` are this rank's `SpartanLinear`s (a stage's tensor-parallel ranks hold the same
    layers, in the same order). Each layer's count is summed over its tensor-parallel group and
    written to its `budget` buffer. Every layer keeps at least its best block: a layer left with
    none would output zeros and, its gradient gone, could never win blocks back."""
    scores, used = [], []
    for layer in layers:
        slots = torch.nonzero(layer.live).view(-1)
        used.append(len(slots))
        scores.append(layer.values.detach()[slots].float().abs().sum(dim=(1, 2)) / layer.block**2)
    tensor_group = next((layer.group for layer in layers if layer.group is not None), None)
    device = collective_device(group)
    _keep_best_block(scores, tensor_group, device)
    scores = torch.cat(scores) if scores else torch.zeros(0, device=device, dtype=torch.float32)
    rank, stride = 0, len(scores)
    if group is not None:  # disjoint global index ranges for the tie-break: rank × the largest shard
        widest = torch.tensor([stride], dtype=torch.int64, device=device)
        dist.all_reduce(widest, op=dist.ReduceOp.MAX, group=group)
        rank, stride = dist.get_rank(group), int(widest)
    picked = select_topk_positions(scores, total, group, global_offset=rank * stride)
    bounds = torch.tensor([0] + used, device=picked.device).cumsum(0)
    counts = torch.searchsorted(picked, bounds, right=False).diff()
    if tensor_group is not None:
        dist.all_reduce(counts, group=tensor_group)
    for layer, count in zip(layers, counts.tolist()):
        layer.budget.fill_(count)


def _keep_best_block(scores: list[torch.Tensor], tensor_group, device: torch.device) -> None:
    """Raise each layer's highest score (over its tensor-parallel shards) to +inf, in place, so the
    threshold always takes it. `device`: where the collectives' tensors live."""
    none = torch.zeros((), device=device, dtype=torch.float32)  # a shard without live blocks; float32 like the
    # scores whatever the default dtype, or ranks with and without such a shard send different bytes
    best = torch.stack([x.max().to(device) if len(x) else none for x in scores]) if scores else none.view(1)[:0]
    if tensor_group is not None:
        dist.all_reduce(best, op=dist.ReduceOp.MAX, group=tensor_group)
    for x, top in zip(scores, best.tolist()):
        x[x == top] = math.inf
