"""The sparsity method as the model and the training loop see it: which linear each block layer
becomes (`linear_factory`) and which schedule drives it between steps (`make_schedule`), both
asked of the run's method object (`registry.method_of`)."""

from __future__ import annotations

from torch import nn

from sparse_lm.config import RunConfig, SparsityConfig
from sparse_lm.methods.registry import method_of
from sparse_lm.parallel.layers import ShardLinear
from sparse_lm.parallel.layout import local_size
from sparse_lm.parallel.plan import TensorPlan
from sparse_lm.sparsity.topkast import TopKAST


def linear_factory(cfg: SparsityConfig, headroom: float = 0.25, micro_batches: int = 1,
                   plan: TensorPlan | None = None, budgets: dict[str, int] | None = None):
    """The model's `LinearFactory`: the method's sparse linear for the targeted block linears,
    dense for the rest; under tensor parallelism (`plan`, None: whole layers) each is this rank's
    shard, between megatron-core's mappings. `headroom`: spare slots per shard (`storage`).
    `micro_batches`: backward passes per optimizer step (train.grad_accum). `budgets`: blocks of
    A per layer (`SparsityMethod.forward_budgets`; None: uniform)."""
    method = method_of(cfg.method)
    plan = plan or TensorPlan()

    def make(name: str, in_features: int, out_features: int) -> nn.Module:
        spec = plan.linear(name)
        if spec is not None:  # this rank's shard of the [out_features, in_features] layer
            if spec.dim == 0:
                out_features = local_size(out_features, spec.size, f"the output width of {name}")
            else:
                in_features = local_size(in_features, spec.size, f"the input width of {name}")
        if not method.sparse or name.rsplit(".", 1)[-1] not in cfg.targets:
            return (ShardLinear(in_features, out_features, spec) if spec
                    else nn.Linear(in_features, out_features, bias=False))
        return method.make_linear(cfg, name, in_features, out_features, spec, headroom, micro_batches,
                                  budgets[name] if budgets else None)

    return make


def make_schedule(model: nn.Module, cfg: RunConfig, group=None) -> TopKAST:
    """The between-steps driver of `model`'s sparse layers; `group`: the tensor × pipeline ranks
    whose layers together form the model, or None."""
    return method_of(cfg.sparsity.method).schedule(model, cfg, group)
