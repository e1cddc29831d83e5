"""Each sparse product alone, on every kernel path, against the dense product: the numbers behind
the path rules in `sparsity/kernels.py` (`use_in_place`, `use_blocks`).

    python tools/bench_kernels.py --json docs/bench/kernels.json --markdown docs/bench/kernels.md

One layer of `--shape` out × in, a fraction f of its b × b block grid stored (all of it in A, so
the forward, the input gradient and the value gradient all cover f of the grid), `--tokens`
tokens. Block size 1 is element mode (no gathered path: it moves 4 bytes per index). For each
block size and fraction, the dense products (x·Wᵀ, g·W, gᵀ·x) and each path's
(`kernels.forced_path`) run in turn, one warm-up each, then `--repeat` rounds; speedup = dense
median / path median. Each path's output is also compared with the dense one (largest absolute
difference), so a fast wrong kernel shows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from bench_step import alternate, cpu_model, write_report
from sparse_lm.sparsity import kernels
from sparse_lm.sparsity.kernels import SparseMatmul, backends, cpu, from_blocks, scatter_blocks

PRODUCTS = ("forward", "input_grad", "value_grad")


def layer(shape, block: int, fraction: float, generator):
    """(values, forward mask, index, dense weight) with `fraction` of the grid stored, all in A."""
    n_blocks = (shape[0] // block) * (shape[1] // block)
    n = max(1, round(fraction * n_blocks))
    index = torch.randperm(n_blocks, generator=generator)[:n]
    values = torch.randn(n, block, block, generator=generator) * shape[1] ** -0.5
    dense = from_blocks(scatter_blocks(values, index, n_blocks), shape[0] // block, shape[1] // block)
    return values, torch.ones(n, dtype=torch.bool), index.int(), dense


def sparse_products(x, g, values, mask, index, shape, block) -> dict:
    """{product: fn returning its result} for the sparse layer, on whatever path is forced."""
    args = (mask, index, shape, block, 0.0, 1.0)
    x_leaf, values_leaf = x.clone().requires_grad_(True), values.clone().requires_grad_(True)
    y_for_x = SparseMatmul.apply(x_leaf, values, *args)  # graphs kept: each call re-runs the backward
    y_for_values = SparseMatmul.apply(x, values_leaf, *args)

    def forward():
        with torch.no_grad():
            return SparseMatmul.apply(x, values, *args)

    return {"forward": forward,
            "input_grad": lambda: torch.autograd.grad(y_for_x, x_leaf, g, retain_graph=True)[0],
            "value_grad": lambda: torch.autograd.grad(y_for_values, values_leaf, g, retain_graph=True)[0]}


def measure(shape, block: int, fraction: float, args) -> dict:
    generator = torch.Generator().manual_seed(0)
    values, mask, index, weight = layer(shape, block, fraction, generator)
    x = torch.randn(args.tokens, shape[1], generator=generator)
    g = torch.randn(args.tokens, shape[0], generator=generator)
    dense = {"forward": lambda: x @ weight.T, "input_grad": lambda: g @ weight, "value_grad": lambda: g.T @ x}
    paths = [p for p in kernels.PATHS if (p != "in_place" or backends.cpu_takes(x)) and (p != "gathered" or block >= 8)]
    sparse = {}
    for path in paths:
        with kernels.forced_path(path):
            sparse[path] = sparse_products(x, g, values, mask, index, shape, block)
    result = {"block": block, "fraction": fraction, "stored_blocks": len(values), "products": {}}
    for product in PRODUCTS:
        expected = dense[product]()
        if product == "value_grad":  # the dense gradient read out at the stored blocks
            expected = kernels.to_blocks(expected, block)[index.long()]
        fns, errors = {"dense": dense[product]}, {}
        for path in paths:
            fns[path] = lambda fn=sparse[path][product], path=path: _forced(path, fn)
            errors[path] = (fns[path]() - expected).abs().max().item()
        times = alternate(fns, args.repeat)
        dense_median = statistics.median(times["dense"])
        result["products"][product] = {
            path: {"seconds": times[path], "speedup_median": dense_median / statistics.median(times[path]),
                   "max_abs_error": errors.get(path, 0.0)}
            for path in fns}
    return result


def _forced(path: str, fn):
    with kernels.forced_path(path):
        return fn()


def markdown(report: dict) -> str:
    env, cfg = report["environment"], report["config"]
    paths = [p for p in kernels.PATHS if any(p in r["products"]["forward"] for r in report["results"])]
    header = " | ".join(f"{product} {path}" for product in PRODUCTS for path in paths)
    lines = [
        "# Sparse products alone, per kernel path, against dense",
        "",
        f"`{report['command']}`",
        "",
        f"{env['cpu']}, {env['cpu_count']} CPUs, {env['threads']} torch thread(s), torch {env['torch']}. "
        f"Layer {cfg['shape'][0]} × {cfg['shape'][1]}, {cfg['tokens']} tokens, fraction f of the block grid "
        f"stored (all in A). Speedup = dense median / path median over {cfg['repeat']} alternating runs after a "
        f"warm-up; largest absolute difference from the dense result {report['max_abs_error']:.1e}.",
        "",
        f"| b | f | {header} |",
        "|---:|---:|" + "---:|" * (len(PRODUCTS) * len(paths)),
    ]
    for r in report["results"]:
        cells = " | ".join(f"{r['products'][product][path]['speedup_median']:.2f}"
                           if path in r["products"][product] else "–"
                           for product in PRODUCTS for path in paths)
        lines.append(f"| {r['block']} | {r['fraction']:g} | {cells} |")
    lines += ["", f"Load average at start / end: {env['load_average_at_start'][0]:.2f} / "
              f"{env['load_average_at_end'][0]:.2f} (other work on the machine makes times noisier)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(4096, 1024), metavar=("OUT", "IN"))
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--blocks", type=int, nargs="+", default=(8, 16, 32, 64))
    parser.add_argument("--fractions", type=float, nargs="+", default=(0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0))
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per product and path, after one warm-up")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="write the raw numbers here")
    parser.add_argument("--markdown", help="write the table here (it is also printed)")
    args = parser.parse_args(argv)
    for block in args.blocks:
        if args.shape[0] % block or args.shape[1] % block:
            parser.error(f"--shape {args.shape[0]} {args.shape[1]} does not split into blocks of {block}")
    torch.set_num_threads(args.threads)
    env = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
           "compiled_kernels": cpu.ops() is not None, "load_average_at_start": os.getloadavg()}
    results = []
    for block in args.blocks:
        for fraction in args.fractions:
            results.append(measure(tuple(args.shape), block, fraction, args))
            summary = ", ".join(f"{product} "
                                + "/".join(f"{v['speedup_median']:.2f}" for k, v in r.items() if k != "dense")
                                for product, r in results[-1]["products"].items())
            print(f"b={block} f={fraction:g}: {summary}", file=sys.stderr, flush=True)
    env["load_average_at_end"] = os.getloadavg()
    command = " ".join(["python tools/bench_kernels.py", *(sys.argv[1:] if argv is None else argv)])
    error = max(p["max_abs_error"] for r in results for product in r["products"].values() for p in product.values())
    report = {"command": command, "config": vars(args), "environment": env, "max_abs_error": error, "results": results}
    text = markdown(report)
    write_report(report, args.json, args.markdown, text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
