"""`sparse-lm plan`: will this run fit? Memory per rank and FLOPs per token, sparse against dense,
from the config's shapes alone (seconds, whatever the model size)."""

from __future__ import annotations

import argparse
import dataclasses
import math

from sparse_lm.atomic import check_writable, write_json
from sparse_lm.config import RunConfig, load_config
from sparse_lm.errors import UserError
from sparse_lm.methods.registry import method_of
from sparse_lm.plan.flops import plan_flops
from sparse_lm.plan.memory import (
    CPU_ADAM_SECONDS_PER_WEIGHT,
    STATE_PARTS,
    Layout,
    dense_of,
    layout_of,
    plan_memory,
)
from sparse_lm.plan.presets import LLAMA_FAMILY
from sparse_lm.plan.vocab import resolve

GIB = 2**30


def plan(cfg: RunConfig, world: int | None = None, gpu_memory_gib: float | None = None,
         host_memory_gib: float | None = None) -> dict:
    """The report `sparse-lm plan` prints and writes (see docs/guide/plan.md for its keys)."""
    cfg, vocabulary = resolve(cfg)
    layout = layout_of(cfg, world)
    sparse, dense = plan_memory(cfg, layout), plan_memory(dense_of(cfg), layout)
    report = {
        "layout": {**dataclasses.asdict(layout), "world": layout.tensor * layout.pipeline * layout.data},
        "model": dataclasses.asdict(cfg.model),
        "vocabulary": vocabulary,
        "gpu_kernels": gpu_kernels(cfg),
        "sparsity": {k: getattr(cfg.sparsity, k)
                     for k in ("method", "density", "exploration", "granularity", "block_size")},
        "tokens_per_micro_batch": cfg.train.micro_batch * cfg.train.seq_len,
        "per_rank": sparse["per_rank"],
        "stages": sparse["stages"],
        "dense": dense["per_rank"],
        "dense_stages": dense["stages"],
        "flops_per_token": plan_flops(cfg),
    }
    if gpu_memory_gib is not None:
        limits = (gpu_memory_gib * GIB, math.inf if host_memory_gib is None else host_memory_gib * GIB)
        report["gpu_memory_bytes"] = int(limits[0])
        if host_memory_gib is not None:
            report["host_memory_bytes"] = int(limits[1])
        report["fits"] = fits(sparse["per_rank"], limits)
        report["dense_fits"] = fits(dense["per_rank"], limits)
        report["largest_fitting"] = largest_fitting(cfg, layout, limits)
        if host_memory_gib is not None and not layout.offload:
            offloaded = dataclasses.replace(layout, zero_stage=1, offload=True)
            report["largest_fitting_offload"] = largest_fitting(cfg, offloaded, limits)
    return report


def gpu_kernels(cfg: RunConfig) -> str:
    """What a sparse linear's products run on a GPU today (the path rules of sparsity/kernels/ with
    its Triton kernels): element mode has no GPU kernel and computes densely."""
    s = cfg.sparsity
    if not method_of(s.method).sparse:
        return "dense: cuBLAS matrix products"
    if s.granularity == "element":
        return ("element mode runs the dense tile path (each product computed densely, tile by tile of the "
                "layer): dense compute, no sparse speedup; there is no Triton element kernel yet")
    b = s.block_size
    if b >= 16 and b & (b - 1) == 0:
        return (f"{b}x{b} blocks run the Triton block kernels where few enough are used (sparsity/kernels/), "
                "else dense tiles")
    return f"{b}x{b} blocks run gathered blocks or dense tiles (the Triton kernels need b a power of two >= 16)"


def fits(rank: dict, limits: tuple[float, float]) -> bool:
    """Whether a rank's device total fits the GPU and its host parts the host (per GPU: a host
    serving several GPUs needs this for each)."""
    return rank["total_bytes"] <= limits[0] and rank["host_bytes"] <= limits[1]


def family_member(cfg: RunConfig, shape: dict) -> RunConfig | None:
    """`cfg` with its model shape replaced by a family member's, or None where the run's layout or
    block size cannot hold that shape."""
    try:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **shape)).validate()
    except UserError:
        return None


def largest_fitting(cfg: RunConfig, layout: Layout, limits: tuple[float, float]) -> dict:
    """The largest family member that fits `limits` (device, host bytes per rank), sparse and
    dense, with this run's layout, sparsity and batch, and every member's totals."""
    members, best = {}, {"sparse": None, "dense": None}
    for name, shape in LLAMA_FAMILY.items():
        member = family_member(cfg, shape)
        if member is None:
            members[name] = None
            continue
        ranks = {"sparse": plan_memory(member, layout)["per_rank"],
                 "dense": plan_memory(dense_of(member), layout)["per_rank"]}
        members[name] = {kind: rank["total_bytes"] for kind, rank in ranks.items()}
        members[name].update({f"{kind}_host": rank["host_bytes"] for kind, rank in ranks.items()})
        for kind, rank in ranks.items():
            if fits(rank, limits):
                best[kind] = name
    return {**best, "members": members}


def _gib(n: float) -> str:
    return f"{n / GIB:9.2f}"


def format_report(report: dict) -> str:
    """The table for people: per part, sparse against dense, of the fullest rank."""
    sparse, dense, flops = report["per_rank"], report["dense"], report["flops_per_token"]
    lay = Layout(**{k: v for k, v in report["layout"].items() if k != "world"})
    lines = [f"layout: {lay.describe()}; {report['tokens_per_micro_batch']} tokens per micro-batch",
             f"vocabulary: {report['vocabulary']['size']} from {report['vocabulary']['note']}",
             f"on a GPU: {report['gpu_kernels']}",
             f"fullest rank: stage {sparse['stage']} (sparse), stage {dense['stage']} (dense)",
             f"{'GiB per rank':<34}{'sparse':>9}  {'dense':>9}"]
    device_parts = [p for p in (*STATE_PARTS, "activations", "workspace") if p not in lay.host_parts]
    for part in device_parts:
        lines.append(f"  {part:<32}{_gib(sparse['parts'][part])}  {_gib(dense['parts'][part])}")
    lines.append(f"  {'model state (device)':<32}{_gib(sparse['model_state_bytes'])}  "
                 f"{_gib(dense['model_state_bytes'])}")
    lines.append(f"  {'total on the device':<32}{_gib(sparse['total_bytes'])}  {_gib(dense['total_bytes'])}")
    for part in lay.host_parts:
        lines.append(f"  {part + ' (host memory)':<32}{_gib(sparse['parts'][part])}  {_gib(dense['parts'][part])}")
    lines.append(f"  {'total in host memory':<32}{_gib(sparse['host_bytes'])}  {_gib(dense['host_bytes'])}")
    for kind in ("checkpointed", "full"):
        lines.append(f"  {'activations, ' + kind:<32}{_gib(sparse['activations_bytes'][kind])}  "
                     f"{_gib(dense['activations_bytes'][kind])}")
    lines.append(f"  {'  of which kernel workspace':<32}{_gib(sparse['kernel_workspace_bytes'])}  "
                 f"{_gib(dense['kernel_workspace_bytes'])}")
    lines.append(f"forward FLOPs per token: sparse {flops['sparse'] / 1e9:.3f} G, dense {flops['dense'] / 1e9:.3f} G "
                 f"(ratio {flops['ratio']:.3f})")
    train = flops["training"]
    lines.append(f"training FLOPs per token: sparse {train['sparse'] / 1e9:.3f} G, dense {train['dense'] / 1e9:.3f} G "
                 f"(ratio {train['ratio']:.3f})")
    if report["layout"]["pipeline"] > 1:
        stages = " / ".join(f"{s['total_bytes'] / GIB:.1f}" for s in report["stages"])
        lines.append(f"stages: GiB per rank {stages}; slowest stage over the mean: sparse "
                     f"{flops['sparse_stage_imbalance']:.3f}, dense {flops['dense_stage_imbalance']:.3f}")
    if lay.offload:
        step = sparse["offload"]
        lines.append(f"optimizer offload per step: {step['device_to_host_bytes'] / GIB:.2f} GiB of gradients to the "
                     f"host, {step['host_to_device_bytes'] / GIB:.2f} GiB of weights back, CPU Adam "
                     f"~{step['cpu_adam_seconds']:.1f} s (at {CPU_ADAM_SECONDS_PER_WEIGHT * 1e9:.2f} ns per weight)")
    if "fits" in report:
        limit = f"{report['gpu_memory_bytes'] / GIB:g} GiB per GPU"
        if "host_memory_bytes" in report:
            limit += f" and {report['host_memory_bytes'] / GIB:g} GiB of host memory"
        lines.append(f"fits {limit}: sparse {'yes' if report['fits'] else 'no'}, "
                     f"dense {'yes' if report['dense_fits'] else 'no'}")
        for key, what in (("largest_fitting", "this layout"), ("largest_fitting_offload", "it with optimizer offload")):
            if key in report:
                best = report[key]
                lines.append(f"largest Llama that fits {what}: sparse {best['sparse'] or 'none'}, "
                             f"dense {best['dense'] or 'none'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    for flag, value in (("--gpu-memory-gib", args.gpu_memory_gib), ("--host-memory-gib", args.host_memory_gib)):
        if value is not None and not value > 0:
            raise UserError(f"{flag} {value}: expected a positive number of GiB")
    if args.host_memory_gib is not None and args.gpu_memory_gib is None:
        raise UserError("--host-memory-gib: expected --gpu-memory-gib too (the host is sized beside a GPU)")
    if args.json:
        check_writable(args.json, "--json", is_file=True)
    report = plan(load_config(args.config, args.overrides), args.world, args.gpu_memory_gib, args.host_memory_gib)
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("plan", help="memory per rank and FLOPs per token of a config, sparse vs dense")
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/llama-13b.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="extend", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
        help="override config fields, e.g. --set train.micro_batch=2 (repeatable)",
    )
    parser.add_argument("--world", type=int, default=None,
                        help="number of GPUs (default: parallel.tensor × parallel.pipeline, one data-parallel replica)")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="memory of one GPU: say whether each rank fits, and the largest Llama that does")
    parser.add_argument("--host-memory-gib", type=float, default=None,
                        help="host memory per GPU: count it against what stays in host memory (optimizer offload), "
                             "and say the largest Llama that fits with optimizer offload")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.set_defaults(func=run)
