"""The resolved run config as commented YAML (`sparse-lm pretrain --print-config`): every field
with its one-line docstring above it, and a header naming what is still decided at run time, so a
user sees what a run will do, and why, before it starts."""

from __future__ import annotations

import dataclasses

import yaml

from sparse_lm.config import RunConfig, field_docs


def _scalar(value) -> str:
    """One YAML flow value (lists inline) that reads back as `value`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6)
    return text.removesuffix("\n...\n").strip()


def still_automatic(cfg: RunConfig) -> list[str]:
    """`field: value → what it becomes`, for each value only the run itself can settle."""
    notes = []
    if cfg.model.vocab_size is None:
        notes.append(f"model.vocab_size: null → the tokenizer's size in {cfg.data.path}, rounded up to a multiple "
                     f"of model.vocab_multiple={cfg.model.vocab_multiple}")
    if cfg.train.precision == "auto":
        notes.append("train.precision: auto → bf16 on a CUDA device, fp32 otherwise")
    if not cfg.checkpoint.dir:
        notes.append(f"checkpoint.dir: '' → {cfg.checkpoint_dir}")
    return notes


def config_yaml(cfg: RunConfig, source: str) -> str:
    """`cfg` as YAML that `load_config` reads back to the same config, commented field by field."""
    lines = [f"# Run config: {source}; automatic values resolved where the config alone decides them."]
    automatic = still_automatic(cfg)
    if automatic:
        lines.append("# Still automatic (settled when the run starts):")
        lines += [f"#   {note}" for note in automatic]
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        docs = field_docs(type(values))
        lines.append(f"{section.name}:")
        for item in dataclasses.fields(values):
            lines.append(f"  # {docs[item.name]}")
            lines.append(f"  {item.name}: {_scalar(getattr(values, item.name))}")
    return "\n".join(lines) + "\n"
