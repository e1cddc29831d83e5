"""Forward FLOPs per token of a run, sparse and dense, per pipeline stage (`sparsity.allocation`'s
count: 2 per weight of every linear used in the forward pass, attention's 2·seq·d per block, the
LM head), and how unevenly the stages are loaded — the slowest stage sets a pipeline's pace."""

from __future__ import annotations

from sparse_lm.config import RunConfig
from sparse_lm.sparsity.allocation import sparse_linear_shapes, stage_flops, static_budgets


def _imbalance(stages: list[float]) -> float:
    """Slowest stage over the mean: 1 is perfectly balanced."""
    return max(stages) / (sum(stages) / len(stages))


def plan_flops(cfg: RunConfig) -> dict:
    """`sparse` and `dense` FLOPs per token (forward), per stage and their imbalance. `cfg` must
    have its vocabulary resolved."""
    block = cfg.sparsity.block
    every_block = {s.name: (s.rows // block) * (s.cols // block) for s in sparse_linear_shapes(cfg)}
    dense = stage_flops(cfg, every_block)
    sparse = dense if cfg.sparsity.method == "dense" else stage_flops(cfg, static_budgets(cfg))
    return {
        "sparse": sum(sparse), "dense": sum(dense), "ratio": sum(sparse) / sum(dense),
        "sparse_stages": sparse, "dense_stages": dense,
        "sparse_stage_imbalance": _imbalance(sparse), "dense_stage_imbalance": _imbalance(dense),
    }
