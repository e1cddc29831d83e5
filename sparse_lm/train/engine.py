"""The DeepSpeed engine a run trains with: optimizer, precision, ZeRO stage and gradient clipping."""

from __future__ import annotations

import torch

from sparse_lm.config import RunConfig
from sparse_lm.parallel.state import DeepSpeedMPU, Topology
from sparse_lm.train.guard import GuardedStep
from sparse_lm.train.monitor import deepspeed_monitor_config
from sparse_lm.train.param_groups import param_groups

# DeepSpeed's gradient buckets, in elements: ZeRO-1's reduce bucket (`reduce_bucket_size`) and the
# ZeRO-0 all-reduce's flat copy (`MEMORY_OPT_ALLREDUCE_SIZE`, not configurable).
DEEPSPEED_BUCKET_ELEMENTS = 500_000_000


def reduce_bucket_elements(model: torch.nn.Module) -> int:
    """ZeRO-1's reduce bucket, capped at the rank's trainable elements: DeepSpeed allocates the
    whole bucket at the end of each backward pass, and on a GPU an uncapped one costs its 5e8
    elements (1–2 GB) however small the model. The all-reduce is elementwise, so how gradients are
    grouped into buckets does not change the numbers."""
    return max(1, min(DEEPSPEED_BUCKET_ELEMENTS, sum(p.numel() for p in model.parameters() if p.requires_grad)))


def model_parallel_group(topo: Topology):
    """megatron-core's tensor × pipeline group, or None for a one-rank model."""
    if topo.tensor * topo.pipeline == 1:
        return None
    from sparse_lm.parallel.mcore import parallel_state

    return parallel_state.get_model_parallel_group()


def adamw(groups: list[dict], cfg: RunConfig) -> torch.optim.Optimizer:
    """Under `parallel.offload_optimizer` DeepSpeed's CPU Adam (the only optimizer its ZeRO-Offload
    takes; a C++ op built on first use, like DeepSpeed's other ops: it needs a C++ compiler and
    ninja), in AdamW mode. Otherwise torch's fused AdamW (CPU and CUDA): one kernel updates weights
    and moments in place. The single-tensor AdamW (`foreach=False`) computes `exp_avg_sq.sqrt() /
    bias_correction2_sqrt` and the step as new tensors; under ZeRO its one tensor is the whole flat
    fp32 partition, so the step held two fp32 temporaries of it (21 GiB of a 13B model's 75 on one
    GPU). The update is the same algorithm; the losses agree within float rounding
    (tests/test_optimizer.py)."""
    t = cfg.train
    if cfg.parallel.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=True)


def make_engine(model: torch.nn.Module, cfg: RunConfig, topo: Topology):
    """deepspeed.initialize with `adamw`'s optimizer; returns (engine, optimizer, guard). A
    pipeline stage gets DeepSpeed's PipelineEngine (its topology is the module's); otherwise
    megatron-core's groups are the engine's `mpu`.

    Gradient clipping: with ZeRO-0 `GuardedStep` measures, skips and clips (see `train/guard.py`)
    and DeepSpeed's is off; under ZeRO-1 DeepSpeed clips. It is always written out, because
    DeepSpeed defaults `gradient_clipping` to 1.0 when unset.
    """
    import deepspeed

    t = cfg.train
    bf16 = t.precision == "bf16" or (t.precision == "auto" and topo.device.type == "cuda")
    optimizer = adamw(param_groups(model, cfg), cfg)
    # DeepSpeed's bf16 without ZeRO keeps its fp32 masters apart from the parameters, out of reach
    # of reselection (which rewrites slots) and checkpoints (which save the masters; every save
    # failed); ZeRO-1 links them to each parameter (`optim_state.partitioned`) on one rank as on
    # many, so a bf16 run uses it. A pipeline's bf16 optimizer links them already.
    zero_stage = 1 if bf16 and cfg.parallel.zero_stage == 0 and topo.pipeline == 1 else cfg.parallel.zero_stage
    guard = None
    if zero_stage == 0:
        guard = GuardedStep(optimizer, model, t.grad_clip, topo.tp_rank, model_parallel_group(topo))
    ds_config = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip if guard is None else 0.0,
        "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": reduce_bucket_elements(model),
                              **offload_config(cfg, topo)},
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        **deepspeed_monitor_config(t.monitor),
    }
    extra = {} if topo.pipeline > 1 else {"mpu": DeepSpeedMPU()}
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model.to(topo.device), optimizer=optimizer, config=ds_config, dist_init_required=False, **extra
    )
    if skips_lone_all_reduce(zero_stage, bf16, topo.data):
        skip_lone_all_reduce(engine)
    return engine, optimizer, guard


def offload_config(cfg: RunConfig, topo: Topology) -> dict:
    """ZeRO-Offload's part of DeepSpeed's config: the fp32 partitions in host memory, pinned on a
    GPU machine (page-locked, so the per-step copies run at full PCIe speed)."""
    if not cfg.parallel.offload_optimizer:
        return {}
    return {"offload_optimizer": {"device": "cpu", "pin_memory": topo.device.type == "cuda"}}


def skips_lone_all_reduce(zero_stage: int, bf16: bool, data: int) -> bool:
    """Whether the engine turns off DeepSpeed's gradient all-reduce (`skip_lone_all_reduce`); the
    plan asks the same question of its layout."""
    return zero_stage == 0 and not bf16 and data == 1


def skip_lone_all_reduce(engine) -> None:
    """With one data-parallel replica DeepSpeed still all-reduces the gradients, over a group of
    one, by first flattening them into a copy: 4 bytes per weight at the end of every backward pass
    that change nothing. Without ZeRO nothing else happens in that reduction (ZeRO-1 and the
    pipeline's bf16 optimizer also move gradients into their own buffers there, so they keep it)."""
    if hasattr(engine, "pipeline_enable_backward_allreduce"):
        engine.pipeline_enable_backward_allreduce = False
    else:
        engine.enable_backward_allreduce = False
