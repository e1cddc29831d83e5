"""RigL (Evci et al., ICML 2020), always sparse: a random sparse set A (B = A), and every
`sparsity.reselect_every` steps until `freeze_masks_after` · steps each layer drops the
⌊f(t)·|A|⌋ blocks of smallest |θ| and grows as many of largest |∇L| among the rest, f(t) =
α/2·(1 + cos(πt / T_end)) with α = `sparsity.update_fraction`. Grown blocks start at zero with
zero Adam moments (the paper's rule); a block dropped and regrown in the same update keeps its
value, as in the paper's code (its growth candidates are everything outside the kept set).

Always sparse: the dense gradient of a layer, ∂L/∂W = Σ_t g_tᵀ x_t, is never materialised
whole. During the step before an update, each layer keeps its inputs x and output gradients g
(activation-sized, for that one step); at the update it forms ∂L/∂W one chunk of block-rows at a
time, scores each block by Σ|∂L/∂W|, and the kept set (scored +∞) and the grown blocks are
selected together by the project's exact sharded top-k over the tensor-parallel group, with the
shard capacities of `storage`. A tensor-parallel shard's x and g are exactly what its own slice of
∂L/∂W needs (a column-parallel shard sees all of x and its rows of g, a row-parallel one its
columns of x and all of g). Data-parallel replicas sum each chunk over the data-parallel group —
one dense gradient's traffic per update, every `reselect_every` steps — so all replicas select
alike.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from sparse_lm.config import RunConfig, require
from sparse_lm.methods.static import Static
from sparse_lm.parallel.layers import enter_region, leave_region
from sparse_lm.sparsity.kernels import SparseMatmul, to_blocks
from sparse_lm.sparsity.storage import SparseLinear, block_sums, score_dtype
from sparse_lm.sparsity.threshold import ChunkedScores
from sparse_lm.sparsity.topkast import TopKAST, cosine_decayed, ranked_first, reselect


class RigLLinear(SparseLinear):
    """A `SparseLinear` with B = A that, while `capture` is on, keeps each training forward's input
    and its output's gradient (`captured`) for the next update's growth scores."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.capture, self.captured = False, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = enter_region(x, self.spec)
        y = SparseMatmul.apply(x, self.values, self.forward_mask, self.index, self.shape, self.block, 0.0,
                               self.density)
        if self.capture and self.training and torch.is_grad_enabled():
            inputs = x.detach().reshape(-1, self.in_features)
            y.register_hook(lambda g: self.captured.append((inputs, g.detach().reshape(-1, self.out_features))))
        return leave_region(y, self.spec)

    def growth_scores(self, data_group=None) -> ChunkedScores:
        """Σ|∂L/∂W| per block of this shard from the captured (x, g) pairs, a chunk of block-rows
        at a time (summed over `data_group`)."""
        b, device = self.block, self.values.device
        pairs = self.captured

        def chunks():
            for r0, r1 in self.row_chunks():
                rows = slice(r0 * b, r1 * b)
                grad = sum(g[:, rows].T.to(score_dtype(g.dtype)) @ x.to(score_dtype(x.dtype)) for x, g in pairs)
                if data_group is not None:
                    dist.all_reduce(grad, group=data_group)
                yield block_sums(to_blocks(grad, b)).float()  # the sharded select ranks float32

        return ChunkedScores(chunks, self.n_blocks, device)


@torch.no_grad()
def update(layer: RigLLinear, optimizer, k: int, data_group=None):
    """One RigL update of a layer: keep the top |A| − k blocks of A by Σ|θ|, fill the rest of the
    budget with the blocks of largest gradient outside them (new ones at zero); returns
    `topkast.reselect`'s change."""
    kept = layer.index.long()[layer.select_forward(layer.k_forward - k)]  # A is all of B here
    zeros = lambda positions: layer.values.new_zeros(len(positions), layer.block, layer.block)  # noqa: E731
    scores = ranked_first(layer.growth_scores(data_group), kept, layer.n_blocks)
    change = reselect(layer, optimizer, pick_forward=False, scores=scores, entering_values=zeros)
    layer.forward_mask.copy_(layer.live)
    return change


class RigL(TopKAST):
    """The schedule: arm the layers to capture in the step before an update, update after it."""

    def __init__(self, model: nn.Module, cfg: RunConfig, group=None):
        super().__init__(model, cfg.sparsity, cfg.train.steps, group, reselects=True)
        self.alpha = cfg.sparsity.update_fraction
        self.data_group = _data_parallel_group()

    def fraction(self, step: int) -> float:
        """f(t) = α/2·(1 + cos(πt / T_end)): the share of A replaced at the update after step t."""
        return cosine_decayed(self.alpha, step, self.freeze_at)

    def start(self, step: int) -> None:
        self._arm(step)

    def after_step(self, step: int, optimizer) -> dict[str, float] | None:
        record = self.update_all(step, optimizer) if self.due(step) else None
        self._arm(step)
        return record

    def _arm(self, step: int) -> None:
        """Capture during step `step` + 1 if an update follows it; drop what an update has used."""
        for layer in self.layers:
            layer.capture, layer.captured = self.due(step + 1), []

    def update_all(self, step: int, optimizer) -> dict[str, float]:
        """Update every layer, as Top-KAST's reselection record (`reselect_all`; B is A, so the
        fraction of A that changed is B's, and every grown block comes from outside) with the update fraction."""
        fraction = self.fraction(step)
        record = self.reselect_all(optimizer, pick_forward=False, update=lambda layer: update(
            layer, optimizer, math.floor(fraction * layer.k_forward), self.data_group))
        return {**record, "changed_a": record["changed_b"], "a_from_outside": record["changed_b"],
                "update_fraction": fraction}


def _data_parallel_group():
    """megatron-core's data-parallel group when there are several replicas, else None."""
    from sparse_lm.parallel.mcore import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_data_parallel_group() if parallel_state.get_data_parallel_world_size() > 1 else None


class RigLMethod(Static):
    """`static`'s random start and sizes (B is A), updated by RigL's schedule."""

    name = "rigl"
    reselects = True
    linear_class = RigLLinear

    def validate(self, cfg: RunConfig) -> None:
        super().validate(cfg)
        s = cfg.sparsity
        require(s.complement == "regenerate", "sparsity.complement",
                "regenerate with sparsity.method=rigl (its dropped weights are zero: there is nothing to offload)",
                s.complement)

    def schedule(self, model, cfg: RunConfig, group=None) -> RigL:
        return RigL(model, cfg, group)

    def training_sets(self, cfg, a, b):
        """A forward and backward, and the dense weight gradient (`b`: the whole layer, its
        `budget_cap`) once every `reselect_every` steps."""
        every = cfg.sparsity.reselect_every
        return a, {name: k + (b[name] - k) / every for name, k in a.items()}


METHOD = RigLMethod()
