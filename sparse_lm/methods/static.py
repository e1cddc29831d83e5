"""A fixed, seeded random mask of Top-KAST's forward size: B = A, never reselected (a baseline
that separates what selection buys from what sparsity alone does)."""

from __future__ import annotations

from collections.abc import Callable

from sparse_lm.config import SparsityConfig
from sparse_lm.methods.base import SparsityMethod
from sparse_lm.sparsity.topkast import initialize_static


class Static(SparsityMethod):
    name = "static"

    def exploration(self, s: SparsityConfig) -> float:
        return 0.0

    def initializer(self) -> Callable | None:
        return initialize_static

    def training_sets(self, cfg, a, b):
        return a, a  # B is A


METHOD = Static()
