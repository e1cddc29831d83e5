"""Model-state memory per rank, counted from the tensors that actually exist.

"Model state" is every byte a training rank holds besides activations and transient workspaces:
parameters (the bf16 copy under bf16), gradients (wherever the engine keeps them: `param.grad` or
DeepSpeed's flat gradient buffers), the fp32 master weights DeepSpeed keeps under ZeRO and bf16,
Adam's moments, the sparse layers' indices and A masks, their cached θ₀ block scores, Top-KAST's
offload host store and, under ZeRO-Offload (`parallel.offload_optimizer`), the host buffers its
step works through. It is measured from live tensors, not from formulas — the optimizer wrapper's
attributes are walked, not just `optimizer.state` — so a hidden copy anywhere shows up; tensors
sharing storage (parameters that are views into a flat buffer) are counted once, at the size of
the storage. `sparse_lm.plan` predicts the same parts from shapes alone, and its tests check it
against this count. The dense figure for comparison is what the same shapes occupy as a dense
model trained with fp32 weights, gradients and Adam's two moments.
"""

from __future__ import annotations

import torch
from torch import nn

from sparse_lm.sparsity.storage import SparseLinear

ADAM_DENSE_BYTES_PER_WEIGHT = 4 + 4 + 8  # fp32 weight, gradient, exp_avg and exp_avg_sq
PARTS = ("parameters", "gradients", "master_weights", "optimizer_moments", "indices_masks", "score_caches",
         "offload_host", "offload_buffers", "engine_buffers")
# DeepSpeed's fp32 master partitions: ZeRO-1/2 (`DeepSpeedZeroOptimizer`) and `BF16_Optimizer`.
MASTER_ATTRIBUTES = ("single_partition_of_fp32_groups", "fp32_groups_flat_partition")
# ZeRO-Offload's host buffers (DeepSpeed 0.19, stage 1/2): the partition's training-dtype copy that
# carries updated weights to the device, the staging buffer of gradients and each parameter's
# gradient sum where DeepSpeed accumulates on the host; the fp32 gradient partition is the masters' `.grad`.
OFFLOAD_ATTRIBUTES = ("param_buffer_of_bit16_for_cpu_offload_groups", "temp_grad_buffer_for_cpu_offload",
                      "accumulated_grads_in_cpu")


class _Counter:
    """Bytes per part, each storage counted once (the first part that reaches it)."""

    def __init__(self):
        self.parts = dict.fromkeys(PARTS, 0)
        self.seen: set[int] = set()
        self.walked: set[int] = set()

    def add(self, part: str, tensor) -> None:
        if not torch.is_tensor(tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.seen:
            return
        self.seen.add(key)
        self.parts[part] += storage.nbytes()

    def walk(self, part: str, obj, depth: int = 0) -> None:
        """Every tensor inside lists, tuples and dicts (keys too) under `obj`."""
        if torch.is_tensor(obj):
            self.add(part, obj)
        elif isinstance(obj, (list, tuple, dict)) and depth < 8 and id(obj) not in self.walked:
            self.walked.add(id(obj))
            for item in (list(obj.keys()) + list(obj.values())) if isinstance(obj, dict) else obj:
                self.walk(part, item, depth + 1)


def model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Bytes of each part of the model state held by this rank, and their `total`.

    `optimizer`: what `deepspeed.initialize` returned (a ZeRO or bf16 wrapper, or the torch
    optimizer itself) or a plain torch optimizer."""
    count = _Counter()
    params = list(model.parameters())
    for param in params:
        count.add("parameters", param)
    for param in params:
        count.add("gradients", param.grad)
    for name, buffer in model.named_buffers():
        if _derived(model, name):
            continue
        count.add("offload_host" if name.endswith("complement") else "indices_masks", buffer)
    for module in model.modules():
        if isinstance(module, SparseLinear):
            count.add("score_caches", module._initial_scores)
    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)
        for attribute in MASTER_ATTRIBUTES:
            count.walk("master_weights", getattr(optimizer, attribute, None))
        count.walk("optimizer_moments", dict(inner.state))
        if getattr(optimizer, "cpu_offload", False):
            count.walk("offload_buffers", [flat.grad for flat in optimizer.single_partition_of_fp32_groups])
            for attribute in OFFLOAD_ATTRIBUTES:
                count.walk("offload_buffers", getattr(optimizer, attribute, None))
        for name, value in vars(optimizer).items():  # flat gradient buckets, padding, anything else
            count.walk("gradients" if "grad" in name else "engine_buffers", value)
    parts = dict(count.parts)
    parts["total"] = sum(parts.values())
    return parts


def _derived(model: nn.Module, name: str) -> bool:
    """Non-persistent buffers (rotary tables) are derived caches, not model state."""
    module_name, _, buffer = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return buffer in module._non_persistent_buffers_set


def dense_equivalent_bytes(model: nn.Module) -> int:
    """What this model's weights would occupy dense under Adam (sparse linears counted as their
    full [out, in] shape)."""
    weights = 0
    for module in model.modules():
        if isinstance(module, SparseLinear):
            weights += module.out_features * module.in_features
        else:
            weights += sum(p.numel() for p in module.parameters(recurse=False))
    return weights * ADAM_DENSE_BYTES_PER_WEIGHT


def allocated_peak_bytes(fn) -> int:
    """Most bytes of tensors `fn` holds at once above what was live before it, from the profiler's
    record of every allocation and free: what the plan's transients predict, without the C
    allocator's retention that an RSS high-water mark adds (glibc keeps freed heap pages)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak
