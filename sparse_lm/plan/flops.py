"""FLOPs per token of a run, sparse and dense. Forward: `sparsity.allocation`'s count (2 per weight
of every linear used in the forward pass, attention's 2·seq·d per block, the LM head), per pipeline
stage, and how unevenly the stages are loaded — the slowest stage sets a pipeline's pace. Training:
the forward, the input gradient and the weight gradient, each of them a forward's count over the
weights it uses."""

from __future__ import annotations

from sparse_lm.config import RunConfig
from sparse_lm.methods.registry import method_of
from sparse_lm.sparsity.allocation import layer_caps, sparse_linear_shapes, stage_flops, static_budgets


def _imbalance(stages: list[float]) -> float:
    """Slowest stage over the mean: 1 is perfectly balanced."""
    return max(stages) / (sum(stages) / len(stages))


def _every_block(cfg: RunConfig) -> dict[str, int]:
    block = cfg.sparsity.block
    return {s.name: (s.rows // block) * (s.cols // block) for s in sparse_linear_shapes(cfg)}


def training_flops_per_token(cfg: RunConfig) -> float:
    """Training FLOPs per token: forward, input gradient and weight gradient. Dense parts cost three
    forwards; a sparse linear's forward and input gradient use A, its weight gradient B (Top-KAST's
    rule; each method says which sets it trains, averaged over the run: a static mask's B is A,
    Spartan anneals A from B to its budget — `SparsityMethod.training_sets`)."""
    method = method_of(cfg.sparsity.method)
    if not method.sparse:
        return 3 * sum(stage_flops(cfg, _every_block(cfg)))
    a, b = method.training_sets(cfg, static_budgets(cfg), layer_caps(cfg))
    return 2 * sum(stage_flops(cfg, a)) + sum(stage_flops(cfg, b))


def plan_flops(cfg: RunConfig) -> dict:
    """`sparse` and `dense` FLOPs per token (forward), per stage and their imbalance, and `training`'s
    `sparse`, `dense` and `ratio`. `cfg` must have its vocabulary resolved."""
    dense = stage_flops(cfg, _every_block(cfg))
    sparse = stage_flops(cfg, static_budgets(cfg)) if method_of(cfg.sparsity.method).sparse else dense
    training = training_flops_per_token(cfg)
    return {
        "sparse": sum(sparse), "dense": sum(dense), "ratio": sum(sparse) / sum(dense),
        "sparse_stages": sparse, "dense_stages": dense,
        "sparse_stage_imbalance": _imbalance(sparse), "dense_stage_imbalance": _imbalance(dense),
        "training": {"sparse": training, "dense": 3 * sum(dense), "ratio": training / (3 * sum(dense))},
    }
