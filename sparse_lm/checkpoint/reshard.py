"""Tensor-parallel shards ⇄ the canonical whole-layer form of a checkpoint.

The canonical form is what a single process holds: every weight whole, and each sparse layer's B
as (global grid position, values, A-membership, Adam moments) per used slot. Merging concatenates
dense shards along their split dimension (`parallel.layout`) and maps each shard's used slots to
global grid positions; replicated tensors are taken from shard 0. Eval and export read any
layout this way, and re-sharding is merge-then-split.

A sparse shard's slot order is kept (shard by shard), so a merged model computes exactly what the
shards computed: slot order never changes a product, only which slot an entering block takes.
Splitting gives each new shard the blocks whose global positions fall in it, in canonical order,
followed by unused slots up to its capacity; a shard whose share exceeds its capacity is an error
naming the layer (raise the headroom: `convert reshard --shard-headroom`).

`reshard_checkpoint` is `sparse-lm convert reshard --tensor T --pipeline P`: merge every stage and shard
of a checkpoint (weights, Adam moments, offload store) in one process, split for the new layout,
and write a checkpoint that `pretrain --resume` continues on that layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sparse_lm.errors import UserError
from sparse_lm.optim_state import MOMENTS
from sparse_lm.parallel.layout import partition_dim, stage_of
from sparse_lm.sparsity.storage import SparseLinear, shard_capacity

# Per-slot tensors of a sparse layer: values (and their moments) and the A-membership.
_SLOT_LEAVES = ("values", "forward_mask")


def _split_key(key: str, params: set[str]) -> tuple[str, str, str]:
    """(module name, leaf, moment suffix or '') of a model or optimizer-state key."""
    base, suffix = key, ""
    if key not in params and key.rsplit(".", 1)[0] in params:  # `<param>.exp_avg`
        base, suffix = key.rsplit(".", 1)
    module, leaf = base.rsplit(".", 1) if "." in base else ("", base)
    return module, leaf, suffix


def _names_and_sparse_layers(model: nn.Module, tensors: dict[str, torch.Tensor]):
    """(the model's parameter and buffer names, its sparse layers present in `tensors` — one
    pipeline stage's, or all)."""
    params = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    sparse = {name: m for name, m in model.named_modules()
              if isinstance(m, SparseLinear) and f"{name}.index" in tensors}
    return params, sparse


def _global_positions(layer: SparseLinear, local: torch.Tensor, rank: int, parts: int, dim: int) -> torch.Tensor:
    """Global grid positions of a shard's local positions (the whole layer is `layer`)."""
    if dim == 0:  # rows split: the shard is one contiguous range of the row-major grid
        return local + rank * (layer.n_blocks // parts)
    cols = layer.block_cols // parts
    return (local // cols) * layer.block_cols + rank * cols + local % cols


def merge_tensor_parallel(model: nn.Module, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One state dict for the single-process `model` from the same dicts of tensor-parallel ranks
    0..T-1 (of one pipeline stage, or all of the model). A dict holds model tensors and may hold
    Adam moments too (`<param>.<moment>`), which are placed by their layer's `index`, so it must
    be there. `model` supplies whole shapes."""
    parts = len(shards)
    if parts == 1:
        return dict(shards[0])
    params, sparse = _names_and_sparse_layers(model, shards[0])
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


def _local_positions(layer: SparseLinear, positions: torch.Tensor, parts: int, dim: int):
    """(shard, position within the shard) of global grid positions: the inverse of `_global_positions`."""
    if dim == 0:
        per = layer.n_blocks // parts
        return positions // per, positions % per
    cols = layer.block_cols // parts
    row, col = positions // layer.block_cols, positions % layer.block_cols
    return col // cols, row * cols + col % cols


def split_tensor_parallel(model: nn.Module, merged: dict[str, torch.Tensor], parts: int,
                          headroom: float) -> list[dict[str, torch.Tensor]]:
    """The inverse of `merge_tensor_parallel`: `merged` (whole layers) as `parts` shards."""
    if parts == 1:
        return [dict(merged)]
    params, sparse = _names_and_sparse_layers(model, merged)
    placement = {}  # sparse layer -> per shard (merged slots, local positions), capacity
    for name, layer in sparse.items():
        index = merged[f"{name}.index"].long()
        slots = torch.nonzero(index < layer.n_blocks).view(-1)
        order = slots[torch.argsort(index[slots])]  # canonical: ascending global position
        shard_of, local = _local_positions(layer, index[order], parts, partition_dim(name))
        capacity = shard_capacity(layer.k_backward, parts, layer.n_blocks // parts, headroom)
        per_shard = []
        for rank in range(parts):
            mine = shard_of == rank
            if int(mine.sum()) > capacity:
                raise UserError(f"layer {name}: shard {rank} of {parts} would hold {int(mine.sum())} blocks of B, "
                                f"more than its {capacity} slots; re-shard with a larger --shard-headroom "
                                f"(now {headroom})")
            per_shard.append((order[mine], local[mine]))
        placement[name] = per_shard, capacity

    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(parts)]
    for key, value in merged.items():
        module, leaf, _ = _split_key(key, params)
        if module in sparse and leaf in ("index", *_SLOT_LEAVES):
            layer = sparse[module]
            per_shard, capacity = placement[module]
            for shard, (slots, local) in zip(shards, per_shard):
                piece = local.to(value.dtype) if leaf == "index" else value[slots]
                shard[key] = _fit_slots(piece, capacity, leaf, layer.n_blocks // parts, module)
        elif partition_dim(module) is not None and value.ndim == 2:
            for shard, piece in zip(shards, value.chunk(parts, dim=partition_dim(module))):
                shard[key] = piece.clone()
        else:
            for shard in shards:
                shard[key] = value
    return shards


def reshard_checkpoint(source: str | Path, out_root: Path, tensor: int, pipeline: int, drop_optimizer: bool,
                       headroom: float | None = None) -> Path:
    """Write `source` for a tensor × pipeline layout under `out_root` (a staging directory); returns
    the new step directory. The config, step, data position and optimizer step carry over;
    `headroom` (default: the saved one) replaces parallel.shard_headroom, which sizes each shard's
    slots, in the new config."""
    import dataclasses

    from sparse_lm.checkpoint.store import find_checkpoint, read_manifest, read_shard, write_offline_checkpoint
    from sparse_lm.config import config_from_dict
    from sparse_lm.model.build import build_model

    step_dir = find_checkpoint(source)
    manifest = read_manifest(step_dir)
    cfg = config_from_dict(manifest["config"])
    headroom = cfg.parallel.shard_headroom if headroom is None else headroom
    cfg.parallel = dataclasses.replace(cfg.parallel, tensor=tensor, pipeline=pipeline, shard_headroom=headroom)
    cfg.validate()  # the new layout must divide heads, widths, vocabulary and blocks; headroom >= 0
    model = build_model(cfg, initialize=False)  # whole-layer shapes only
    old = manifest["topology"]
    # Weights and moments travel together: a moment's slot is placed by its layer's index.
    merged: dict[str, torch.Tensor] = {}
    for stage in range(old["pipeline"]):
        shards = [read_shard(step_dir, manifest, "model", rank, stage)
                  | ({} if drop_optimizer else read_shard(step_dir, manifest, "optim", rank, stage))
                  for rank in range(old["tensor"])]
        merged.update(merge_tensor_parallel(model, shards))
    if drop_optimizer:
        merged.update({f"{name}.{key}": torch.zeros(p.shape)
                       for name, p in model.named_parameters() for key in MOMENTS})
    out = {}
    for stage in range(pipeline):
        mine = {k: v for k, v in merged.items() if stage_of(k, cfg.model.n_layers, pipeline) == stage}
        for rank, shard in enumerate(split_tensor_parallel(model, mine, tensor, cfg.parallel.shard_headroom)):
            is_moment = {k: k.rsplit(".", 1)[-1] in MOMENTS for k in shard}
            out[(rank, stage)] = ({k: v for k, v in shard.items() if not is_moment[k]},
                                  {k: v for k, v in shard.items() if is_moment[k]})
    topology = {"tensor": tensor, "pipeline": pipeline, "data": old["data"]}
    return write_offline_checkpoint(out_root, manifest["step"], out, topology, cfg.to_dict(), manifest["state"],
                                    0 if drop_optimizer else manifest["optimizer_step"], step_dir / "tokenizer.model")
