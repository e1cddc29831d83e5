"""The sparsity methods as the model and the training loop see them: which linear each block
layer becomes (`linear_factory`) and which schedule drives it between steps (`make_schedule`)."""

from __future__ import annotations

from torch import nn

from sparse_lm.config import RunConfig, SparsityConfig
from sparse_lm.parallel.layers import ShardLinear
from sparse_lm.parallel.layout import local_size
from sparse_lm.parallel.plan import TensorPlan
from sparse_lm.sparsity.spartan import Spartan, SpartanLinear
from sparse_lm.sparsity.storage import SparseLinear
from sparse_lm.sparsity.topkast import TopKAST


def linear_factory(cfg: SparsityConfig, headroom: float = 0.25, micro_batches: int = 1,
                   plan: TensorPlan | None = None):
    """The model's `LinearFactory`: a sparse linear for the targeted block linears (SpartanLinear
    for Spartan, SparseLinear otherwise), dense for the rest; under tensor parallelism (`plan`,
    None: whole layers) each is this rank's shard, between megatron-core's mappings.
    `headroom`: spare slots per shard (`storage`). `micro_batches`: backward passes per optimizer
    step (train.grad_accum). The exploration penalty λθ is added by every backward pass, while
    DeepSpeed divides each micro-batch's loss by their number; each pass therefore adds λθ / that
    number, so that a step's gradient carries λθ once, as a dense Top-KAST's would."""
    penalty = cfg.penalty / micro_batches if cfg.method == "topkast" else 0.0
    plan = plan or TensorPlan()

    def make(name: str, in_features: int, out_features: int) -> nn.Module:
        spec = plan.linear(name)
        if spec is not None:  # this rank's shard of the [out_features, in_features] layer
            if spec.dim == 0:
                out_features = local_size(out_features, spec.size, f"the output width of {name}")
            else:
                in_features = local_size(in_features, spec.size, f"the input width of {name}")
        if cfg.method == "dense" or name.rsplit(".", 1)[-1] not in cfg.targets:
            return (ShardLinear(in_features, out_features, spec) if spec
                    else nn.Linear(in_features, out_features, bias=False))
        if cfg.method == "spartan":  # B: Top-KAST's candidates, or every block
            exploration = 1 - cfg.density if cfg.candidates == "dense" else cfg.exploration
            return SpartanLinear(name, in_features, out_features, cfg.density, exploration, cfg.block, 0.0,
                                 cfg.complement, spec, headroom, cfg.supar)
        exploration = cfg.exploration if cfg.method == "topkast" else 0.0
        return SparseLinear(name, in_features, out_features, cfg.density, exploration, cfg.block, penalty,
                            cfg.complement, spec, headroom, cfg.supar)

    return make


def make_schedule(model: nn.Module, cfg: RunConfig, group=None) -> TopKAST:
    """The between-steps driver of `model`'s sparse layers; `group`: the tensor × pipeline ranks
    whose layers together form the model, or None."""
    if cfg.sparsity.method == "spartan":
        return Spartan(model, cfg, group)
    return TopKAST(model, cfg.sparsity, cfg.train.steps, group)
