"""Everything a pretraining run can be refused for, checked before anything is built.

Building comes late and costs much: the process group, the compiled kernels (tens of seconds on a
cold extension cache), the model and `deepspeed.initialize`. A wrong data path, a held-out split
too short, an unwritable output or a checkpoint that cannot be resumed is therefore found here,
from the config, the files and the launcher's environment alone, and reported in one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparse_lm.atomic import check_writable
from sparse_lm.checkpoint.store import (
    check_config,
    check_topology,
    find_checkpoint,
    read_latest,
    read_manifest,
    tokenized_alike,
)
from sparse_lm.config import RunConfig
from sparse_lm.data.packed import PackedSplit, load_meta
from sparse_lm.errors import UserError
from sparse_lm.model import resolve_vocab
from sparse_lm.parallel.state import data_parallel_size
from sparse_lm.train.batches import WindowSampler, heldout_batches, train_sampler


@dataclass
class Plan:
    """What the checks found and the run goes on with: its data, and where it resumes from."""

    meta: dict[str, Any]
    sampler: WindowSampler
    eval_batches: list[torch.Tensor]
    global_batch: int
    config: dict[str, Any]  # `cfg.to_dict()` with the vocabulary resolved: as checkpoints save it
    resume_from: Path | None

    @property
    def tokenizer_path(self) -> Path:
        return self.sampler.split.data_dir / self.meta["tokenizer"]


def check_run(cfg: RunConfig) -> Plan:
    """Check the layout, the data, the outputs and the resume point of `cfg` for this rank (as the
    launcher's RANK / WORLD_SIZE say; a plain run is rank 0 of 1); sets `cfg.model`'s vocabulary
    from the data. Raises `UserError` on the first problem."""
    t, p = cfg.train, cfg.parallel
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    global_batch = t.micro_batch * t.grad_accum * data_parallel_size(world, p.tensor, p.pipeline)
    data_dir = Path(cfg.data.path)
    meta = load_meta(data_dir)
    if not (data_dir / meta["tokenizer"]).is_file():  # every checkpoint carries a copy
        raise UserError(f"data.path {data_dir}: its tokenizer {meta['tokenizer']} is missing; prepare the data again")
    sampler = train_sampler(PackedSplit(data_dir, "train"), t.seq_len, t.seed, global_batch)
    eval_batches = heldout_batches(PackedSplit(data_dir, "heldout"), t.seq_len, t.micro_batch, t.eval_batches,
                                   full_only=p.pipeline > 1)
    if rank == 0:
        check_writable(t.out_dir, "train.out_dir")
        check_writable(cfg.checkpoint_dir, "checkpoint.dir")
    cfg.model = resolve_vocab(cfg.model, meta["vocab_size"])  # stored resolved in checkpoints
    config = cfg.to_dict()
    resume_from = resume_point(cfg)
    if resume_from is not None:
        _check_resumable(find_checkpoint(resume_from), cfg, config, meta)
    return Plan(meta, sampler, eval_batches, global_batch, config, resume_from)


def resume_point(cfg: RunConfig) -> Path | None:
    """The checkpoint a run resumes from under `checkpoint.resume`, or None for a fresh start."""
    root = cfg.checkpoint_dir
    mode = cfg.checkpoint.resume
    existing = read_latest(root) if root.is_dir() else None
    if existing is None and root.is_dir() and any(root.glob("step_*/manifest.json")):
        existing = find_checkpoint(root)
    if mode == "must" and existing is None:
        raise UserError(f"checkpoint.dir {root}: checkpoint.resume=must (or --resume) but no checkpoint is there")
    if mode == "never" and existing is not None:
        raise UserError(
            f"checkpoint.dir {root}: already holds checkpoints and checkpoint.resume=never would overwrite "
            "them; resume (checkpoint.resume=auto) or choose another checkpoint.dir"
        )
    return existing if mode != "never" else None


def _check_resumable(step_dir: Path, cfg: RunConfig, config: dict[str, Any], meta: dict[str, Any]) -> None:
    """The checkpoint's layout, config and tokenizer must be this run's (the shards themselves are
    verified as they load)."""
    manifest = read_manifest(step_dir)
    data_dir = Path(cfg.data.path)
    if not tokenized_alike(manifest, meta):
        raise UserError(
            f"data.path {data_dir}: tokenised with a different tokenizer than checkpoint {step_dir} was trained on; "
            f"prepare the data with `sparse-lm prepare-data --tokenizer {step_dir / 'tokenizer.model'}`"
        )
    check_topology(step_dir, manifest, cfg.parallel.tensor, cfg.parallel.pipeline)
    check_config(step_dir, manifest, config)
