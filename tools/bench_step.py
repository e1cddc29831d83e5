"""Training-step time of always-sparse layers against dense ones, and forward time per kernel path.

    python tools/bench_step.py --json docs/bench/step.json --markdown docs/bench/step.md --plot docs/bench/step.png
    python tools/bench_step.py --full ...        # every density × mode × d_model (tens of minutes on 2 cores)
    python tools/bench_step.py --device cuda --dtype bfloat16 --d-models 4096 --modes block32 block64 \
        --densities 1 0.2 0.1 0.05 --tokens 8192 --repeat 10   # a GPU: the Triton kernels (sparsity/triton_kernels.py)

The model is weight-dominated: `--layers` SwiGLU MLP blocks, x + down(silu(gate(x)) · up(x)) with
hidden = `--hidden-mult` · d_model, on `--tokens` tokens. Sparse: every linear is a
`storage.SparseLinear` with density D and exploration M = D (B = the top min(2D, 1) of the
weight); dense: `nn.Linear` of the same shapes. A step is forward, backward of the mean square of
the output, and an AdamW step. Reselection (Top-KAST's re-pick of B and A in every sparse layer,
moments of entering slots zeroed) is timed separately on the same trained model and reported
amortised over an interval of `--reselect-every` steps, as a fraction of the median sparse step
(tools/bench_reselect.py measures the sharded top-k itself across ranks and layer sizes).
Dense and sparse steps alternate in one process, so both see the same machine load (on a GPU each
timing waits for the device to finish); the speedup is dense time / sparse time from the min and
from the median of `--repeat` steps after a warm-up.
The forward-only speedup of one sparse linear (d_model → hidden) is reported beside it, with the
kernel path the rule in `sparsity/kernels.py` picked for it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from sparse_lm.atomic import write_text
from sparse_lm.sparsity import kernels
from sparse_lm.sparsity.kernels import cpu, triton_kernels
from sparse_lm.sparsity.storage import SparseLinear
from sparse_lm.sparsity.topkast import reselect, sparse_layers

DENSITIES = (1.0, 0.5, 0.2, 0.1, 0.05)
MODES = {"element": 1, "block16": 16, "block32": 32, "block64": 64}
D_MODELS = (512, 1024, 2048)
DEFAULT = {"densities": DENSITIES, "modes": ("element", "block16", "block32"), "d_models": (1024,)}


class MLP(nn.Module):
    """x + down(silu(gate(x)) · up(x)), its three linears from `make(name, in, out)`."""

    def __init__(self, d_model: int, hidden: int, make):
        super().__init__()
        self.gate, self.up, self.down = (make("gate", d_model, hidden), make("up", d_model, hidden),
                                         make("down", hidden, d_model))

    def forward(self, x):
        return x + self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def build(d_model: int, hidden: int, layers: int, density: float | None, block: int) -> nn.Module:
    """Dense (density None) or sparse MLP stack; sparse layers pick A and B from θ₀ as training does,
    each layer from its own random stream."""
    torch.manual_seed(0)
    streams = iter(range(1 << 30))

    def make(name, n_in, n_out):
        if density is None:
            return nn.Linear(n_in, n_out, bias=False)
        layer = SparseLinear(name, n_in, n_out, density, density, block, penalty=1e-4)
        layer.initialize(seed=0, stream=next(streams), std=n_in**-0.5)
        return layer

    return nn.Sequential(*(MLP(d_model, hidden, make) for _ in range(layers)))


def step_fn(model: nn.Module, x: torch.Tensor):
    """One training step (forward, backward of the mean square output, AdamW), and its optimizer."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    return step, optimizer


def reselect_seconds(model: nn.Module, optimizer, repeat: int) -> list[float]:
    """Wall time of reselecting every sparse layer of `model`, `repeat` times."""
    layers = sparse_layers(model)
    return [timed(lambda: [reselect(layer, optimizer) for layer in layers]) for _ in range(repeat)]


def timed(fn) -> float:
    """Wall seconds of fn(), including the GPU work it queued."""
    _wait_for_gpu()
    t0 = time.perf_counter()
    fn()
    _wait_for_gpu()
    return time.perf_counter() - t0


def _wait_for_gpu() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def alternate(fns: dict, repeat: int) -> dict:
    """{name: [seconds]}: one warm-up each, then `repeat` rounds running every fn once in turn."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return times


def forward_path(layer: SparseLinear, x: torch.Tensor) -> str:
    """The path `kernels.choose_path` takes for this layer's forward product on x."""
    return kernels.choose_path(x, layer.block, int(layer.forward_mask.sum()), layer.n_blocks)


def measure(d_model: int, mode: str, density: float, args) -> dict:
    hidden, block = args.hidden_mult * d_model, MODES[mode]
    on = {"device": args.device, "dtype": getattr(torch, args.dtype)}
    x = torch.randn(args.tokens, d_model, generator=torch.Generator().manual_seed(1)).to(**on)
    dense = build(d_model, hidden, args.layers, None, block).to(**on)
    sparse = build(d_model, hidden, args.layers, density, block).to(**on)
    (dense_step, _), (sparse_step, sparse_optimizer) = step_fn(dense, x), step_fn(sparse, x)
    steps = alternate({"dense": dense_step, "sparse": sparse_step}, args.repeat)
    reselects = reselect_seconds(sparse, sparse_optimizer, args.repeat)
    dense_linear, sparse_linear = dense[0].up, sparse[0].up
    with torch.no_grad():
        forwards = alternate({"dense": lambda: dense_linear(x), "sparse": lambda: sparse_linear(x)}, args.repeat)
    result = {"d_model": d_model, "hidden": hidden, "mode": mode, "block": block, "density": density,
              "exploration": density, "forward_path": forward_path(sparse_linear, x),
              "sparse_fraction_of_dense_params": sum(p.numel() for p in sparse.parameters())
              / sum(p.numel() for p in dense.parameters())}
    for what, times in (("step", steps), ("forward", forwards)):
        for name in ("dense", "sparse"):
            result[f"{what}_{name}_s"] = times[name]
        result[f"{what}_speedup_min"] = min(times["dense"]) / min(times["sparse"])
        result[f"{what}_speedup_median"] = statistics.median(times["dense"]) / statistics.median(times["sparse"])
    result["reselect_s"] = reselects
    result["reselect_every"] = args.reselect_every
    result["reselect_amortised_fraction"] = (statistics.median(reselects)
                                             / (args.reselect_every * statistics.median(steps["sparse"])))
    return result


def write_report(report: dict, json_path: str | None, markdown_path: str | None, markdown_text: str) -> None:
    """A benchmark's report as JSON and its table as Markdown, each only where a path is given,
    written atomically into a folder created for it."""
    for path, content in ((json_path, json.dumps(report, indent=2) + "\n"), (markdown_path, markdown_text)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write_text(path, content)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(threads: int, device: str, dtype: str) -> dict:
    env = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads, "torch": torch.__version__,
           "python": platform.python_version(), "platform": platform.platform(), "device": device, "dtype": dtype,
           "load_average_at_start": os.getloadavg(),
           "compiled_kernels": cpu.ops() is not None,
           "rule": {"in_place_limits": kernels.IN_PLACE_LIMITS, "gather_limits": kernels.GATHER_LIMITS}}
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["triton"] = triton_kernels.version()
    return env


def markdown(report: dict) -> str:
    env, cfg = report["environment"], report["config"]
    lines = [
        "# Training-step time: always-sparse against dense",
        "",
        f"`{report['command']}`",
        "",
        f"{env['cpu']}, {env['cpu_count']} CPUs, {env['threads']} torch thread(s), torch {env['torch']}"
        + (f"; {env['gpu']}, Triton {env['triton']}" if "gpu" in env else "") + f"; {env['dtype']}. "
        f"{cfg['layers']} SwiGLU MLP blocks (hidden = {cfg['hidden_mult']}·d_model), {cfg['tokens']} tokens, "
        f"AdamW; exploration M = D. Speedup = dense time / sparse time over {cfg['repeat']} alternating steps "
        f"after a warm-up (min / median). Forward: one d_model → hidden linear alone, with the kernel path used. "
        f"Compiled CPU block kernels: {'built' if env['compiled_kernels'] else 'unavailable (pure-torch paths)'}.",
        "",
        f"Reselection: all sparse layers re-pick B and A (median of {cfg['repeat']}), amortised over "
        f"{cfg['reselect_every']} steps as a fraction of the median sparse step.",
        "",
        "| d_model | mode | D | step dense s (min) | step sparse s (min) | step speedup min | median "
        "| forward speedup min | median | forward path | reselect s | amortised |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['d_model']} | {r['mode']} | {r['density']:g} | {min(r['step_dense_s']):.3f} "
            f"| {min(r['step_sparse_s']):.3f} "
            f"| {r['step_speedup_min']:.2f} | {r['step_speedup_median']:.2f} | {r['forward_speedup_min']:.2f} "
            f"| {r['forward_speedup_median']:.2f} | {r['forward_path']} | {statistics.median(r['reselect_s']):.3f} "
            f"| {r['reselect_amortised_fraction']:.2%} |")
    lines += ["", f"Load average at start / end: {env['load_average_at_start'][0]:.2f} / "
              f"{env['load_average_at_end'][0]:.2f} (other work on the machine makes times noisier)."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d_models = sorted({r["d_model"] for r in report["results"]})
    fig, axes = plt.subplots(1, len(d_models), figsize=(5 * len(d_models), 4), squeeze=False)
    for ax, d in zip(axes[0], d_models):
        for mode in MODES:
            rows = sorted((r["density"], r["step_speedup_median"]) for r in report["results"]
                          if r["d_model"] == d and r["mode"] == mode)
            if rows:
                ax.plot(*zip(*rows), marker="o", label=mode)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set(xscale="log", xlabel="density D", ylabel="step speedup (dense / sparse, median)", title=f"d_model {d}")
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", type=float, nargs="+", default=DEFAULT["densities"])
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=DEFAULT["modes"])
    parser.add_argument("--d-models", type=int, nargs="+", default=DEFAULT["d_models"])
    parser.add_argument("--full", action="store_true", help=f"every d_model of {D_MODELS} (overrides --d-models)")
    parser.add_argument("--hidden-mult", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3, help="timed steps per variant, after one warm-up")
    parser.add_argument("--reselect-every", type=int, default=100, help="interval the reselection is amortised over")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the Triton kernels on a GPU")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="of the weights, activations and optimizer (both models alike)")
    parser.add_argument("--json", help="write the raw numbers here")
    parser.add_argument("--markdown", help="write the table here (it is also printed)")
    parser.add_argument("--plot",
                        help="write a PNG of step speedup against density (needs matplotlib: the bench extra)")
    args = parser.parse_args(argv)
    if args.full:
        args.d_models = list(D_MODELS)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no CUDA GPU")
    torch.set_num_threads(args.threads)
    env = environment(args.threads, args.device, args.dtype)
    results = []
    for d_model in args.d_models:
        for mode in args.modes:
            for density in args.densities:
                results.append(measure(d_model, mode, density, args))
                r = results[-1]
                print(f"d_model {d_model} {mode} D={density:g}: step speedup {r['step_speedup_median']:.2f}, "
                      f"forward {r['forward_speedup_median']:.2f} ({r['forward_path']}), reselection "
                      f"{r['reselect_amortised_fraction']:.2%} of a step at every {args.reselect_every}",
                      file=sys.stderr, flush=True)
    env["load_average_at_end"] = os.getloadavg()
    command = " ".join(["python tools/bench_step.py", *(sys.argv[1:] if argv is None else argv)])
    report = {"command": command, "config": vars(args), "environment": env, "results": results}
    text = markdown(report)
    write_report(report, args.json, args.markdown, text)
    if args.plot:
        plot(report, args.plot)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
