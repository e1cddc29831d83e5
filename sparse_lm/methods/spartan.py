"""Spartan (docs/design/spartan.md) inside Top-KAST's backward set: a hard forward top-k and a soft
backward one over blocks, its budget annealed from B to the allocation's share, and any of the
budget allocations (`sparsity.allocation`)."""

from __future__ import annotations

from sparse_lm.config import ALLOCATIONS, RunConfig, SparsityConfig
from sparse_lm.methods.base import SparsityMethod
from sparse_lm.sparsity.spartan import Spartan, SpartanLinear


class SpartanMethod(SparsityMethod):
    name = "spartan"
    reselects = True
    linear_class = SpartanLinear
    extra_layer_bytes = 8  # the layer's budget (an int64 buffer, saved with it)
    allocations = ALLOCATIONS

    def forward_budgets(self, cfg: RunConfig) -> None:
        """None: every layer stores the uniform B, and its share of A is a `budget` buffer that
        the schedule sets (and `global` moves), so a checkpoint loads under any allocation."""
        return None

    def exploration(self, s: SparsityConfig) -> float:
        """B: Top-KAST's candidates, or every block (`candidates: dense`, small scale only)."""
        return 1 - s.density if s.candidates == "dense" else s.exploration

    def schedule(self, model, cfg: RunConfig, group=None) -> Spartan:
        return Spartan(model, cfg, group)

    def training_sets(self, cfg, a, b):
        """A anneals from B to its budget over `warmup_frac` of the run: its mean over the run."""
        w = cfg.sparsity.warmup_frac
        return {name: k + (b[name] - k) * w / 2 for name, k in a.items()}, b


METHOD = SpartanMethod()
