"""Watching a run live: DeepSpeed's own monitors (TensorBoard, CSV, Weights & Biases), configured
from `train.monitor` and fed the numbers metrics.jsonl records, so every view shows the same run."""

from __future__ import annotations

import importlib.util
from typing import Any

from sparse_lm.errors import UserError

# train.monitor key -> (DeepSpeed config section, its field for the value, the package it needs)
_SECTIONS = {"tensorboard": ("tensorboard", "output_path", "tensorboard"),
             "csv": ("csv_monitor", "output_path", None),
             "wandb": ("wandb", "project", "wandb")}


def deepspeed_monitor_config(monitor: dict[str, str]) -> dict[str, Any]:
    """The DeepSpeed config sections for `train.monitor`. Event files go straight into the named
    directory (DeepSpeed's job_name subdirectory is empty)."""
    sections: dict[str, Any] = {}
    for key, value in monitor.items():
        section, field, package = _SECTIONS[key]
        if package and importlib.util.find_spec(package) is None:
            raise UserError(f"config field train.monitor.{key}: needs the {package} package, which is not "
                            f"installed (pip install {package})")
        sections[section] = {"enabled": True, field: value} | ({"job_name": ""} if field == "output_path" else {})
    return sections


def scalar_events(kind: str, fields: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(name, value, step) for each number of one metrics.jsonl record, named `kind/field`
    (`step/loss`, `heldout/loss`, `throughput/tokens_per_s`, `reselect/changed_a`, ...); a record
    without a step (the summary: `steps`) is placed at its last step."""
    step = fields.get("step", fields.get("steps"))
    if not isinstance(step, int):
        return []
    events = []
    for name, value in fields.items():
        if name in ("step", "steps") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            events.append((f"{kind}/{name}", float(value), step))
        elif isinstance(value, dict):  # per-layer values, e.g. density/layers.0.mlp.up_proj
            events.extend((f"{kind}/{name}/{k}", float(v), step) for k, v in value.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool))
    return events
