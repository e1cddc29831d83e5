"""The one place a run's model is built from its config: training, eval and export all use it, so
a checkpoint always loads into the same structure it was saved from. Parallelism is decided here,
from the run's `Topology`, and handed to the model: the tensor-parallel plan through the layer
factory and the vocabulary, the pipeline by building this rank's stage."""

from __future__ import annotations

from torch import nn

from sparse_lm.config import RunConfig
from sparse_lm.methods.factory import linear_factory
from sparse_lm.methods.registry import method_of
from sparse_lm.model.init import init_weights
from sparse_lm.model.llama import Llama, Vocabulary
from sparse_lm.model.pipeline import build_pipeline
from sparse_lm.parallel.layers import VocabShard
from sparse_lm.parallel.plan import tensor_plan
from sparse_lm.parallel.state import Topology


def build_model(cfg: RunConfig, initialize: bool = True, topology: Topology | None = None) -> nn.Module:
    """The model (sparse linears per `cfg.sparsity`) with its deterministic initialisation.

    `cfg.model.vocab_size` must be resolved. Sparse layers are always initialised, even before a
    checkpoint overwrites them: with `complement: regenerate` the seed and stream that regenerate
    the entries outside B are part of the layer. `initialize=False` skips that (minutes for a
    100M-parameter model on a CPU) for `convert`, which overwrites every saved tensor and reads
    only the forward set A; such a model must not be trained or reselected. `topology`: this
    rank's place in a parallel run — its tensor-parallel shard of every layer, and with a pipeline
    its stage (`model.pipeline`) instead of the whole `Llama`; None builds the whole model.
    `train.activation_checkpointing` makes every block recompute its activations in backward.
    """
    plan = tensor_plan(topology)
    vocab = VocabShard(plan.vocab) if plan.vocab else Vocabulary()
    method = method_of(cfg.sparsity.method)
    factory = linear_factory(cfg.sparsity, cfg.parallel.shard_headroom, cfg.train.grad_accum, plan,
                             method.forward_budgets(cfg))
    recompute = cfg.train.activation_checkpointing
    if topology is not None and topology.pipeline > 1:
        model = build_pipeline(cfg.model, factory, vocab, topology, recompute)
    else:
        model = Llama(cfg.model, factory, vocab, recompute)
    if initialize:
        init_weights(model, cfg.train.seed, method.initializer())
    return model
