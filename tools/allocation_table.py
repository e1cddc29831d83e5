"""Per-layer forward densities under each Spartan allocation, and what the allocation step costs.

    python tools/allocation_table.py --checkpoint runs/spartan-12l/checkpoints --pipeline 4 \\
        --json docs/bench/allocation.json --markdown docs/bench/allocation.md

Static allocations (uniform, erk, pipeline_balanced with `--pipeline` stages) are computed from the
checkpoint's config; `global` is read from the checkpoint (the budgets its training run reached).
Timings: `static_budgets` for each static allocation, and `reallocate` (the global threshold over
every layer's B, one process) on the loaded model; min and median of `--repeats`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_lm.checkpoint.model_io import load_trained_model  # noqa: E402
from sparse_lm.parallel.layout import BLOCK_LINEAR_NAMES  # noqa: E402
from sparse_lm.sparsity import allocation  # noqa: E402
from sparse_lm.sparsity.spartan import spartan_layers  # noqa: E402


def _timed(fn, repeats: int) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return {"min_s": min(times), "median_s": statistics.median(times)}


def _per_block_layer(budgets: dict[str, int], shapes: list[allocation.LayerShape], block: int, n_layers: int):
    """Density of A per Transformer block, and per linear kind (averaged over the blocks)."""
    per_layer = []
    for i in range(n_layers):
        mine = [s for s in shapes if s.name.startswith(f"layers.{i}.")]
        per_layer.append(sum(budgets[s.name] for s in mine) / sum(s.rows * s.cols // block**2 for s in mine))
    per_kind = {}
    for kind in BLOCK_LINEAR_NAMES:
        mine = [s for s in shapes if s.name.endswith(kind)]
        if mine:
            per_kind[kind] = sum(budgets[s.name] for s in mine) / sum(s.rows * s.cols // block**2 for s in mine)
    return per_layer, per_kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a Spartan checkpoint (global allocation)")
    parser.add_argument("--pipeline", type=int, default=4, help="stages for pipeline_balanced")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model, cfg, manifest = load_trained_model(args.checkpoint)
    layers = spartan_layers(model)
    if not layers:
        raise SystemExit(f"{args.checkpoint}: not a Spartan checkpoint (sparsity.method={cfg.sparsity.method})")
    block, n_layers = cfg.sparsity.block, cfg.model.n_layers
    shapes = allocation.sparse_linear_shapes(cfg)
    trained = {layer.name: int(layer.budget) for layer in layers}

    results, timings = {}, {}
    for name in ("uniform", "erk", "pipeline_balanced"):
        variant = copy.deepcopy(cfg)
        variant.sparsity.allocation = name
        variant.parallel.pipeline = args.pipeline if name == "pipeline_balanced" else 1
        budgets = allocation.static_budgets(variant)
        timings[name] = _timed(lambda: allocation.static_budgets(variant), args.repeats)
        results[name] = budgets
    results[f"{cfg.sparsity.allocation} (trained, step {manifest['step']})"] = trained
    total = sum(allocation.uniform_budgets(cfg).values())
    timings["global reallocate (1 process)"] = _timed(lambda: allocation.reallocate(layers, total, None), args.repeats)

    staged = copy.deepcopy(cfg)
    staged.parallel.pipeline = args.pipeline
    stage_flops = {name: allocation.stage_flops(staged, budgets) for name, budgets in results.items()}
    tables = {name: _per_block_layer(budgets, shapes, block, n_layers) for name, budgets in results.items()}
    report = {
        "checkpoint": str(manifest["path"]), "config": cfg.to_dict(), "pipeline_stages": args.pipeline,
        "budgets": results, "per_layer_density": {n: t[0] for n, t in tables.items()},
        "per_kind_density": {n: t[1] for n, t in tables.items()},
        "stage_forward_flops_per_token": stage_flops, "timings": timings,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(_markdown(report, n_layers))
    print(_markdown(report, n_layers))


def _markdown(report: dict, n_layers: int) -> str:
    names = list(report["per_layer_density"])
    lines = ["| layer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i in range(n_layers):
        lines.append(f"| {i} | " + " | ".join(f"{report['per_layer_density'][n][i]:.3f}" for n in names) + " |")
    lines += ["", "| linear | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for kind in report["per_kind_density"][names[0]]:
        lines.append(f"| {kind} | " + " | ".join(f"{report['per_kind_density'][n][kind]:.3f}" for n in names) + " |")
    lines += ["", f"| forward GFLOP/token per stage ({report['pipeline_stages']} stages) | max / min |", "|---|---|"]
    for name, flops in report["stage_forward_flops_per_token"].items():
        lines.append(f"| {name}: " + ", ".join(f"{f / 1e9:.4f}" for f in flops) + f" | {max(flops) / min(flops):.3f} |")
    lines += ["", "| step | min | median |", "|---|---|---|"]
    for name, t in report["timings"].items():
        lines.append(f"| {name} | {t['min_s'] * 1e3:.1f} ms | {t['median_s'] * 1e3:.1f} ms |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
