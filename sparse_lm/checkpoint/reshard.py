"""Tensor-parallel shards ⇄ the canonical whole-layer form of a checkpoint.

The canonical form is what a single process holds: every weight whole, and each sparse layer's B
as (global grid position, values, A-membership, Adam moments) per used slot. Merging concatenates
dense shards along their split dimension (`parallel.layout`) and maps each shard's used slots to
global grid positions; replicated tensors are taken from shard 0. Eval and export read any
layout this way, and re-sharding is merge-then-split.

A sparse shard's slot order is kept (shard by shard), so a merged model computes exactly what the
shards computed: slot order never changes a product, only which slot an entering block takes.
"""

from __future__ import annotations

import torch
from torch import nn

from sparse_lm.errors import UserError
from sparse_lm.parallel.layout import partition_dim
from sparse_lm.sparsity.storage import SparseLinear

# Per-slot tensors of a sparse layer: values (and their moments) and the A-membership.
_SLOT_LEAVES = ("values", "forward_mask")


def _split_key(key: str, params: set[str]) -> tuple[str, str, str]:
    """(module name, leaf, moment suffix or '') of a model or optimizer-state key."""
    base, suffix = key, ""
    if key not in params and key.rsplit(".", 1)[0] in params:  # `<param>.exp_avg`
        base, suffix = key.rsplit(".", 1)
    module, leaf = base.rsplit(".", 1) if "." in base else ("", base)
    return module, leaf, suffix


def _global_positions(layer: SparseLinear, local: torch.Tensor, rank: int, parts: int, dim: int) -> torch.Tensor:
    """Global grid positions of a shard's local positions (the whole layer is `layer`)."""
    if dim == 0:  # rows split: the shard is one contiguous range of the row-major grid
        return local + rank * (layer.n_blocks // parts)
    cols = layer.block_cols // parts
    return (local // cols) * layer.block_cols + rank * cols + local % cols


def merge_tensor_parallel(model: nn.Module, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One state dict (model tensors and/or `<param>.<moment>` entries) for the single-process
    `model`, from the same dicts of tensor-parallel ranks 0..T-1 (of one pipeline stage, or all of
    the model). `model` supplies whole shapes."""
    parts = len(shards)
    if parts == 1:
        return dict(shards[0])
    params = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    sparse = {name: m for name, m in model.named_modules()  # those in these shards (one pipeline stage's)
              if isinstance(m, SparseLinear) and f"{name}.index" in shards[0]}
    used = {}  # sparse layer -> per shard (used slots, global positions)
    for name, layer in sparse.items():
        dim = partition_dim(name)
        per_shard = []
        for rank, shard in enumerate(shards):
            index = shard[f"{name}.index"].long()
            slots = torch.nonzero(index < layer.n_blocks // parts).view(-1)
            per_shard.append((slots, _global_positions(layer, index[slots], rank, parts, dim)))
        used[name] = per_shard

    merged = {}
    for key in shards[0]:
        module, leaf, suffix = _split_key(key, params)
        if module in sparse and leaf in ("index", *_SLOT_LEAVES):
            layer, per_shard = sparse[module], used[module]
            if leaf == "index":
                pieces = [positions for _, positions in per_shard]
            else:
                pieces = [shard[key][slots] for shard, (slots, _) in zip(shards, per_shard)]
            merged[key] = _fit_slots(torch.cat(pieces), layer.capacity, leaf, layer.n_blocks, module)
            if leaf == "index":
                merged[key] = merged[key].to(shards[0][key].dtype)
        elif partition_dim(module) is not None and shards[0][key].ndim == 2:
            merged[key] = torch.cat([shard[key] for shard in shards], dim=partition_dim(module))
        else:
            merged[key] = shards[0][key]
    return merged


def _fit_slots(tensor: torch.Tensor, capacity: int, leaf: str, n_blocks: int, module: str) -> torch.Tensor:
    """The merged slots, padded with unused ones up to the single-process capacity."""
    if len(tensor) > capacity:
        raise UserError(f"layer {module}: the shards hold {len(tensor)} blocks of B, more than the whole layer's "
                        f"{capacity} (checkpoint from a different sparsity config?)")
    pad = capacity - len(tensor)
    if leaf == "index":
        filler = torch.full((pad,), n_blocks, dtype=tensor.dtype)
    else:
        filler = tensor.new_zeros(pad, *tensor.shape[1:])
    return torch.cat([tensor, filler])
