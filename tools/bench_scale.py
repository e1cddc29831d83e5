"""`sparse-lm plan` checked at the largest shapes one CPU machine holds: real engines, measured
against the plan's prediction for the same config and layout.

    python tools/bench_scale.py                      # docs/bench/scale.json and docs/bench/scale.md
    python tools/bench_scale.py --cases 1b 1b-tp2    # a subset
    python tools/bench_scale.py --config configs/tiny.yaml --set model.n_layers=2 ...   # any shape (tests)

Cases (fp32 on the CPU, one micro-batch of `--seq-len` tokens, grad_accum 1, the config's ZeRO stage):
- `1b`: configs/llama-1b-tp4.yaml with parallel.tensor=1 on one process: build and θ₀
  initialisation, DeepSpeed engine set-up, training steps with and without activation
  checkpointing, a reselection of every sparse linear, checkpoint save and load (and its size on
  disk), `sparse-lm convert export-hf` of that checkpoint;
- `1b-tp2`: the same on two ranks over gloo (tensor 2; per-rank numbers, no export);
- `1b-offload`: the 1.1B preset on one process with `parallel.offload_optimizer` (no checkpoint);
- `13b-block`, `70b-block`: one Transformer block at Llama-2-13B / 70B width (n_layers 1,
  tensor 1), with a small vocabulary (`--block-vocab`) so that the embedding does not dominate.

Each case runs in fresh processes (one per rank), so every peak RSS is the case's own. Per phase a
rank records its wall time and its peak RSS in that phase (VmHWM, reset between phases through
/proc/self/clear_refs), so a dense temporary shows up in the phase that made it. Model state is
`train.memory.model_state_bytes` measured at the second step's optimizer boundary (gradients and
Adam's moments live), as training does; the plan's model state is the same parts
(`plan.memory.model_state` less the derived rotary tables). One more step runs under the profiler
(`train.memory.allocated_peak_bytes`): the most bytes of tensors it holds at once, against the
plan's transients — exact where RSS also shows the C allocator's retention. The JSON has every
number; the Markdown the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
GIB, MIB = 2**30, 2**20
# The plan's parts `model_state_bytes` measures (the rotary tables are derived caches, not state).
MEASURED_PARTS = ("parameters", "gradients", "master_weights", "optimizer_moments", "offload_buffers",
                  "indices_masks", "score_caches", "offload_host")
COMMON = ["train.precision=fp32", "train.micro_batch=1", "train.grad_accum=1", "train.activation_checkpointing=false"]
CASES = {
    "1b": {"config": "configs/llama-1b-tp4.yaml", "set": ["parallel.tensor=1"], "world": 1, "checkpoint": True,
           "export": True, "note": "the 1.1B preset on one process"},
    "1b-tp2": {"config": "configs/llama-1b-tp4.yaml", "set": ["parallel.tensor=2"], "world": 2, "checkpoint": True,
               "export": False, "note": "the 1.1B preset on two ranks (tensor 2, gloo); per rank"},
    "1b-offload": {"config": "configs/llama-1b-tp4.yaml", "world": 1, "checkpoint": False, "export": False,
                   "set": ["parallel.tensor=1", "parallel.zero_stage=1", "parallel.offload_optimizer=true"],
                   "note": "the 1.1B preset on one process with ZeRO-Offload (DeepSpeed's CPU Adam)"},
    "13b-block": {"config": "configs/llama-13b.yaml", "set": ["model.n_layers=1", "parallel.tensor=1"], "world": 1,
                  "checkpoint": False, "export": False, "small_vocab": True,
                  "note": "one Llama-2-13B block (n_layers 1)"},
    "70b-block": {"config": "configs/llama-70b.yaml", "set": ["model.n_layers=1", "parallel.tensor=1"], "world": 1,
                  "checkpoint": False, "export": False, "small_vocab": True,
                  "note": "one Llama-2-70B block (n_layers 1)"},
}
DEFAULT_CASES = tuple(CASES)


# ---------------------------------------------------------------------------------------------- one rank
def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Phases:
    """Wall time and peak RSS of each phase of a rank's work; the peak is reset between phases."""

    def __init__(self):
        self.records: dict[str, dict] = {}
        self.baseline_rss = _status_bytes("VmRSS")

    def run(self, name: str, fn):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        except OSError:
            pass
        rss_before = _status_bytes("VmRSS")
        started = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - started
        self.records[name] = {"seconds": seconds, "rss_before_bytes": rss_before,
                              "peak_rss_bytes": _status_bytes("VmHWM"), "rss_after_bytes": _status_bytes("VmRSS")}
        return result


def _rank(spec: dict) -> dict:
    """One rank of one case: every phase, timed, and the measured model state."""
    import torch

    torch.set_num_threads(spec["threads"])
    phases = Phases()
    import torch.distributed as dist

    from sparse_lm.checkpoint.store import load_checkpoint, save_checkpoint
    from sparse_lm.config import load_config
    from sparse_lm.methods.factory import make_schedule
    from sparse_lm.methods.registry import method_of
    from sparse_lm.model import resolve_vocab
    from sparse_lm.model.build import build_model
    from sparse_lm.model.init import init_weights
    from sparse_lm.optim_state import link_partitions
    from sparse_lm.parallel.state import init_distributed, shutdown
    from sparse_lm.train.engine import make_engine, model_parallel_group
    from sparse_lm.train.memory import allocated_peak_bytes, model_state_bytes

    cfg = load_config(spec["config"], spec["overrides"])
    topo = init_distributed(cfg.parallel.tensor, cfg.parallel.pipeline)
    cfg.model = resolve_vocab(cfg.model, cfg.data.vocab_size)
    from sparse_lm.sparsity.kernels import cpu

    # Loading (on a cold cache: compiling) the CPU kernels is a start-up cost of its own, not θ₀'s.
    phases.run("kernels", cpu.ops)
    phases.baseline_rss = _status_bytes("VmRSS")
    model = phases.run("build", lambda: build_model(cfg, initialize=False, topology=topo))
    phases.run("init", lambda: init_weights(model, cfg.train.seed, method_of(cfg.sparsity.method).initializer()))
    engine, optimizer, _ = phases.run("engine", lambda: make_engine(model, cfg, topo))
    gen = torch.Generator().manual_seed(topo.dp_rank)
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.train.seq_len + 1), generator=gen)
    measured: dict = {}
    steps_done = [0]

    def step():
        loss = engine(ids[:, :-1], ids[:, 1:])
        engine.backward(loss)
        if steps_done[0] == 1:  # the second step's boundary: gradients and Adam's moments live
            measured.update(model_state_bytes(engine.module, optimizer))
        engine.step()
        if steps_done[0] == 0 and engine.zero_optimization_stage():
            link_partitions(optimizer)
        steps_done[0] += 1
        return loss.item()

    phases.run("warmup_step", step)
    kept = [phases.run(f"step_{i}", step) for i in range(spec["steps"])]
    allocated = phases.run("allocated_step", lambda: allocated_peak_bytes(step))
    for block in engine.module.layers:  # activation checkpointing, as `build_model` sets it from the config
        block.recompute = True
    phases.run("recompute_warmup_step", step)
    recomputed = [phases.run(f"recompute_step_{i}", step) for i in range(spec["steps"])]
    schedule = make_schedule(engine.module, cfg, group=model_parallel_group(topo))
    reselections = [phases.run(f"reselect_{i}", lambda: schedule.reselect_all(optimizer))
                    for i in range(spec["reselections"])]
    result = {"rank": topo.rank, "tp_rank": topo.tp_rank, "losses": kept + recomputed,
              "model_state": measured, "reselections": reselections, "allocated_step_bytes": allocated,
              "vocab_size": cfg.model.vocab_size,
              "stored_parameters": sum(p.numel() for p in engine.module.parameters())}
    if spec["checkpoint"]:
        root = Path(spec["scratch"]) / "checkpoints"
        config = cfg.to_dict()
        state = {"step": steps_done[0], "samples_seen": 0, "tokens_seen": 0}
        path = phases.run("checkpoint_save", lambda: save_checkpoint(
            root, steps_done[0], engine.module, optimizer, topo, state, config, spec["tokenizer"], keep=1))
        phases.run("checkpoint_load", lambda: load_checkpoint(path, engine.module, optimizer, topo, config=config))
        result["checkpoint_bytes"] = sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())
        result["checkpoint"] = str(path)
        if dist.is_initialized():
            dist.barrier()
    result["phases"] = phases.records
    result["baseline_rss_bytes"] = phases.baseline_rss
    result["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in phases.records.values())
    shutdown()
    return result


def _export(checkpoint: str, scratch: Path) -> dict:
    """`sparse-lm convert export-hf` of the case's checkpoint in its own process (`--export-from`):
    wall time, that process's peak RSS and the export's size."""
    out, record = scratch / "hf", scratch / "export.json"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--export-from", checkpoint, "--export-to", str(out),
                           "--rank-out", str(record)], check=False, capture_output=True, text=True, env=_env())
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"export-hf failed: {proc.stderr.strip()[-2000:]}")
    return {"seconds": seconds, **json.loads(record.read_text()),
            "bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file())}


def _export_process(source: str, out: str) -> dict:
    """What `sparse-lm convert export-hf --from source --to out` runs, with this process's peak RSS
    (its own, where the parent's RUSAGE_CHILDREN would mix in the ranks')."""
    from sparse_lm.checkpoint.convert.export_hf import export_hf

    started = time.perf_counter()
    line = export_hf(source, Path(out))
    return {"export_s": time.perf_counter() - started, "peak_rss_bytes": _status_bytes("VmHWM"), "line": line}


# ---------------------------------------------------------------------------------------------- one case
def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def case_overrides(case: dict, args: argparse.Namespace) -> list[str]:
    overrides = [*COMMON, f"train.seq_len={args.seq_len}", *case["set"], *args.set]
    if case.get("small_vocab"):
        overrides.append(f"data.vocab_size={args.block_vocab}")
    return overrides


def run_case(name: str, case: dict, args: argparse.Namespace) -> dict:
    """The case's ranks, each a fresh process (`--rank-spec`), then the export; the plan beside them."""
    from sparse_lm.config import load_config
    from sparse_lm.plan.cli import plan

    overrides = case_overrides(case, args)
    cfg = load_config(REPO / case["config"], overrides)
    world = case["world"]
    planned = plan(cfg, world)
    scratch = Path(tempfile.mkdtemp(prefix=f"bench_scale_{name}_", dir=args.scratch))
    try:
        spec = {"config": str(REPO / case["config"]), "overrides": overrides, "steps": args.steps,
                "reselections": args.reselections,
                "threads": max(1, args.threads // world), "checkpoint": case["checkpoint"] and not args.no_checkpoint,
                "tokenizer": str(args.tokenizer), "scratch": str(scratch)}
        port = _free_port()
        procs = []
        for rank in range(world):
            out = scratch / f"rank{rank}.json"
            env = _env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_SIZE": str(world),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "OMP_NUM_THREADS": str(spec["threads"])})
            procs.append((subprocess.Popen([sys.executable, __file__, "--rank-spec", json.dumps(spec), "--rank-out",
                                            str(out)], env=env), out))
        for proc, _ in procs:
            if proc.wait(timeout=args.timeout):
                for other, _ in procs:
                    other.kill()
                raise RuntimeError(f"case {name}: a rank exited with {proc.returncode}")
        ranks = [json.loads(out.read_text()) for _, out in procs]
        export = (_export(ranks[0]["checkpoint"], scratch)
                  if case["export"] and spec["checkpoint"] and not args.no_export else None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return summarise(name, case, overrides, planned, ranks, export)


def planned_state(parts: dict) -> int:
    """The plan's model state in the parts `model_state_bytes` measures."""
    return sum(parts[p] for p in MEASURED_PARTS)


def summarise(name: str, case: dict, overrides: list[str], planned: dict, ranks: list[dict],
              export: dict | None) -> dict:
    per_rank = planned["per_rank"]
    plan_state = planned_state(per_rank["parts"])
    # On a CPU the plan's device and host memory are one process's: its total holds both.
    plan_total = {kind: per_rank["model_state_bytes"] + per_rank["host_bytes"] + per_rank["activations_bytes"][kind]
                  + per_rank["parts"]["workspace"]
                  for kind in ("full", "checkpointed")}
    rows = []
    for r in ranks:
        ph = r["phases"]
        kept = [ph[k]["seconds"] for k in ph if k.startswith("step_")]
        recomputed = [ph[k]["seconds"] for k in ph if k.startswith("recompute_step_")]
        measured = r["model_state"]["total"]
        step_peak = max(ph[k]["peak_rss_bytes"] for k in ph if k.startswith("step_"))
        plan_peak = r["baseline_rss_bytes"] + plan_total["full"]
        # DeepSpeed frees the gradients after each step: a step allocates them anew.
        plan_step = (plan_total["full"] - per_rank["model_state_bytes"] - per_rank["host_bytes"]
                     + per_rank["parts"]["gradients"])
        row = {
            "rank": r["rank"],
            "kernels_load_s": ph["kernels"]["seconds"],
            "build_s": ph["build"]["seconds"], "init_s": ph["init"]["seconds"], "engine_s": ph["engine"]["seconds"],
            "build_init_s": ph["build"]["seconds"] + ph["init"]["seconds"],
            "step_s": kept, "recompute_step_s": recomputed,
            "recompute_over_kept": min(recomputed) / min(kept),
            "reselect_s": [ph[k]["seconds"] for k in ph if k.startswith("reselect_")],
            "model_state_bytes": measured, "model_state_parts": r["model_state"],
            "plan_model_state_bytes": plan_state,
            "model_state_over_plan": measured / plan_state,
            "plan_part_ratios": {p: r["model_state"][p] / per_rank["parts"][p]
                                 for p in MEASURED_PARTS if per_rank["parts"][p]},
            "peak_rss_bytes": r["peak_rss_bytes"], "baseline_rss_bytes": r["baseline_rss_bytes"],
            "plan_total_bytes": plan_total["full"], "plan_total_checkpointed_bytes": plan_total["checkpointed"],
            "peak_rss_over_plan_total": r["peak_rss_bytes"] / plan_total["full"],
            "peak_rss_less_baseline_over_plan_total": (r["peak_rss_bytes"] - r["baseline_rss_bytes"])
            / plan_total["full"],
            "step_peak_rss_bytes": step_peak, "plan_peak_bytes": plan_peak,
            "step_peak_over_plan_peak": step_peak / plan_peak,
            "allocated_step_bytes": r["allocated_step_bytes"], "plan_step_bytes": plan_step,
            "allocated_step_over_plan": r["allocated_step_bytes"] / plan_step,
            "phases": ph,
            "losses": r["losses"], "stored_parameters": r["stored_parameters"],
        }
        if "checkpoint_bytes" in r:
            row.update(checkpoint_save_s=ph["checkpoint_save"]["seconds"],
                       checkpoint_load_s=ph["checkpoint_load"]["seconds"], checkpoint_bytes=r["checkpoint_bytes"])
        rows.append(row)
    return {"case": name, "note": case["note"] + (f", vocabulary {ranks[0]['vocab_size']}"
                                                 if case.get("small_vocab") else ""),
            "config": case["config"], "overrides": overrides, "world": case["world"],
            "vocab_size": ranks[0]["vocab_size"],
            "plan": {"model_state_bytes": plan_state, "parts": per_rank["parts"],
                     "activations_bytes": per_rank["activations_bytes"], "total_bytes": plan_total["full"],
                     "total_checkpointed_bytes": plan_total["checkpointed"], "layout": planned["layout"]},
            "ranks": rows, "export": export}


def plan_disagreements(report: dict, tolerance: float = 0.05) -> list[str]:
    """One line per rank whose measured model state is off the plan's by more than `tolerance`."""
    return [f"{case['case']} rank {r['rank']}: model state {r['model_state_bytes']} B measured, "
            f"{r['plan_model_state_bytes']} B planned (ratio {r['model_state_over_plan']:.4f})"
            for case in report["cases"] for r in case["ranks"]
            if abs(r["model_state_over_plan"] - 1) > tolerance]


# ---------------------------------------------------------------------------------------------- report
def environment(threads: int) -> dict:
    import torch

    from bench_step import cpu_model
    from sparse_lm.sparsity.kernels import cpu

    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "compiled_kernels": cpu.ops() is not None, "load_average_at_start": os.getloadavg()}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# The plan checked at scale", "",
        f"`{report['command']}`", "",
        f"{env['cpu']}, {env['cpu_count']} CPUs, {env['threads']} torch thread(s) per process, "
        f"{env['memory_bytes'] / GIB:.0f} GiB, torch {env['torch']}; fp32, one micro-batch of "
        f"{report['config']['seq_len']} tokens, grad_accum 1, each case in fresh processes. Model state: "
        "`model_state_bytes` of the live engine at the second step vs `sparse-lm plan`'s parts for the same "
        "config and layout. Peak RSS: the process's high-water mark over all phases (the baseline is the "
        "process after importing torch, DeepSpeed and megatron-core, before the model); plan total = model state "
        "+ activations (kept) + workspace. Step peak: the high-water mark of a training step "
        "(forward, backward, optimizer step) after the warm-up; plan peak = baseline + plan total.", "",
        "| case | rank | build + init s | step s | recompute step s | recompute / kept | reselect s "
        "| model state GiB | plan GiB | measured / plan | peak RSS GiB | baseline GiB | plan total GiB "
        "| step peak GiB | plan peak GiB | step / plan peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in report["cases"]:
        for r in case["ranks"]:
            lines.append(
                f"| {case['case']} | {r['rank']} | {r['build_init_s']:.1f} | {min(r['step_s']):.2f} "
                f"| {min(r['recompute_step_s']):.2f} | {r['recompute_over_kept']:.2f} | {min(r['reselect_s']):.2f} "
                f"| {r['model_state_bytes'] / GIB:.3f} | {r['plan_model_state_bytes'] / GIB:.3f} "
                f"| {r['model_state_over_plan']:.4f} | {r['peak_rss_bytes'] / GIB:.2f} "
                f"| {r['baseline_rss_bytes'] / GIB:.2f} | {r['plan_total_bytes'] / GIB:.2f} "
                f"| {r['step_peak_rss_bytes'] / GIB:.2f} | {r['plan_peak_bytes'] / GIB:.2f} "
                f"| {r['step_peak_over_plan_peak']:.2f} |")
    lines += ["", "A step's tensors: the most bytes a training step allocates at once above the weights and "
              "Adam's state (the profiler's record of every allocation; DeepSpeed frees the gradients after each "
              "step), vs the plan's total less its model state plus the gradients. Peak RSS adds what the C "
              "allocator keeps of freed memory.", "",
              "| case | rank | step allocates GiB | plan GiB | allocated / plan | step peak RSS / plan peak |",
              "|---|---:|---:|---:|---:|---:|"]
    for case in report["cases"]:
        for r in case["ranks"]:
            lines.append(f"| {case['case']} | {r['rank']} | {r['allocated_step_bytes'] / GIB:.3f} "
                         f"| {r['plan_step_bytes'] / GIB:.3f} | {r['allocated_step_over_plan']:.3f} "
                         f"| {r['step_peak_over_plan_peak']:.2f} |")
    lines += ["", "| case | rank | checkpoint save s | load s | on disk GiB | export-hf s | export peak RSS GiB "
              "| export GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for case in report["cases"]:
        for r in case["ranks"]:
            if "checkpoint_bytes" not in r:
                continue
            ex = case["export"] if r["rank"] == 0 else None
            export = (f"{ex['seconds']:.1f} | {ex['peak_rss_bytes'] / GIB:.2f} | {ex['bytes'] / GIB:.2f}" if ex
                      else "- | - | -")
            lines.append(
                f"| {case['case']} | {r['rank']} | {r['checkpoint_save_s']:.1f} | {r['checkpoint_load_s']:.1f} "
                f"| {r['checkpoint_bytes'] / GIB:.2f} | {export} |")
    lines += ["", "Peak RSS per phase (GiB; the phase's own high-water mark):", "",
              "| case | rank | " + " | ".join(PHASE_COLUMNS) + " |", "|---|---:|" + "---:|" * len(PHASE_COLUMNS)]
    for case in report["cases"]:
        for r in case["ranks"]:
            cells = [f"{r['phases'][p]['peak_rss_bytes'] / GIB:.2f}" if p in r["phases"] else "-"
                     for p in PHASE_COLUMNS]
            lines.append(f"| {case['case']} | {r['rank']} | " + " | ".join(cells) + " |")
    lines += ["", *(f"- {c['case']}: {c['note']}" for c in report["cases"]), "",
              f"Load average at start / end: {env['load_average_at_start'][0]:.2f} / "
              f"{env['load_average_at_end'][0]:.2f}; total {report['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


PHASE_COLUMNS = ("kernels", "build", "init", "engine", "warmup_step", "step_0", "recompute_step_0", "reselect_0",
                 "checkpoint_save", "checkpoint_load")


def main(argv: list[str] | None = None) -> int:
    from bench_step import write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=tuple(CASES), default=DEFAULT_CASES)
    parser.add_argument("--config", help="instead of the cases: one case of this config (tests, other shapes)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1],
                        help="with --config: one case per number of ranks (its parallel.tensor)")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config overrides applied to every case")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1, help="timed steps, each way, after one warm-up step")
    parser.add_argument("--reselections", type=int, default=1, help="timed reselections of every sparse linear")
    parser.add_argument("--block-vocab", type=int, default=1024,
                        help="data.vocab_size of the one-block cases (the embedding would otherwise dominate)")
    parser.add_argument("--tokenizer", default=str(REPO / "data/stdlib/tokenizer.model"),
                        help="a sentencepiece tokenizer.model for the checkpoints and the export")
    parser.add_argument("--no-checkpoint", action="store_true")
    parser.add_argument("--no-export", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads, shared by a case's ranks")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    parser.add_argument("--scratch", default=None, help="directory for checkpoints and exports (default: temp)")
    parser.add_argument("--json", default=str(REPO / "docs/bench/scale.json"))
    parser.add_argument("--markdown", default=str(REPO / "docs/bench/scale.md"))
    parser.add_argument("--rank-spec", help=argparse.SUPPRESS)
    parser.add_argument("--rank-out", help=argparse.SUPPRESS)
    parser.add_argument("--export-from", help=argparse.SUPPRESS)
    parser.add_argument("--export-to", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.export_from:
        Path(args.rank_out).write_text(json.dumps(_export_process(args.export_from, args.export_to)))
        return 0
    if args.rank_spec:
        result = _rank(json.loads(args.rank_spec))
        Path(args.rank_out).write_text(json.dumps(result))
        return 0
    needs_tokenizer = not args.no_checkpoint
    if needs_tokenizer and not Path(args.tokenizer).is_file():
        parser.error(f"--tokenizer {args.tokenizer}: no such file (expected a sentencepiece tokenizer.model; "
                     "or --no-checkpoint)")
    cases = ({f"tp{world}": {"config": args.config, "set": [f"parallel.tensor={world}"], "world": world,
                             "checkpoint": True, "export": world == 1, "note": f"{args.config} on {world} rank(s)"}
              for world in args.worlds} if args.config else {name: CASES[name] for name in args.cases})
    env = environment(args.threads)
    started = time.perf_counter()
    results = []
    for name, case in cases.items():
        results.append(run_case(name, case, args))
        for r in results[-1]["ranks"]:
            print(f"{name} rank {r['rank']}: build+init {r['build_init_s']:.1f} s, step {min(r['step_s']):.2f} s, "
                  f"recompute {min(r['recompute_step_s']):.2f} s, reselect {min(r['reselect_s']):.2f} s, model state "
                  f"{r['model_state_bytes'] / GIB:.3f} GiB vs plan {r['plan_model_state_bytes'] / GIB:.3f} "
                  f"({r['model_state_over_plan']:.4f}), peak RSS {r['peak_rss_bytes'] / GIB:.2f} GiB",
                  file=sys.stderr, flush=True)
    env["load_average_at_end"] = os.getloadavg()
    command = " ".join(["python tools/bench_scale.py", *(sys.argv[1:] if argv is None else argv)])
    report = {"command": command, "config": {k: v for k, v in vars(args).items() if not k.startswith("rank_")},
              "environment": env, "wall_s": time.perf_counter() - started, "cases": results}
    text = markdown(report)
    write_report(report, args.json, args.markdown, text)
    print(text, end="")
    problems = plan_disagreements(report)
    for line in problems:
        print(f"plan disagrees: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
