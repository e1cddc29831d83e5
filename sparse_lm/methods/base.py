"""What a sparsity method decides, with the defaults most methods share (Top-KAST's storage).

A method is an object, not a class hierarchy of layers: it answers questions the model builder,
the training loop, the checkpoint code and the planner ask — which linear to build, how to
initialise it, what to do between steps, how much B holds, what training costs — so that adding a
method is one module and one line in `registry` (docs/design/methods.md).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from sparse_lm.config import RunConfig, SparsityConfig, require
from sparse_lm.parallel.layout import ShardSpec
from sparse_lm.sparsity.allocation import static_budgets
from sparse_lm.sparsity.storage import SparseLinear, set_sizes
from sparse_lm.sparsity.topkast import TopKAST


class SparsityMethod:
    """Defaults: a `SparseLinear` holding B = A + M, picked by magnitude at initialisation, never
    reselected, with a uniform budget. Subclasses override what differs."""

    name = ""
    # The `sparsity.allocation`s it takes. A per-layer one (`erk`, or Spartan's `pipeline_balanced`)
    # sizes each layer's A once, from the config (`forward_budgets`); `global` moves budgets during
    # training and only Spartan, whose A lives inside a fixed B, can follow it.
    allocations: tuple[str, ...] = ("uniform",)
    sparse = True  # builds sparse linears for `sparsity.targets` (dense: none)
    reselects = False  # its schedule re-picks A and B between steps
    promotes = False  # it picks A within B at a reselection, so `sparsity.promote` and `churn_cap` apply
    linear_class: type[SparseLinear] = SparseLinear
    extra_layer_bytes = 0  # what each sparse layer stores beyond values, index and mask (`plan`)

    def validate(self, cfg: RunConfig) -> None:
        """Checks of the `sparsity` fields this method reads, beyond each field's own range."""
        s = cfg.sparsity
        choices = self.allocations[0] if len(self.allocations) == 1 else f"one of {', '.join(self.allocations)}"
        require(s.allocation in self.allocations, "sparsity.allocation",
                f"{choices} with sparsity.method={self.name}", s.allocation)
        require(s.promote == "any" or self.promotes, "sparsity.promote",
                f"any with sparsity.method={self.name} (it does not pick A within B)", s.promote)
        require(s.churn_cap is None or self.promotes, "sparsity.churn_cap",
                f"null with sparsity.method={self.name} (it does not pick A within B)", s.churn_cap)

    def forward_budgets(self, cfg: RunConfig) -> dict[str, int] | None:
        """Blocks of A of each sparse linear (canonical name) when the allocation gives layers
        their own share, sized at build time; None: every layer ⌈ρ·N⌉ (`storage.set_sizes`)."""
        return None if cfg.sparsity.allocation == "uniform" else static_budgets(cfg)

    def exploration(self, s: SparsityConfig) -> float:
        """M: the fraction of a layer in B beyond A."""
        return s.exploration

    def budget_cap(self, s: SparsityConfig, blocks: int) -> int:
        """The most blocks of A a layer of `blocks` may get (an allocation's cap; B for `plan`'s
        FLOPs): A ⊆ B, and B is the uniform top D + M."""
        return set_sizes(s.density, self.exploration(s), blocks)[1]

    def penalty(self, s: SparsityConfig) -> float:
        """The exploration penalty λ its backward pass adds (Top-KAST's), per optimizer step."""
        return 0.0

    def make_linear(self, s: SparsityConfig, name: str, in_features: int, out_features: int,
                    spec: ShardSpec | None, headroom: float, micro_batches: int,
                    forward_blocks: int | None = None) -> nn.Module:
        """A targeted block linear (or this rank's shard of it), with `forward_blocks` blocks of A
        (None: the uniform share). Each of the `micro_batches` backward passes of a step adds
        λθ / micro_batches, as DeepSpeed divides each pass's loss by their number, so that a
        step's gradient carries λθ once, as a dense one's would."""
        return self.linear_class(name, in_features, out_features, s.density, self.exploration(s), s.block,
                                 self.penalty(s) / micro_batches, s.complement, spec, headroom, s.supar,
                                 forward_blocks=forward_blocks)

    def initializer(self) -> Callable | None:
        """`init(layer, seed, stream, std)` for its sparse linears, or None for their own
        `initialize` (B and A from |θ₀|)."""
        return None

    def schedule(self, model: nn.Module, cfg: RunConfig, group=None) -> TopKAST:
        """The between-steps driver of the model's sparse layers."""
        return TopKAST(model, cfg.sparsity, cfg.train.steps, group, reselects=self.reselects)

    def training_sets(self, cfg: RunConfig, a: dict[str, float], b: dict[str, float]
                      ) -> tuple[dict[str, float], dict[str, float]]:
        """Blocks per layer of the forward set (forward pass and input gradient) and of the set
        that gets a weight gradient, averaged over the run, from the budgets A and B (`plan.flops`)."""
        return a, b
