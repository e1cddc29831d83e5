"""Top-KAST (ALGORITHMS.md §1) on `SparseLinear` layers: building them, re-picking A and B every R
steps, and keeping the optimizer's state attached to the right entries.

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

import time
from dataclasses import dataclass

import torch
from torch import nn

from sparse_lm.config import SparsityConfig
from sparse_lm.optim_state import write_slots, zero_moments
from sparse_lm.sparsity.init import counter_normal, stream_id
from sparse_lm.sparsity.storage import SparseLinear
from sparse_lm.sparsity.threshold import ChunkedScores, select_topk_positions


def linear_factory(cfg: SparsityConfig):
    """The model's `LinearFactory`: SparseLinear for the targeted block linears, nn.Linear otherwise."""

    def make(name: str, in_features: int, out_features: int) -> nn.Module:
        if cfg.method == "dense" or name.rsplit(".", 1)[-1] not in cfg.targets:
            return nn.Linear(in_features, out_features, bias=False)
        exploration = cfg.exploration if cfg.method == "topkast" else 0.0
        return SparseLinear(name, in_features, out_features, cfg.density, exploration, cfg.block,
                            cfg.penalty if cfg.method == "topkast" else 0.0, cfg.complement)

    return make


def sparse_layers(model: nn.Module) -> list[SparseLinear]:
    return [m for m in model.modules() if isinstance(m, SparseLinear)]


def initialize_static(layer: SparseLinear, seed: int, stream: int, std: float) -> None:
    """`method: static`: B = A = a seeded random set of blocks (same size as Top-KAST's A), fixed."""
    layer.initialize(seed, stream, std)  # values and offload store from θ₀ ...
    noise = lambda r0, r1: counter_normal(seed, stream ^ 0x5BD1E995, r0 * layer.block * layer.in_features,  # noqa: E731
                                          (r1 - r0) * layer.block * layer.in_features, 1.0,
                                          layer.values.device).view(-1, layer.in_features)
    with torch.no_grad():  # ... then the positions re-drawn at random, independent of |θ₀|
        positions = select_topk_positions(layer.block_scores(noise), layer.k_backward)
        layer.index.copy_(positions.to(layer.index.dtype))
        layer.values.copy_(layer.gather_blocks(positions, layer.initial_rows))
        layer.forward_mask.fill_(True)


@dataclass
class LayerChange:
    """Fractions of B's and A's blocks that are new after a reselection."""

    changed_b: float
    changed_a: float


@torch.no_grad()
def reselect(layer: SparseLinear, optimizer: torch.optim.Optimizer | None) -> LayerChange:
    """Re-pick B and A from current magnitudes; see the module docstring for the steps."""
    old_positions = layer.index.long().clone()
    old_forward = old_positions[layer.forward_mask]
    scores: ChunkedScores = layer.block_scores(layer.current_rows)
    new_positions = select_topk_positions(scores, layer.k_backward)
    staying = torch.isin(old_positions, new_positions)
    entering = new_positions[~torch.isin(new_positions, old_positions)]  # ascending
    free = torch.nonzero(~staying).view(-1)  # the leaving blocks' slots, ascending
    if len(free):
        if layer.complement_policy == "offload":
            _store_blocks(layer, old_positions[free], layer.values[free])
        write_slots(layer.values, free, layer.gather_blocks(entering, layer.complement_rows))
        layer.index[free] = entering.to(layer.index.dtype)
        zero_moments(optimizer, layer.values, free)
    layer.forward_mask.copy_(layer.select_forward())
    new_forward = layer.index.long()[layer.forward_mask]
    return LayerChange(
        changed_b=len(free) / layer.k_backward,
        changed_a=float((~torch.isin(new_forward, old_forward)).sum()) / layer.k_forward,
    )


def _store_blocks(layer: SparseLinear, positions: torch.Tensor, values: torch.Tensor) -> None:
    """Write blocks back into the offload store (a [out, in] host tensor) at grid positions."""
    b = layer.block
    grid = layer.complement.view(layer.block_rows, b, layer.block_cols, b).permute(0, 2, 1, 3)
    positions = positions.cpu()
    grid[positions // layer.block_cols, positions % layer.block_cols] = values.detach().cpu().to(grid.dtype)


class TopKAST:
    """The schedule: reselect every `reselect_every` steps until `freeze_masks_after` · steps."""

    def __init__(self, model: nn.Module, cfg: SparsityConfig, total_steps: int):
        self.layers = sparse_layers(model)
        self.every = cfg.reselect_every
        self.active = cfg.method == "topkast" and bool(self.layers)
        self.freeze_at = cfg.freeze_masks_after * total_steps

    def due(self, step: int) -> bool:
        return self.active and step % self.every == 0 and step < self.freeze_at

    def reselect_all(self, optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
        started = time.perf_counter()
        changes = [reselect(layer, optimizer) for layer in self.layers]
        b_sizes = [layer.k_backward for layer in self.layers]
        a_sizes = [layer.k_forward for layer in self.layers]
        return {
            "changed_b": sum(c.changed_b * n for c, n in zip(changes, b_sizes)) / sum(b_sizes),
            "changed_a": sum(c.changed_a * n for c, n in zip(changes, a_sizes)) / sum(a_sizes),
            "seconds": time.perf_counter() - started,
        }


def stream_for(module_name: str) -> int:
    """The initialiser stream of a linear: that of its dense weight's name, so that dense and
    sparse runs from one seed share θ₀."""
    return stream_id(f"{module_name}.weight")
