"""Wall time, collective bytes and peak RSS of the sharded exact top-k reselection (docs/design/threshold.md).

    python tools/bench_reselect.py --json docs/bench/reselect.json > docs/bench/reselect.md

Two measurements, a Markdown report on stdout and, with --json, the raw numbers:

* `select_topk_positions` on N non-negative float32 scores (|N(0, 1)|, seeded) split into
  contiguous shards over 1, 2 or 4 real gloo ranks, k = density · N. One rank passes group=None
  (no communication, as a single process does in training). Every collective call the selection
  makes is intercepted in the rank processes to count the bytes of the tensor each rank hands
  over; the count must equal the module's own `bytes_exchanged` and must not change with N —
  that constant is the reason the threshold is computed by histograms instead of a gather.
* `topkast.reselect` of a whole square SparseLinear (D = M = 0.1) in one process: scoring the
  regenerated complement, the exact selection, swapping blocks and re-picking A.

Each configuration runs in fresh processes, because peak RSS only ever grows within one. Before
timing anything, the selection at the smallest N is checked against torch.topk on the gathered
scores, in one process and on every rank count; a mismatch exits non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import platform
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from sparse_lm.sparsity.storage import SparseLinear
from sparse_lm.sparsity.threshold import bytes_exchanged, select_topk_positions
from sparse_lm.sparsity.topkast import reselect
from sparse_lm.train.metrics import peak_rss_bytes

# Scores are generated in blocks of this many elements, each from its own seeded generator, so
# any shard can be produced on its own and the global vector is the same for every rank count.
_SCORE_BLOCK = 1 << 20
# Collectives whose contributed tensor is the argument named `tensor`: all that are counted.
_COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "reduce")
# A layer size runs only if its reselection is predicted to take less, and is not repeated if it did not.
_LAYER_BUDGET_S = 60.0
_MIB = 2**20


# ---------------------------------------------------------------------------- scores and reference
def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s contiguous shard; shards differ in size by at most one."""
    return n * rank // world, n * (rank + 1) // world


def make_scores(seed: int, start: int, stop: int) -> torch.Tensor:
    """Global scores start..stop-1: |N(0, 1)| float32, the same values whichever rank asks."""
    out = torch.empty(stop - start)
    for block in range(start // _SCORE_BLOCK, -(-stop // _SCORE_BLOCK)):
        lo, hi = block * _SCORE_BLOCK, (block + 1) * _SCORE_BLOCK
        values = torch.randn(_SCORE_BLOCK, generator=torch.Generator().manual_seed(seed * 1_000_003 + block))
        a, b = max(lo, start), min(hi, stop)
        out[a - start : b - start] = values[a - lo : b - lo].abs_()
    return out


def topk_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """torch.topk's set as ascending positions, ties at the k-th value broken by lowest index —
    the rule the sharded selection promises (torch.topk's own order among ties is unspecified)."""
    kth = torch.topk(scores, k).values[-1]
    above = torch.nonzero(scores > kth).view(-1)
    ties = torch.nonzero(scores == kth).view(-1)[: k - above.numel()]
    return torch.cat([above, ties]).sort().values


def check_selection(positions: torch.Tensor, scores: torch.Tensor, k: int, what: str) -> None:
    """Raises (not `assert`: that vanishes under python -O) unless `positions` is exactly the top-k."""
    expected = topk_reference(scores, k)
    if not torch.equal(positions, expected):
        raise AssertionError(f"{what}: selection differs from torch.topk on the gathered scores "
                             f"({positions.numel()} selected, {expected.numel()} expected)")


# ---------------------------------------------------------------------------- collectives
@contextlib.contextmanager
def count_collectives():
    """Counts calls to, and bytes of the tensor this rank hands to, torch.distributed collectives
    while active — in this process only (the selection looks `dist.all_reduce` up at call time)."""
    sent = {"bytes": 0, "calls": 0}
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}

    def counted(original):
        signature = inspect.signature(original)

        def call(*args, **kwargs):
            tensor = signature.bind(*args, **kwargs).arguments["tensor"]
            sent["bytes"] += tensor.numel() * tensor.element_size()
            sent["calls"] += 1
            return original(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(dist, name, counted(original))
    try:
        yield sent
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


# ---------------------------------------------------------------------------- processes
def run_processes(fn, world: int, *args) -> list:
    """`fn(rank, world, *args)` in `world` fresh spawned processes, joined in one gloo group when
    world > 1 (a file store: no port to race for); results in rank order. A rank that raises
    makes this raise with its traceback."""
    results_queue = torch_mp.get_context("spawn").Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = torch_mp.start_processes(_process_main, args=(world, store, fn, args, results_queue),
                                         nprocs=world, join=False, start_method="spawn")
        results: dict[int, object] = {}
        done = False
        while not done:
            done = procs.join(timeout=0.1)  # raises if a rank failed
            with contextlib.suppress(queue.Empty):  # drain: a full pipe would block a rank's exit
                while True:
                    rank, result = results_queue.get(timeout=0.05 if done else 0)
                    results[rank] = result
    return [results[rank] for rank in range(world)]


def attempt(fn, world: int, *args) -> list | str:
    """`run_processes`, or why a rank was killed (e.g. by the kernel, out of memory): the
    configuration is reported as failed and the others still run. Exceptions a rank raises, like
    a wrong selection, still propagate."""
    try:
        return run_processes(fn, world, *args)
    except torch_mp.ProcessExitedException as exc:
        return f"killed ({str(exc).strip()}; out of memory?)"


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where there is no such file."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _process_main(rank: int, world: int, store: str, fn, args: tuple, results_queue) -> None:
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results_queue.put((rank, fn(rank, world, *args)))
    if world > 1:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- select_topk_positions
def select_rank(rank: int, world: int, n: int, k: int, cfg: dict) -> dict:
    """One rank of a sharded selection: its times, collective bytes per call and memory."""
    torch.set_num_threads(cfg["threads"])
    start, stop = shard_bounds(n, world, rank)
    scores = make_scores(cfg["seed"], start, stop)
    group = dist.group.WORLD if world > 1 else None
    rss_before = peak_rss_bytes()
    times, sent = [], []
    for _ in range(1 + cfg["repeat"]):  # the first is a warm-up
        if group is not None:
            dist.barrier()  # all ranks start together: a call lasts until its slowest rank is done
        with count_collectives() as counter:
            t0 = time.perf_counter()
            positions = select_topk_positions(scores, k, group, global_offset=start, global_numel=n)
            times.append(time.perf_counter() - t0)
        sent.append(dict(counter))
    peak = peak_rss_bytes()
    return {
        "times_s": times[1:],
        "sent": sent,
        "peak_rss_bytes": peak,
        "select_rss_growth_bytes": peak - rss_before,
        # a list, not a tensor: torch would share a tensor's memory with a process about to exit
        "positions": (positions + start).tolist() if cfg["return_positions"] else None,
    }


def bench_select(n: int, world: int, cfg: dict) -> dict:
    """Runs one (N, ranks) configuration and reduces the ranks' reports to one result."""
    k = round(cfg["density"] * n)
    ranks = attempt(select_rank, world, n, k, cfg)
    if isinstance(ranks, str):
        return {"kind": "select_topk_positions", "n": n, "ranks": world, "k": k, "failed": ranks}
    if cfg["return_positions"]:
        positions = torch.tensor([p for r in ranks for p in r["positions"]], dtype=torch.int64)
        check_selection(positions, make_scores(cfg["seed"], 0, n), k, f"N={n} on {world} rank(s)")
    sent = {(s["bytes"], s["calls"]) for r in ranks for s in r["sent"]}
    if len(sent) != 1:
        raise AssertionError(f"N={n}, {world} ranks: collective bytes differ between ranks or calls: {sent}")
    (measured, calls), = sent
    module = bytes_exchanged(world, tie_break=True)
    if measured != module:
        raise AssertionError(f"N={n}, {world} ranks: measured {measured} B per rank, bytes_exchanged says {module}")
    per_call = [max(ts) for ts in zip(*(r["times_s"] for r in ranks))]  # the slowest rank ends the call
    return {
        "kind": "select_topk_positions",
        "n": n, "ranks": world, "k": k, "shard_numel": -(-n // world), "times_s": per_call,
        "median_s": statistics.median(per_call), "min_s": min(per_call),
        "bytes_per_rank": measured, "bytes_exchanged": module, "collective_calls": calls,
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks),
        "select_rss_growth_bytes": max(r["select_rss_growth_bytes"] for r in ranks),
    }


# ---------------------------------------------------------------------------- whole-layer reselect
def layer_rank(rank: int, world: int, side: int, cfg: dict) -> dict:
    """Builds a side×side SparseLinear and times `reselect` after perturbing B's values, so blocks
    really leave and enter (right after `initialize` the selection would not change at all).
    A layer whose first reselection exceeds _LAYER_BUDGET_S is not repeated: that run is its time."""
    torch.set_num_threads(cfg["threads"])
    rss_before = peak_rss_bytes()
    layer = SparseLinear("bench", side, side, density=0.1, exploration=0.1)
    t0 = time.perf_counter()
    layer.initialize(seed=0, stream=1, std=0.02)
    init_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(cfg["seed"])
    times, changed = [], []
    for _ in range(1 + cfg["repeat"]):  # the first is a warm-up
        with torch.no_grad():
            layer.values.mul_(torch.rand(layer.values.shape, generator=gen) + 0.5)
        t0 = time.perf_counter()
        change = reselect(layer, None)
        times.append(time.perf_counter() - t0)
        changed.append(change.entered_b / layer.k_backward)
        if times[0] > _LAYER_BUDGET_S:
            break
    over_budget = times[0] > _LAYER_BUDGET_S
    timed = slice(None) if over_budget else slice(1, None)
    peak = peak_rss_bytes()
    return {"init_s": init_s, "times_s": times[timed], "changed_b": changed[timed], "over_budget": over_budget,
            "k_backward": layer.k_backward, "peak_rss_bytes": peak, "rss_growth_bytes": peak - rss_before}


def bench_layers(sizes: list[int], cfg: dict) -> list[dict]:
    """Square layers of about each size, smallest first. A size is skipped when the last measured
    one, scaled linearly, predicts more than _LAYER_BUDGET_S per reselection or more memory than
    the machine has available (a 1e8-element layer needs GBs; the kernel would kill it midway)."""
    results, last = [], None
    for n in sorted(sizes):
        side = round(math.sqrt(n))
        entry = {"kind": "layer_reselect", "n": side * side, "shape": [side, side], "ranks": 1}
        skipped = _layer_skip_reason(last, entry["n"])
        if skipped:
            results.append({**entry, "skipped": skipped})
            continue
        r = attempt(layer_rank, 1, side, cfg)
        if isinstance(r, str):
            results.append({**entry, "failed": r})
            continue
        last = {**entry, **r[0], "median_s": statistics.median(r[0]["times_s"]), "min_s": min(r[0]["times_s"])}
        results.append(last)
        print(f"layer {side}x{side}: {last['median_s']:.3f} s", file=sys.stderr)
    return results


def _layer_skip_reason(last: dict | None, n: int) -> str | None:
    """Why a layer of n elements should not run, judged from the last measured size, or None."""
    if last is None:
        return None
    scale = n / last["n"]
    seconds, growth, available = last["median_s"] * scale, last["rss_growth_bytes"] * scale, available_memory_bytes()
    if seconds > _LAYER_BUDGET_S:
        return f"predicted {seconds:.0f} s > {_LAYER_BUDGET_S:.0f} s"
    if available is not None and growth > available:
        return f"predicted {growth / _MIB:,.0f} MiB > {available / _MIB:,.0f} MiB available"
    return None


# ---------------------------------------------------------------------------- report
def environment(threads: int) -> dict:
    """What the timings depend on; the load average shows how busy the machine was."""
    return {
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "threads": threads, "load_average_at_start": os.getloadavg(),
    }


def markdown(report: dict) -> str:
    env, cfg = report["environment"], report["config"]
    lines = [
        "# Sharded exact top-k reselection",
        "",
        f"python {env['python']}, torch {env['torch']}, {env['cpu_count']} CPUs, {env['threads']} thread(s) per "
        f"process, {env['platform']}. "
        f"Times over {cfg['repeat']} runs after one warm-up; ranks are gloo processes on this one machine.",
        "",
        f"## `select_topk_positions`, k = {cfg['density']:g} · N",
        "",
        "Bytes: what each rank hands to collectives per call (a ring all-reduce moves about twice that "
        "over the wire), counted by intercepting them, beside the module's `bytes_exchanged`.",
        "",
        "| N | ranks | shard | median s | min s | bytes / rank / layer | `bytes_exchanged` | collectives "
        "| peak RSS MiB | RSS growth in select MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in _of_kind(report["results"], "select_topk_positions", measured_only=False):
        lines.append(_unmeasured_row([f"{r['n']:,}", str(r["ranks"])], r, 10) if _unmeasured(r) else (
            f"| {r['n']:,} | {r['ranks']} | {r['shard_numel']:,} | {r['median_s']:.4f} | {r['min_s']:.4f} "
            f"| {r['bytes_per_rank']:,} | {r['bytes_exchanged']:,} | {r['collective_calls']} "
            f"| {r['peak_rss_bytes'] / _MIB:.0f} | {r['select_rss_growth_bytes'] / _MIB:.0f} |"))
    selects = _of_kind(report["results"], "select_topk_positions")
    by_ranks = {w: sorted({r["bytes_per_rank"] for r in selects if r["ranks"] == w})
                for w in sorted({r["ranks"] for r in selects})}
    lines += ["", "Bytes per rank per layer, over all N: "
              + "; ".join(f"{w} rank(s): {', '.join(f'{b:,}' for b in bs)} B" for w, bs in by_ranks.items())
              + " — one value per rank count, independent of N."]
    lines += [
        "",
        "## Whole-layer `topkast.reselect` (one process, D = M = 0.1, B perturbed ×U[0.5, 1.5) before each)",
        "",
        "| shape | elements | \\|B\\| | initialize s | median s | min s | B changed | peak RSS MiB | RSS growth MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in _of_kind(report["results"], "layer_reselect", measured_only=False):
        shape = "×".join(map(str, r["shape"]))
        lines.append(_unmeasured_row([shape, f"{r['n']:,}"], r, 9) if _unmeasured(r) else (
            f"| {shape} | {r['n']:,} | {r['k_backward']:,} | {r['init_s']:.3f} "
            f"| {r['median_s']:.3f}{'*' * r['over_budget']} "
            f"| {r['min_s']:.3f} | {statistics.mean(r['changed_b']):.1%} | {r['peak_rss_bytes'] / _MIB:.0f} "
            f"| {r['rss_growth_bytes'] / _MIB:.0f} |"))
    if any(r.get("over_budget") for r in _of_kind(report["results"], "layer_reselect")):
        lines += ["", f"\\* over the {_LAYER_BUDGET_S:.0f} s budget: a single run (the warm-up), not repeated."]
    lines += ["", f"Load average at start / end: {env['load_average_at_start'][0]:.2f} / "
              f"{env['load_average_at_end'][0]:.2f} (other work on this machine makes the times noisier)."]
    return "\n".join(lines) + "\n"


def _unmeasured(result: dict) -> str | None:
    """Why a configuration has no numbers ("skipped: …", "failed: …"), or None."""
    return next((f"{key}: {result[key]}" for key in ("skipped", "failed") if key in result), None)


def _unmeasured_row(cells: list[str], result: dict, columns: int) -> str:
    """A table row: the configuration's first cells, then why it has no numbers."""
    return "| " + " | ".join([*cells, _unmeasured(result)]) + " |" + " |" * (columns - len(cells) - 1)


def _of_kind(results: list[dict], kind: str, measured_only: bool = True) -> list[dict]:
    """Results of one kind, by default only those with numbers."""
    return [r for r in results if r["kind"] == kind and not (measured_only and _unmeasured(r))]


def check_bytes_constant(results: list[dict]) -> None:
    """The point of the histogram select: per-rank traffic is a function of the rank count only."""
    selects = _of_kind(results, "select_topk_positions")
    for world in {r["ranks"] for r in selects}:
        seen = {r["bytes_per_rank"] for r in selects if r["ranks"] == world}
        if len(seen) != 1:
            raise AssertionError(f"{world} ranks: bytes per rank vary with N: {sorted(seen)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 1e7, 1e8],
                        help="layer sizes N in elements (also the whole-layer sizes)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--density", type=float, default=0.2, help="k = density · N")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per configuration, after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-layers", action="store_true", help="skip the whole-layer reselection")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    sizes = sorted(int(n) for n in args.sizes)
    cfg = {"density": args.density, "repeat": args.repeat, "threads": args.threads, "seed": args.seed}

    env = environment(args.threads)
    torch.set_num_threads(args.threads)
    k, scores = round(args.density * sizes[0]), make_scores(args.seed, 0, sizes[0])
    check_selection(select_topk_positions(scores, k), scores, k, f"N={sizes[0]} single process")
    results = []
    for n in sizes:
        for world in args.ranks:
            results.append(bench_select(n, world, {**cfg, "return_positions": n == sizes[0]}))
            print(f"select N={n:,} ranks={world}: {_unmeasured(results[-1]) or results[-1]['median_s']}",
                  file=sys.stderr)
    check_bytes_constant(results)
    if not args.no_layers:
        results += bench_layers(sizes, cfg)

    env["load_average_at_end"] = os.getloadavg()
    report = {"config": {**vars(args), "sizes": sizes}, "environment": env, "results": results}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report), end="")
    failed = [r for r in results if "failed" in r]
    for r in failed:
        print(f"FAILED: {r['kind']} N={r['n']:,} ranks={r['ranks']}: {r['failed']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
