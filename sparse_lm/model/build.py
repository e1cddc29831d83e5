"""The one place a run's model is built from its config: training, eval and export all use it, so
a checkpoint always loads into the same structure it was saved from."""

from __future__ import annotations

from sparse_lm.config import RunConfig
from torch import nn

from sparse_lm.model.llama import Llama, init_weights
from sparse_lm.model.pipeline import build_pipeline
from sparse_lm.sparsity.methods import linear_factory
from sparse_lm.sparsity.topkast import initialize_static


def build_model(cfg: RunConfig, initialize: bool = True, pipeline: int = 1) -> nn.Module:
    """The model (sparse linears per `cfg.sparsity`) with its deterministic initialisation.

    `cfg.model.vocab_size` must be resolved. Sparse layers are always initialised, even before a
    checkpoint overwrites them: with `complement: regenerate` the seed and stream that regenerate
    the entries outside B are part of the layer. `initialize=False` skips that (minutes for a
    100M-parameter model on a CPU) for `convert`, which overwrites every saved tensor and reads
    only the forward set A; such a model must not be trained or reselected. `pipeline` > 1 builds
    this rank's stage of a DeepSpeed pipeline (`model.pipeline`) instead of the whole `Llama`.
    """
    sparse_init = initialize_static if cfg.sparsity.method == "static" else None
    factory = linear_factory(cfg.sparsity, cfg.parallel.shard_headroom, cfg.train.grad_accum)
    if pipeline > 1:
        model = build_pipeline(cfg.model, factory, pipeline, cfg.parallel.tensor)
    else:
        model = Llama(cfg.model, factory)
    if initialize:
        init_weights(model, cfg.train.seed, sparse_init)
    return model
