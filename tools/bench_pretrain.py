"""End-to-end training speed: tokens/s of `sparse-lm pretrain` always-sparse against dense, every
variant run by this one invocation on the same machine.

    python tools/bench_pretrain.py --json docs/bench/pretrain.json --markdown docs/bench/pretrain.md

The MLP microbenchmark (`bench_step.py`) times one sparse MLP's forward, backward and optimizer
step; a user trains a whole model, with attention, the embeddings and LM head (dense in every
variant), the data loader, logging, and reselection. This runs the real trainer: one `sparse-lm
pretrain` subprocess per variant on a weight-dominated model (default d_model 1024, 4 layers, a
4096-token vocabulary), no evaluation or checkpoint, and reads the step timestamps of its
`metrics.jsonl`. Tokens/s is measured from the end of step `--warmup` to the end of the last step,
so it includes every reselection in between (`--reselect-every`, default 10: a reselection is paid
every 10 steps here, ten times as often as the presets do). Variants alternate over `--repeats`
rounds and each keeps its fastest round, so drift on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tools"), str(REPO)]  # this checkout's sparse_lm, not an installed one
from bench_offload import environment  # noqa: E402
from bench_step import write_report  # noqa: E402
from sparse_lm.methods.registry import method_of  # noqa: E402

VARIANTS = {  # name → sparsity section (D = M = 0.1, as the presets)
    "dense": {"method": "dense"},
    "topkast-block16": {"method": "topkast", "density": 0.1, "exploration": 0.1, "granularity": "block",
                        "block_size": 16},
    "topkast-block32": {"method": "topkast", "density": 0.1, "exploration": 0.1, "granularity": "block",
                        "block_size": 32},
    "topkast-element": {"method": "topkast", "density": 0.1, "exploration": 0.1, "granularity": "element"},
}


def run_config(args: argparse.Namespace, sparsity: dict, out_dir: str) -> dict:
    sparse = method_of(sparsity["method"]).sparse
    return {
        "model": {"d_model": args.d_model, "n_layers": args.layers, "n_heads": args.d_model // 64,
                  "max_seq_len": args.seq_len, "tie_embeddings": False},
        "sparsity": sparsity | ({"reselect_every": args.reselect_every} if sparse else {}),
        "data": {"path": str(Path(args.data).resolve())},
        "train": {"steps": args.steps, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                  "warmup_steps": 1, "log_every": args.steps, "eval_every": 10**9, "eval_batches": 1,
                  "precision": args.precision, "out_dir": out_dir},
        "checkpoint": {"every": 10**9},
    }


def tokens_per_second(metrics: Path, warmup: int) -> dict:
    """From the step records: tokens/s from the end of step `warmup` to the end of the last step."""
    steps = [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("kind") == "step"]
    start = next(r for r in steps if r["step"] == warmup)
    timed = [r for r in steps if r["step"] > warmup]
    seconds = timed[-1]["time"] - start["time"]
    tokens = timed[-1]["tokens"] - start["tokens"]  # a record's `tokens`: seen so far
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "steps": len(timed), "tokens": tokens,
            "final_loss": steps[-1]["loss"]}


def run_variant(name: str, args: argparse.Namespace, scratch: Path) -> dict:
    out = scratch / name
    scratch.mkdir(parents=True, exist_ok=True)
    config = scratch / f"{name}.yaml"
    config.write_text(yaml.safe_dump(run_config(args, VARIANTS[name], str(out))))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    log = scratch / f"{name}.log"
    with log.open("w") as stream:
        proc = subprocess.run([sys.executable, "-m", "sparse_lm", "pretrain", "--config", str(config),
                               "--summary-json", str(scratch / f"{name}.summary.json")], cwd=REPO, env=env,
                              stdout=stream, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{name}: sparse-lm pretrain exited with {proc.returncode}; see {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-15:]))
    result = tokens_per_second(out / "metrics.jsonl", args.warmup)
    summary = json.loads((scratch / f"{name}.summary.json").read_text())
    result["peak_rss_bytes"] = summary.get("peak_rss_bytes")
    return result


def measure(args: argparse.Namespace) -> dict:
    rounds: dict[str, list[dict]] = {name: [] for name in args.variants}
    with tempfile.TemporaryDirectory(prefix="bench_pretrain_") as scratch:
        for round_ in range(args.repeats):
            for name in args.variants:
                result = run_variant(name, args, Path(scratch) / f"round{round_}")
                rounds[name].append(result)
                print(f"round {round_} {name}: {result['tokens_per_s']:,.0f} tok/s over {result['steps']} steps",
                      file=sys.stderr, flush=True)
    best = {name: max(r, key=lambda x: x["tokens_per_s"]) for name, r in rounds.items()}
    dense = best["dense"]["tokens_per_s"]
    return {name: {**b, "over_dense": b["tokens_per_s"] / dense, "rounds": rounds[name]} for name, b in best.items()}


def markdown(report: dict) -> str:
    env, a = report["environment"], report["args"]
    lines = ["# End-to-end training speed: `sparse-lm pretrain`, sparse against dense", "", f"`{report['command']}`",
             "", f"{env.get('gpu', 'no GPU')}; {env['cpu']}, {env['cpu_count']} CPUs, {a['threads']} thread(s), "
             f"load average at the end {report['load_average_at_end']}, torch {env['torch']}. d_model {a['d_model']}, "
             f"{a['layers']} layers, {a['micro_batch']} × {a['seq_len']} tokens per step, {a['precision']}, "
             f"{a['steps']} steps of which the first {a['warmup']} are not timed; Top-KAST D = M = 0.1 "
             f"reselecting every {a['reselect_every']} steps (included); best of {a['repeats']} alternating rounds.",
             "",
             "| variant | tokens/s | × dense | peak RSS GiB |", "|---|---:|---:|---:|"]
    for name, r in report["results"].items():
        rss = f"{r['peak_rss_bytes'] / 2**30:.2f}" if r.get("peak_rss_bytes") else "-"
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['over_dense']:.2f} | {rss} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--data", default=str(REPO / "data/stdlib-24m"),
                        help="a folder written by `sparse-lm prepare-data`")
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=23)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--reselect-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="train.precision (on a GPU: bf16, what the presets train in)")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    if not (Path(args.data) / "train.bin").is_file():
        parser.error(f"--data {args.data}: no prepared data there (expected a folder written by "
                     "`sparse-lm prepare-data`)")
    if not 0 <= args.warmup < args.steps - 1:
        parser.error(f"--warmup {args.warmup}: expected at least 0 and below --steps - 1 = {args.steps - 1}")
    if "dense" not in args.variants:
        parser.error("--variants: expected dense among them (every ratio is against it)")
    started = time.perf_counter()
    results = measure(args)
    import torch

    env = environment(args.threads)
    if torch.cuda.is_available():  # pretrain trains on the GPU when there is one
        env["gpu"] = torch.cuda.get_device_name(0)
    report = {"command": " ".join(["python", "tools/bench_pretrain.py", *(argv or sys.argv[1:])]),
              "environment": env, "args": vars(args), "results": results,
              "load_average_at_end": os.getloadavg(), "seconds": time.perf_counter() - started}
    write_report(report, args.json, args.markdown, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
