"""The optimizer's parameter groups, each with its own multiplier of the base learning rate.

Why groups: with Adam every weight moves by about the learning rate per step whatever its
gradient's scale, so one rate for every parameter cannot suit them all. The embeddings and the LM
head (a large share of a small model) want a higher rate than the block linears (μP gives the
same advice), and a sparse linear — whose output sums over a fraction ρ of the fan-in — changes
its output ρ times less per step than a dense one at the same rate. `sparsity.supar` (SμPar,
Dey et al. 2024) corrects the latter by a ×1/ρ rate; `train.lr_mult_*` set the former.

A group is named by the kind of parameter (`GROUPS`), decided from the canonical parameter name,
so every tensor-parallel shard of a linear lands in the same group and a pipeline stage simply has
fewer groups (empty ones are left out: DeepSpeed flattens each group). The rates are a function of
the config and the step only, so a resumed run has the same groups at the same rates.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sparse_lm.config import RunConfig
from sparse_lm.methods.registry import method_of
from sparse_lm.model.init import init_std_of
from sparse_lm.parallel.layout import BLOCK_LINEAR_NAMES, canonical_name
from sparse_lm.sparsity.storage import SparseLinear

# embedding: the token embedding (also the LM head when tied); head: the LM head; hidden: the
# dense block linears; hidden_sparse: the sparse block linears' stored values; norm: the RMSNorm gains.
GROUPS = ("embedding", "head", "hidden", "hidden_sparse", "norm")


def group_of(name: str) -> str:
    """The group of a parameter by its canonical name (`layers.0.mlp.up_proj.values`, ...)."""
    if name.startswith("embed_tokens."):
        return "embedding"
    if name.startswith("lm_head."):
        return "head"
    if name.endswith("norm.weight"):
        return "norm"
    if name.endswith(".values"):
        return "hidden_sparse"
    return "hidden"


def lr_multipliers(cfg: RunConfig) -> dict[str, float]:
    """Each group's multiplier of `train.lr`. A sparse linear's is the hidden one, ×1/ρ under
    SμPar, ρ being the run's forward density `sparsity.density`: per-layer allocations redistribute
    the same total, and Spartan's `global` moves it at every reselection, where a per-layer rate
    would jump under Adam's moments."""
    t, s = cfg.train, cfg.sparsity
    sparse = t.lr_mult_hidden / s.density if s.supar else t.lr_mult_hidden
    return {"embedding": t.lr_mult_embedding, "head": t.lr_mult_head, "hidden": t.lr_mult_hidden,
            "hidden_sparse": sparse, "norm": t.lr_mult_norm}


def peak_rates(cfg: RunConfig) -> dict[str, float]:
    """The peak learning rate of every group the run's model has (whatever this rank's stage holds)."""
    rates = {name: cfg.train.lr * mult for name, mult in lr_multipliers(cfg).items()}
    if cfg.model.tie_embeddings:
        del rates["head"]
    if not method_of(cfg.sparsity.method).sparse:
        del rates["hidden_sparse"]
    return rates


def param_groups(model: nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
    """AdamW groups of `model` (a whole model or one pipeline stage): every trainable parameter in
    the group of its kind, with `lr_mult` (the loop sets `lr` = schedule × lr_mult every step) and
    the decoupled weight decay of `train.weight_decay`, except on norm gains."""
    members: dict[str, list[nn.Parameter]] = {name: [] for name in GROUPS}
    for name, param in model.named_parameters():
        if param.requires_grad:
            members[group_of(canonical_name(name))].append(param)
    mults = lr_multipliers(cfg)
    return [{"params": params, "name": name, "lr_mult": mults[name], "lr": cfg.train.lr * mults[name],
             "weight_decay": 0.0 if name == "norm" else cfg.train.weight_decay}
            for name, params in members.items() if params]


def init_stds(model: nn.Module) -> dict[str, float]:
    """The init std of the embedding, the head and each block linear kind (`q_proj`, ...): σ, or
    σ/√(2L) for the residual outputs (`model.init`), times a sparse linear's SμPar gain (the mean
    over this rank's layers of that kind; the gain differs a little from layer to layer when A is
    picked by magnitude)."""
    cfg = model.cfg
    stds = {"embedding": cfg.init_std, **({} if cfg.tie_embeddings else {"head": cfg.init_std})}
    gains: dict[str, list[float]] = {}
    for module in model.modules():
        if isinstance(module, SparseLinear):
            gains.setdefault(module.name.rsplit(".", 1)[-1], []).append(module.init_gain)
    for kind in BLOCK_LINEAR_NAMES:
        gain = sum(gains[kind]) / len(gains[kind]) if kind in gains else 1.0
        stds[kind] = init_std_of(cfg, kind) * gain
    return stds
