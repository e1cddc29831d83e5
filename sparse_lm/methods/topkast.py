"""Top-KAST (docs/design/topkast.md): A = the top-D by magnitude, B = the top D + M, both re-picked
every `sparsity.reselect_every` steps, with the exploration penalty λ (`sparsity.penalty`)."""

from __future__ import annotations

from sparse_lm.config import SparsityConfig
from sparse_lm.methods.base import SparsityMethod


class TopKASTMethod(SparsityMethod):
    name = "topkast"
    reselects = True
    promotes = True

    def penalty(self, s: SparsityConfig) -> float:
        return s.penalty


METHOD = TopKASTMethod()
