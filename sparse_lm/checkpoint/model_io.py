"""Load a trained model from a checkpoint for inference (eval, export): no optimizer, no process group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparse_lm.checkpoint.store import check_topology, find_checkpoint, load_model_weights, read_manifest
from sparse_lm.config import RunConfig, config_from_dict
from sparse_lm.model import Llama
from sparse_lm.model.build import build_model


def load_trained_model(path: str | Path, device: str | torch.device = "cpu",
                       initialize: bool = True) -> tuple[Llama, RunConfig, dict[str, Any]]:
    """(model in eval mode, its run config, manifest + "path") from a step directory or checkpoint root.
    `initialize=False`: see `build_model` (export only reads the forward set A)."""
    step_dir = find_checkpoint(path)
    manifest = read_manifest(step_dir)
    check_topology(step_dir, manifest, 1, 1)
    cfg = config_from_dict(manifest["config"])
    model = build_model(cfg, initialize)
    load_model_weights(step_dir, manifest, model)
    return model.to(device).eval(), cfg, manifest | {"path": str(step_dir)}
