"""Quality study: dense vs Top-KAST vs Spartan vs static sparse vs a smaller dense model, at equal
data order and token budget, over one or more seeds, each evaluated on the held-out split by
`sparse-lm eval`.

    python tools/study.py --config configs/study-seeds.yaml --out docs/results/seeds
    python tools/study.py --config configs/study-cpu.yaml --corpus notes/ more.jsonl --out runs/study-mine

The study config holds a `base` run config (model, train, data, ...), `variants`: a name →
overrides of the base (`sparsity`, `model`, ...), and optionally `seeds` (default: the base's
train.seed). A variant `{small_dense: NAME}` is a dense model whose width is chosen so that its
parameter count is closest to the forward non-zeros of variant NAME (its width `model.d_model` and
FFN scaled together, heads kept). At a given seed every variant trains with the same steps and
batches, so all see the same tokens in the same order; a seed also draws the initialisation and the
masks. All variants run at one seed before the next seed starts.

Each run is a `sparse-lm pretrain` subprocess writing under `<out>/runs/<name>` (`.../seed<S>` with
several seeds); a run whose summary exists is skipped, an interrupted one resumes from its last
checkpoint, so the study can be stopped and restarted at will. Then `sparse-lm eval` on the held-out
split (token perplexity, bits per byte). After every run it rewrites `<out>/results.json` (each run's
record and each variant's mean ± sample standard deviation over its seeds) and `<out>/results.md`;
at the end `<out>/loss_vs_tokens.png`, `<out>/loss_vs_flops.png` and `<out>/ppl_vs_density.png`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparse_lm.atomic import to_json, write_text  # noqa: E402
from sparse_lm.config import block_linear_shapes, config_from_dict  # noqa: E402
from sparse_lm.errors import UserError  # noqa: E402
from sparse_lm.plan.flops import training_flops_per_token  # noqa: E402
from sparse_lm.sparsity.allocation import sparse_linear_shapes, uniform_budgets  # noqa: E402


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for section, fields in overrides.items():
        out.setdefault(section, {}).update(fields)
    return out


def parameter_counts(tree: dict, vocab_size: int) -> tuple[int, int]:
    """(all parameters of the dense-equivalent model, forward non-zeros: A of the sparse linears
    plus everything dense) for a run config tree."""
    cfg = config_from_dict(_merge(tree, {"model": {"vocab_size": vocab_size}}))
    m = cfg.model
    block = sum(rows * cols for rows, cols in block_linear_shapes(m).values()) + 2 * m.d_model
    total = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) + m.n_layers * block + m.d_model
    if cfg.sparsity.method == "dense":
        return total, total
    b2 = cfg.sparsity.block**2
    sparse = sum(s.rows * s.cols for s in sparse_linear_shapes(cfg))
    kept = sum(uniform_budgets(cfg).values()) * b2  # |A| of every method (Spartan's allocations keep the total)
    return total, total - sparse + kept


def small_dense(base: dict, target: int, vocab_size: int) -> dict:
    """Overrides for a dense model of the base's shape scaled in width to ≈ `target` parameters."""
    model = config_from_dict(base).model
    step = 2 * model.n_heads  # keeps an even head dimension
    best = None
    for d_model in range(step, model.d_model + 1, step):
        ffn = 64 * max(1, round(model.ffn_hidden * d_model / model.d_model / 64))
        tree = _merge(base, {"model": {"d_model": d_model, "ffn_hidden": ffn}, "sparsity": {"method": "dense"}})
        count = parameter_counts(tree, vocab_size)[0]
        if best is None or abs(count - target) < abs(best[0] - target):
            best = (count, {"model": {"d_model": d_model, "ffn_hidden": ffn}, "sparsity": {"method": "dense"}})
    return best[1]


def _run(args: list[str], log: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    with log.open("a") as out:
        proc = subprocess.run([sys.executable, "-m", "sparse_lm", *args], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args[:1])} failed (exit {proc.returncode}); see {log}")


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _mean_sd(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "n": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="study YAML (base + variants [+ seeds])")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--corpus", nargs="+", help="prepare these sources instead of the base's data.path")
    parser.add_argument("--only", nargs="+", help="train only these variants (the report keeps finished others)")
    args = parser.parse_args()

    study = yaml.safe_load(args.config.read_text())
    base, variants = study["base"], study["variants"]
    seeds = study.get("seeds") or [config_from_dict(base).train.seed]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.corpus:
        data = args.out / "data"
        _run(["prepare-data", "--corpus", *args.corpus, "--out", str(data),
              "--vocab-size", str(base.get("data", {}).get("vocab_size", 4096))], args.out / "prepare.log")
        base = _merge(base, {"data": {"path": str(data)}})
    meta_path = Path(base["data"]["path"]) / "meta.json"
    if not meta_path.is_file():
        raise SystemExit(f"data.path {meta_path.parent}: not a prepared data directory; run `sparse-lm prepare-data "
                         f"--corpus stdlib --out {meta_path.parent}` (README) or pass --corpus")
    meta = json.loads(meta_path.read_text())
    vocab = 64 * math.ceil(meta["vocab_size"] / 64)

    runs = []
    for seed in seeds:  # every variant at one seed before the next seed: partial results stay comparable
        for name in variants:  # --only trains those; the others' finished runs stay in the report
            run = _study_run(args, base, variants, name, seed, vocab, many_seeds=len(seeds) > 1,
                             train=not args.only or name in args.only)
            if run is None:
                continue
            runs.append(run)
            results = _aggregate(runs)
            report = {"config": str(args.config), "base": base, "seeds": seeds, "runs": runs, "results": results,
                      "machine": _machine()}
            write_text(args.out / "results.json", to_json(report, indent=1) + "\n")  # study order kept
            write_text(args.out / "results.md", _table(results))
    _plots(results, args.out)
    print(_table(results))


def _study_run(args, base: dict, variants: dict, name: str, seed: int, vocab: int, many_seeds: bool,
               train: bool = True) -> dict | None:
    """Train (or resume, or skip if finished) and evaluate one variant at one seed; its record. With
    `train` False only a finished run is read (None if there is none)."""
    overrides = variants[name] or {}
    if "small_dense" in overrides:
        target = parameter_counts(_merge(base, variants[overrides["small_dense"]]), vocab)[1]
        overrides = small_dense(base, target, vocab)
    run_dir = args.out / "runs" / name / (f"seed{seed}" if many_seeds else "")
    tree = _merge(base, overrides)
    tree = _merge(tree, {"train": {"out_dir": str(run_dir), "seed": seed},
                         "checkpoint": {"dir": str(run_dir / "checkpoints")}})
    try:
        cfg = config_from_dict(_merge(tree, {"model": {"vocab_size": vocab}}))
        cfg.validate()
    except UserError as exc:
        raise SystemExit(f"{args.config}: variant {name}: {exc}") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(tree, sort_keys=False))
    summary_path, eval_path = run_dir / "summary.json", run_dir / "eval.json"
    if not train and not (summary_path.is_file() and eval_path.is_file()):
        return None
    started = time.time()
    label = f"{name} (seed {seed})"
    if not summary_path.is_file():
        print(f"[study] {label}: training", flush=True)
        _run(["pretrain", "--config", str(config_path), "--summary-json", str(summary_path)], run_dir / "train.log")
    if not eval_path.is_file():
        print(f"[study] {label}: eval", flush=True)
        _run(["eval", "--checkpoint", str(run_dir / "checkpoints"), "--corpus", "heldout", "--json", str(eval_path)],
             run_dir / "eval.log")
    summary, evaluation = json.loads(summary_path.read_text()), json.loads(eval_path.read_text())
    total, nonzero = parameter_counts(tree, vocab)
    tokens_per_step = cfg.train.seq_len * cfg.train.micro_batch * cfg.train.grad_accum
    print(f"[study] {label}: ppl {evaluation['perplexity']:.2f}, bits/byte {evaluation['bits_per_byte']:.4f}",
          flush=True)
    return {
        "name": name, "method": cfg.sparsity.method, "seed": seed, "steps": cfg.train.steps,
        "tokens": summary["tokens_seen"], "perplexity": evaluation["perplexity"],
        "bits_per_byte": evaluation["bits_per_byte"], "overrides": overrides,
        "parameters": total, "forward_nonzeros": nonzero, "nonzero_fraction": nonzero / total,
        "train_flops_per_token": training_flops_per_token(cfg), "tokens_per_step": tokens_per_step,
        "heldout_curve": [(r["step"], r["loss"]) for r in _records(run_dir, "heldout")],
        "train_wall_s": summary.get("train_wall_s", summary["wall_s"]),  # all processes of a resumed run
        "model_state_bytes": summary["model_state_bytes"], "eval": evaluation,
        "this_invocation_s": time.time() - started,
    }


def _aggregate(runs: list[dict]) -> dict:
    """Per variant (in study order): its runs' numbers as mean ± sample standard deviation over seeds,
    and the held-out curve averaged over the seeds that reached each step."""
    results = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        mine = [r for r in runs if r["name"] == name]
        first = mine[0]
        curve: dict[int, list[float]] = {}
        for r in mine:
            for step, loss in r["heldout_curve"]:
                curve.setdefault(step, []).append(loss)
        results[name] = {
            **{k: first[k] for k in ("method", "steps", "overrides", "parameters", "forward_nonzeros",
                                     "nonzero_fraction", "train_flops_per_token", "tokens_per_step",
                                     "model_state_bytes")},
            "seeds": [r["seed"] for r in mine], "tokens": first["tokens"],
            "perplexity": _mean_sd([r["perplexity"] for r in mine]),
            "bits_per_byte": _mean_sd([r["bits_per_byte"] for r in mine]),
            "loss": _mean_sd([r["eval"]["loss"] for r in mine]),
            "train_wall_s": _mean_sd([r["train_wall_s"] for r in mine]),
            "heldout_curve": [(s, sum(v) / len(v)) for s, v in sorted(curve.items())],
        }
    return results


def _machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}


def _table(results: dict) -> str:
    """Mean ± sample standard deviation over the seeds (n of them) for each variant."""
    def pm(stat: dict, fmt: str) -> str:
        return f"{stat['mean']:{fmt}} ± {stat['sd']:{fmt}}" if stat["n"] > 1 else f"{stat['mean']:{fmt}}"

    lines = ["| run | method | seeds | params (dense-equiv.) | forward non-zeros | tokens | train GFLOP/token | "
             "held-out ppl | bits/byte | loss | train time (mean) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['method']} | {r['perplexity']['n']} | {r['parameters'] / 1e6:.2f}M | "
                     f"{r['forward_nonzeros'] / 1e6:.2f}M ({r['nonzero_fraction']:.2f}) | {r['tokens'] / 1e6:.2f}M | "
                     f"{r['train_flops_per_token'] / 1e9:.4f} | {pm(r['perplexity'], '.2f')} | "
                     f"{pm(r['bits_per_byte'], '.4f')} | {pm(r['loss'], '.4f')} | "
                     f"{r['train_wall_s']['mean'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def _plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for axis, path, scale in (("training tokens (M)", "loss_vs_tokens.png", lambda r: r["tokens_per_step"] / 1e6),
                              ("training FLOPs (PFLOP)", "loss_vs_flops.png",
                               lambda r: r["tokens_per_step"] * r["train_flops_per_token"] / 1e15)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, r in results.items():
            steps, losses = zip(*r["heldout_curve"]) if r["heldout_curve"] else ((), ())
            ax.plot([s * scale(r) for s in steps], losses, marker=".", label=name)
        _save(fig, ax, axis, "held-out loss (nats/token, mean over seeds)", out / path)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in sorted({r["method"] for r in results.values()}):
        points = [(r["forward_nonzeros"] / 1e6, r["perplexity"]["mean"], n) for n, r in results.items()
                  if r["method"] == method]
        # A method's line joins its first run (in study order) at each size; further runs at a size
        # already on the line (controls: another learning rate, init, ...) are marked apart.
        line, seen = [], set()
        for p in points:
            if p[0] not in seen:
                seen.add(p[0])
                line.append(p)
        line.sort()
        drawn = ax.plot([p[0] for p in line], [p[1] for p in line], marker="o", label=method)
        extra = [p for p in points if p not in line]
        if extra:
            ax.plot([p[0] for p in extra], [p[1] for p in extra], marker="x", linestyle="none",
                    color=drawn[0].get_color())
        for x, y, n in points:
            ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    _save(fig, ax, "forward non-zero parameters (M)", "held-out perplexity (sparse-lm eval)",
          out / "ppl_vs_density.png")


def _save(fig, ax, xlabel: str, ylabel: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
