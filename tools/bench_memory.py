"""Measured model-state memory, peak RSS and peak memory during a step of always-sparse Top-KAST
against dense, per rank.

    python tools/bench_memory.py --json runs/bench_memory.json [--d-model 1024 --layers 8 --steps 3]

Builds a weight-dominated Llama (tied embeddings, small vocabulary) dense, Top-KAST element-wise
and Top-KAST with 16×16 and 32×32 blocks (D = M = 0.1 by default), runs a few real AdamW training
steps on each and reports
- model state: bytes of parameters + gradients + optimizer state + buffers (indices, masks),
  counted from the live tensors;
- the process's peak RSS (each variant runs in its own fresh process, as it only ever grows);
- the step's transient peak: one more step under the torch profiler (memory on), whose record of
  every allocation and free gives the most bytes live at once above the model state — activations,
  gradients in flight, kernel workspaces, optimizer temporaries (RSS cannot show it: the allocator
  keeps freed memory);
- the largest single allocation of any operator in that step, overall and inside the sparse
  products, beside the linears' dense weight sizes: the kernels promise no transient larger than a
  layer's dense weight (element mode's tile) and none of weight size at all in block mode;
- the same step's transient peak and step time with activation checkpointing
  (`train.activation_checkpointing`: every block's forward recomputed in backward), `recompute_*`.
The dense run is the reference for the ratios.
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
    "topkast_block32": {"method": "topkast", "granularity": "block", "block_size": 32},
}


def _step_allocations(step) -> dict:
    """What one call of `step()` allocates, from the profiler's record of every allocation and
    free: the peak of bytes live above what was live before it, and the most bytes one operator
    allocated for itself (and its name), over the whole step and inside the sparse layers'
    products (`SparseMatmul` forward and backward)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()

    def in_sparse_kernel(event) -> bool:
        while event is not None:
            if event.name.startswith("SparseMatmul"):
                return True
            event = event.cpu_parent
        return False

    sizes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in sizes:
        live += nbytes
        peak = max(peak, live)
    events = list(prof.events())
    overall = max(((e.self_cpu_memory_usage, e.name) for e in events), default=(0, ""))
    kernel = max(((e.self_cpu_memory_usage, e.name) for e in events if in_sparse_kernel(e)), default=(0, ""))
    return {"step_peak_bytes": peak, "largest_allocation_bytes": int(overall[0]), "largest_allocation_op": overall[1],
            "largest_kernel_allocation_bytes": int(kernel[0]), "largest_kernel_allocation_op": kernel[1]}


def _measure(variant: str, args: argparse.Namespace, queue) -> None:
    import torch

    from sparse_lm.config import ModelConfig, SparsityConfig
    from sparse_lm.methods.factory import linear_factory
    from sparse_lm.model import Llama, init_weights
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

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=False)
        model(ids[:, :-1], ids[:, 1:]).backward()
        optimizer.step()

    step_s, reselect_s, state = [], [], None
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        train_step()
        step_s.append(time.perf_counter() - t0)
        state = model_state_bytes(model, optimizer)  # gradients and Adam moments all live here
        if schedule.due(step):
            reselect_s.append(schedule.reselect_all(optimizer)["seconds"])
    linears = [m.in_features * m.out_features * 4 for m in model.modules() if hasattr(m, "in_features")]
    kept = _step_allocations(train_step)
    for block in model.layers:  # activation checkpointing, as `build_model` sets it from the config
        block.recompute = True
    recompute_s = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        train_step()
        recompute_s.append(time.perf_counter() - t0)
    recomputed = _step_allocations(train_step)
    queue.put({
        **kept,
        "recompute_step_peak_bytes": recomputed["step_peak_bytes"],
        "recompute_step_s": recompute_s,
        "smallest_linear_dense_weight_bytes": min(linears),
        "largest_linear_dense_weight_bytes": max(linears),
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
        r = results[variant]
        print(f"{variant}: model state {r['model_state']['total'] / 2**20:.1f} MiB, "
              f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB, step peak {r['step_peak_bytes'] / 2**20:.1f} MiB, "
              f"largest allocation {r['largest_allocation_bytes'] / 2**20:.2f} MiB ({r['largest_allocation_op']}), "
              f"in sparse kernels {r['largest_kernel_allocation_bytes'] / 2**20:.2f} MiB "
              f"({r['largest_kernel_allocation_op'] or '-'}); linears' dense weights "
              f"{r['smallest_linear_dense_weight_bytes'] / 2**20:.2f}-"
              f"{r['largest_linear_dense_weight_bytes'] / 2**20:.2f} MiB; "
              f"with activation checkpointing: step peak {r['recompute_step_peak_bytes'] / 2**20:.1f} MiB, "
              f"step {min(r['recompute_step_s']):.2f} s against {min(r['step_s']):.2f} s", file=sys.stderr)
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
        "dense_step_peak_bytes": dense["step_peak_bytes"],
        "dense_recompute_step_peak_bytes": dense["recompute_step_peak_bytes"],
        "dense_recompute_step_s": dense["recompute_step_s"],
        "dense_largest_allocation_bytes": dense["largest_allocation_bytes"],
        "smallest_linear_dense_weight_bytes": dense["smallest_linear_dense_weight_bytes"],
        "largest_linear_dense_weight_bytes": dense["largest_linear_dense_weight_bytes"],
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
            "step_peak_bytes": r["step_peak_bytes"],
            "step_peak_ratio": r["step_peak_bytes"] / dense["step_peak_bytes"],
            "recompute_step_peak_bytes": r["recompute_step_peak_bytes"],
            "recompute_step_peak_over_kept": r["recompute_step_peak_bytes"] / r["step_peak_bytes"],
            "recompute_step_s": r["recompute_step_s"],
            "recompute_step_time_over_kept": min(r["recompute_step_s"]) / min(r["step_s"]),
            "largest_allocation_bytes": r["largest_allocation_bytes"],
            "largest_allocation_op": r["largest_allocation_op"],
            "largest_kernel_allocation_bytes": r["largest_kernel_allocation_bytes"],
            "largest_kernel_allocation_op": r["largest_kernel_allocation_op"],
            "kernel_allocation_over_largest_dense_weight":
                r["largest_kernel_allocation_bytes"] / r["largest_linear_dense_weight_bytes"],
            "reselect_s": r["reselect_s"],
            "build_s": r["build_s"],
        }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: {kk: report[k][kk] for kk in ("ratio", "peak_rss_ratio", "step_time_ratio", "step_peak_ratio",
                                                    "kernel_allocation_over_largest_dense_weight",
                                                    "recompute_step_peak_over_kept")}
                      for k in VARIANTS if k != "dense"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
