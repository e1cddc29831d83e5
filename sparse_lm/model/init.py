"""The model's deterministic initialisation, θ₀, the same whatever the parallel layout.

Values come from the counter-based initialiser (`sparsity.init`): element g of parameter p is a
function of (seed, p's name, g) only, so every rank, every parallel layout and a dense or sparse
run of the same seed build the same θ₀.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from sparse_lm.config import ModelConfig
from sparse_lm.parallel.layers import sharded_modules
from sparse_lm.parallel.layout import canonical_name
from sparse_lm.sparsity.init import counter_normal_rows, stream_id
from sparse_lm.sparsity.storage import SCORE_CHUNK_ELEMENTS

# Output projections get their init scaled by 1/sqrt(2·n_layers) so the residual stream stays O(1).
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


def init_std_of(cfg: ModelConfig, name: str) -> float:
    """Init std of a weight by its (module or parameter) name: σ/√(2L) for a residual output."""
    residual = any(f".{r}." in f".{name}." for r in RESIDUAL_OUTPUTS)
    return cfg.init_std / math.sqrt(2 * cfg.n_layers) if residual else cfg.init_std


def init_weights(model: nn.Module, seed: int, sparse_init: Callable | None = None) -> None:
    """Normal(0, σ) for embeddings and linears, σ/√(2L) for residual outputs, ones for norms.

    A sparse linear (any module with `initialize`) picks its sets from θ₀ itself —
    `sparse_init(module, seed, stream, std)` if given; under SμPar (`module.supar`) it is built
    twice, the second time with σ times the gain that gives its forward set a dense layer's
    variance (`SparseLinear.dense_variance_gain`): scaling θ₀ does not change which entries are
    largest, so the sets stay, and regenerated entries come from the same scaled θ₀. A
    tensor-parallel shard (a module with a `spec`) regenerates its own slice of the global weight.
    `model` is a `Llama` or one pipeline stage of it (`model.pipeline`); names are canonical (the
    single-process model's), so every stage regenerates the numbers the whole model would.
    """
    cfg = model.cfg
    sparse_prefixes = []
    specs = {canonical_name(name): spec for name, spec in sharded_modules(model)}
    with torch.no_grad():
        for name, module in model.named_modules():
            name = canonical_name(name)
            if hasattr(module, "initialize"):
                init, stream = sparse_init or type(module).initialize, stream_id(f"{name}.weight")
                std = init_std_of(cfg, name)
                init(module, seed, stream, std)
                if module.supar:  # the same sets again, from θ₀ scaled to a dense layer's variance
                    gain = module.dense_variance_gain()
                    init(module, seed, stream, std * gain)
                    module.init_gain = gain
                sparse_prefixes.append(f"{name}.")
        for name, param in model.named_parameters():
            name = canonical_name(name)
            if any(name.startswith(prefix) for prefix in sparse_prefixes):
                continue
            if name.endswith("layernorm.weight") or name == "norm.weight":
                param.fill_(1.0)
                continue
            rows, cols = param.shape if param.ndim == 2 else (1, param.numel())
            spec = specs.get(name.rsplit(".", 1)[0])  # a tensor-parallel shard regenerates its own slice
            global_cols, row0, col0 = cols, 0, 0
            if spec is not None:
                (_, global_cols), (row0, col0) = spec.global_shape((rows, cols)), spec.offset((rows, cols))
            # Row chunks of ~SCORE_CHUNK_ELEMENTS: the hash's uniforms (and a column-split shard's
            # int64 positions) would otherwise be a transient 2-4x the parameter (the embedding).
            matrix, per = param.view(rows, cols), max(1, SCORE_CHUNK_ELEMENTS // cols)
            for r0 in range(0, rows, per):
                r1 = min(rows, r0 + per)
                matrix[r0:r1] = counter_normal_rows(seed, stream_id(name), global_cols, row0 + r0, col0, r1 - r0,
                                                    cols, init_std_of(cfg, name), param.device)
