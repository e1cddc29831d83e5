"""No sparsity: every linear is an ordinary dense one (the baseline)."""

from __future__ import annotations

from sparse_lm.config import RunConfig, require
from sparse_lm.methods.base import SparsityMethod


class Dense(SparsityMethod):
    name = "dense"
    sparse = False

    def validate(self, cfg: RunConfig) -> None:
        super().validate(cfg)
        require(not cfg.sparsity.supar, "sparsity.supar",
                "false with sparsity.method=dense (it scales sparse linears only)", cfg.sparsity.supar)


METHOD = Dense()
