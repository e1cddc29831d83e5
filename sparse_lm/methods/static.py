"""A fixed, seeded random mask of the forward size (Top-KAST's under `uniform`, or a per-layer
allocation's share: `erk` is RigL's static baseline): B = A, never reselected — a baseline that
separates what selection buys from what sparsity alone does."""

from __future__ import annotations

from collections.abc import Callable

from sparse_lm.config import SparsityConfig
from sparse_lm.methods.base import SparsityMethod
from sparse_lm.sparsity.topkast import initialize_static


class Static(SparsityMethod):
    name = "static"
    # B is A, sized by the layer's share, so the share must not depend on the parallel layout (a
    # checkpoint re-shards to any TP × PP): `pipeline_balanced`, which follows the stages, is Spartan's.
    allocations = ("uniform", "erk")

    def budget_cap(self, s: SparsityConfig, blocks: int) -> int:
        """B is sized from A: an allocation may give a layer all of its blocks."""
        return blocks

    def exploration(self, s: SparsityConfig) -> float:
        return 0.0

    def initializer(self) -> Callable | None:
        return initialize_static

    def training_sets(self, cfg, a, b):
        return a, a  # B is A


METHOD = Static()
