"""Measured model-state memory and peak RSS of always-sparse Top-KAST against dense, per rank.

    python tools/bench_memory.py --json runs/bench_memory.json [--d-model 1024 --layers 8 --steps 3]

Builds a weight-dominated Llama (tied embeddings, small vocabulary) dense, Top-KAST element-wise
and Top-KAST with 16×16 blocks (D = M = 0.1 by default), runs a few real AdamW training steps on
each and reports bytes of parameters + gradients + optimizer state + buffers (indices, masks)
counted from the live tensors, and the process's peak RSS. Each variant runs in its own fresh
process, because peak RSS only ever grows within one; the dense run is the reference for the ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

VARIANTS = {
    "dense": {"method": "dense"},
    "topkast_element": {"method": "topkast", "granularity": "element"},
    "topkast_block16": {"method": "topkast", "granularity": "block", "block_size": 16},
}


def _measure(variant: str, args: argparse.Namespace, queue) -> None:
    import torch

    from sparse_lm.config import ModelConfig, SparsityConfig
    from sparse_lm.model import Llama, init_weights
    from sparse_lm.sparsity.methods import linear_factory
    from sparse_lm.sparsity.topkast import TopKAST
    from sparse_lm.train.memory import dense_equivalent_bytes, model_state_bytes
    from sparse_lm.train.metrics import peak_rss_bytes

    torch.set_num_threads(args.threads)
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.d_model // 64,
                      max_seq_len=args.seq, tie_embeddings=True)
    sparsity = SparsityConfig(density=args.density, exploration=args.exploration, reselect_every=1, **VARIANTS[variant])
    started = time.perf_counter()
    model = Llama(cfg, linear_factory(sparsity))
    init_weights(model, 0)
    build_s = time.perf_counter() - started
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    schedule = TopKAST(model, sparsity, total_steps=args.steps + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    step_s, reselect_s, state = [], [], None
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        model(ids[:, :-1], ids[:, 1:]).backward()
        optimizer.step()
        step_s.append(time.perf_counter() - t0)
        state = model_state_bytes(model, optimizer)  # gradients and Adam moments all live here
        if schedule.due(step):
            reselect_s.append(schedule.reselect_all(optimizer)["seconds"])
    queue.put({
        "model_state": state,
        "dense_equivalent_bytes": dense_equivalent_bytes(model),
        "peak_rss_bytes": peak_rss_bytes(),
        "build_s": build_s,
        "step_s": step_s,
        "reselect_s": reselect_s,
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="write the results here")
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--exploration", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    import torch

    ctx = mp.get_context("spawn")
    results = {}
    for variant in VARIANTS:
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(variant, args, queue))
        proc.start()
        results[variant] = queue.get()
        proc.join()
        print(f"{variant}: model state {results[variant]['model_state']['total'] / 2**20:.1f} MiB, "
              f"peak RSS {results[variant]['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    dense = results["dense"]
    report = {
        "config": vars(args),
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "threads": args.threads,
        },
        "dense_model_state_bytes": dense["model_state"]["total"],
        "dense_peak_rss_bytes": dense["peak_rss_bytes"],
        "dense_step_s": dense["step_s"],
    }
    for variant in VARIANTS:
        if variant == "dense":
            continue
        r = results[variant]
        report[variant] = {
            "sparse_model_state_bytes": r["model_state"]["total"],
            "parts": r["model_state"],
            "ratio": r["model_state"]["total"] / dense["model_state"]["total"],
            "peak_rss_bytes": r["peak_rss_bytes"],
            "peak_rss_ratio": r["peak_rss_bytes"] / dense["peak_rss_bytes"],
            "step_s": r["step_s"],
            "step_time_ratio": min(r["step_s"]) / min(dense["step_s"]),
            "reselect_s": r["reselect_s"],
            "build_s": r["build_s"],
        }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: {kk: report[k][kk] for kk in ("ratio", "peak_rss_ratio", "step_time_ratio")}
                      for k in VARIANTS if k != "dense"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
