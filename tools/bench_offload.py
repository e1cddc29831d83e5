"""What ZeRO-Offload's optimizer step costs: DeepSpeed's CPU Adam per stored weight, beside torch's
fused AdamW on the same CPU, and what that means for a step of the offload presets.

    TORCH_EXTENSIONS_DIR=~/.cache/torch_extensions python tools/bench_offload.py \\
        --json docs/bench/offload.json --markdown docs/bench/offload.md

One flat fp32 partition of `--weights` elements with a random gradient, stepped `--repeats` times
after a warm-up step (the first CPU Adam use JIT-builds its op, about a minute); the median step
over the weights is the figure `sparse_lm.plan.memory.CPU_ADAM_SECONDS_PER_WEIGHT` holds. Run it
on a quiet machine: both optimizers use every thread torch has (`--threads`, default all cores),
and anything else running on them shows up in the figure. The presets' lines multiply it by the
weights of their partitions (`sparse-lm plan`), beside the GPU time the plan's training FLOPs
imply at an assumed `--gpu-tflops` (the offloaded step does not overlap the GPU's work).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tools"), str(REPO)]  # this checkout's sparse_lm, not an installed one
from bench_step import cpu_model, write_report  # noqa: E402

PRESETS = ("configs/llama-13b-24gb.yaml", "configs/llama-70b-1gpu.yaml")


def time_steps(optimizer: torch.optim.Optimizer, param: torch.Tensor, repeats: int) -> list[float]:
    """Seconds of each of `repeats` steps after a warm-up step."""
    optimizer.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def measure(weights: int, repeats: int) -> dict:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    results = {}
    gen = torch.Generator().manual_seed(0)
    for name in ("deepspeed_cpu_adam", "torch_fused_adamw"):
        param = torch.nn.Parameter(torch.randn(weights, generator=gen))
        param.grad = torch.randn(weights, generator=gen)
        if name == "deepspeed_cpu_adam":
            optimizer = DeepSpeedCPUAdam([param], lr=1e-4, weight_decay=0.1, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW([param], lr=1e-4, weight_decay=0.1, fused=True)
        times = time_steps(optimizer, param, repeats)
        median = statistics.median(times)
        results[name] = {"step_seconds": times, "median_seconds": median, "seconds_per_weight": median / weights}
        del optimizer, param
    return results


def presets(seconds_per_weight: float, gpu_tflops: float) -> dict:
    """Per offload preset: its partition's weights, the CPU Adam's seconds per step at the measured
    rate, the step's host↔device traffic, and the GPU seconds per step its training FLOPs imply."""
    from sparse_lm.config import load_config
    from sparse_lm.plan.cli import plan

    out = {}
    for path in PRESETS:
        cfg = load_config(REPO / path, [])
        report = plan(cfg)
        step = report["per_rank"]["offload"]
        weights = step["device_to_host_bytes"] // 4  # the partition's gradients travel in fp32
        tokens = cfg.train.micro_batch * cfg.train.grad_accum * cfg.train.seq_len
        out[path] = {"partition_weights": weights, "cpu_adam_seconds": weights * seconds_per_weight,
                     "device_to_host_bytes": step["device_to_host_bytes"],
                     "host_to_device_bytes": step["host_to_device_bytes"], "tokens_per_step": tokens,
                     "gpu_seconds_at_assumed_tflops": report["flops_per_token"]["training"]["sparse"] * tokens
                     / (gpu_tflops * 1e12)}
    return out


def environment(threads: int) -> dict:
    import deepspeed

    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def markdown(report: dict) -> str:
    env, args = report["environment"], report["args"]
    lines = ["# ZeRO-Offload's optimizer step", "", f"`{report['command']}`", "",
             f"{env['cpu']}, {env['cpu_count']} CPUs, {env['threads']} thread(s), load average "
             f"{env['load_average']}, torch {env['torch']}, DeepSpeed {env['deepspeed']}; one fp32 partition of "
             f"{args['weights']:,} weights, median of {args['repeats']} steps.", "",
             "| optimizer | median step s | ns per weight |", "|---|---|---|"]
    for name, r in report["optimizers"].items():
        lines.append(f"| {name} | {r['median_seconds']:.3f} | {r['seconds_per_weight'] * 1e9:.2f} |")
    lines += ["", f"At the CPU Adam's rate, per step of the offload presets (GPU seconds: the plan's training FLOPs "
              f"at an assumed {args['gpu_tflops']:g} TFLOP/s; a plan, not a GPU measurement):", "",
              "| preset | partition weights | CPU Adam s | gradients to host GiB | weights to device GiB "
              "| tokens per step | GPU s at assumed rate |", "|---|---|---|---|---|---|---|"]
    for path, r in report["presets"].items():
        lines.append(f"| `{path}` | {r['partition_weights'] / 1e9:.2f} G | {r['cpu_adam_seconds']:.1f} | "
                     f"{r['device_to_host_bytes'] / 2**30:.1f} | {r['host_to_device_bytes'] / 2**30:.1f} | "
                     f"{r['tokens_per_step']:,} | {r['gpu_seconds_at_assumed_tflops']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=int, default=50_000_000, help="elements of the fp32 partition")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per optimizer")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and OpenMP threads")
    parser.add_argument("--gpu-tflops", type=float, default=400.0,
                        help="assumed sustained GPU throughput for the presets' GPU seconds per step")
    parser.add_argument("--json", default=None, help="write the numbers here")
    parser.add_argument("--markdown", default=None, help="write the table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optimizers = measure(args.weights, args.repeats)
    rate = optimizers["deepspeed_cpu_adam"]["seconds_per_weight"]
    report = {"command": " ".join(["python", "tools/bench_offload.py", *sys.argv[1:]]), "args": vars(args),
              "environment": environment(args.threads), "optimizers": optimizers,
              "presets": presets(rate, args.gpu_tflops)}
    text = markdown(report)
    print(text)
    write_report(report, args.json, args.markdown, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
