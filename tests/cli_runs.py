"""Shared helpers for tests that run the real CLI in subprocesses on a tiny model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
STEPS = 12
TINY = {
    "model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 32},
    "train": {
        "steps": STEPS, "seq_len": 32, "micro_batch": 4, "lr": 1.0e-2, "warmup_steps": 2,
        "log_every": 4, "eval_every": 6, "eval_batches": 2,
    },
    "checkpoint": {"every": 6, "keep": 3},
}


# Single-process reference runs of TINY for STEPS steps (checkpoints at 6 and 12), shared by the test
# files through the session fixture `reference_runs` (conftest.py).
REFERENCE_VARIANTS = {
    "dense": {},
    "topkast": {"sparsity": {"method": "topkast", "density": 0.2, "exploration": 0.2, "reselect_every": 4}},
    # with SμPar (θ₀ and the offload store scaled) and a learning rate per group
    "topkast-offload-block": {"sparsity": {"method": "topkast", "density": 0.2, "exploration": 0.2, "reselect_every": 4,
                                           "complement": "offload", "granularity": "block", "block_size": 16,
                                           "supar": True},
                              "train": {"lr_mult_embedding": 2.0, "lr_mult_hidden": 0.3, "lr_mult_norm": 0.5}},
    # resumed at step 6, between RigL's updates at 4 and 8 (the step before 8 captures its gradients)
    "rigl": {"sparsity": {"method": "rigl", "density": 0.2, "reselect_every": 4}},
    # resumed at step 6: after the warmup (3 steps) and a reallocation (4), before another (8) and
    # the frozen finetune (from step 10)
    "spartan-global": {"sparsity": {"method": "spartan", "density": 0.2, "exploration": 0.2, "reselect_every": 4,
                                    "granularity": "block", "block_size": 16, "allocation": "global",
                                    "warmup_frac": 0.25, "finetune_frac": 0.2}},
}


def write_config(tmp: Path, data_dir: Path, name: str, **sections) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["data"] = {"path": str(data_dir)}
    cfg["train"]["out_dir"] = str(tmp / name)
    for section, fields in sections.items():
        cfg.setdefault(section, {}).update(fields)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_cli(*args: str, check: bool = True, launcher: list[str] | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m sparse_lm *args` (or `launcher + args`) from the repository root."""
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT=free_port(), PYTHONUNBUFFERED="1", **extra)
    cmd = launcher + list(args) if launcher else [sys.executable, "-m", "sparse_lm", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


