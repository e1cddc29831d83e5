"""Load a trained model from a checkpoint for inference (eval, export): no optimizer, no process group.

A checkpoint of any tensor/pipeline layout loads into one process: the tensor-parallel shards of
each stage are merged into whole layers (`reshard.merge_tensor_parallel`), and stages hold
disjoint layers under their canonical names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparse_lm.checkpoint.reshard import merge_tensor_parallel
from sparse_lm.checkpoint.store import find_checkpoint, load_state, read_manifest, read_shard
from sparse_lm.config import RunConfig, config_from_dict
from sparse_lm.model import Llama
from sparse_lm.model.build import build_model


def load_trained_model(path: str | Path, device: str | torch.device = "cpu",
                       initialize: bool = True) -> tuple[Llama, RunConfig, dict[str, Any]]:
    """(model in eval mode, its run config, manifest + "path") from a step directory or checkpoint root.
    `initialize=False`: see `build_model` (export only reads the forward set A)."""
    step_dir = find_checkpoint(path)
    manifest = read_manifest(step_dir)
    tensor, pipeline = manifest["topology"]["tensor"], manifest["topology"]["pipeline"]
    cfg = config_from_dict(manifest["config"])
    model = build_model(cfg, initialize)
    state = {}
    for stage in range(pipeline):  # stages hold disjoint (canonically named) layers
        shards = [read_shard(step_dir, manifest, "model", rank, stage) for rank in range(tensor)]
        state.update(merge_tensor_parallel(model, shards))
    load_state(model, state, step_dir / "model-*.safetensors")
    return model.to(device).eval(), cfg, manifest | {"path": str(step_dir)}
