"""Per-parameter optimizer state and master weights, whether or not DeepSpeed partitions them.

Top-KAST's reselection rewrites some slots of a `values` parameter and zeros their Adam moments;
checkpoints read and restore every parameter's moments. With plain fp32 training the DeepSpeed
engine hands back the torch optimizer and the state is `optimizer.state[param]`. Under ZeRO (and
bf16) the fp32 master weights and moments live in flat partitions spread over data-parallel ranks;
DeepSpeed's `safe_get/set_full_fp32_param` and `safe_get/set_full_optimizer_state` map a
parameter to its fragment (`param._hp_mapping`). The getters are collectives over the
data-parallel group, so every rank must call them in the same order (reselection and checkpoint
saving do).
"""

from __future__ import annotations

import torch
from torch import nn

MOMENTS = ("exp_avg", "exp_avg_sq")


def partitioned(param: nn.Parameter) -> bool:
    """True when DeepSpeed keeps this parameter's master copy and state in partitions. The
    attribute exists on every rank, set to None where this rank holds no fragment of it."""
    return hasattr(param, "_hp_mapping")


def get_moment(optimizer, param: nn.Parameter, key: str) -> torch.Tensor:
    """The parameter's full moment `key` (fp32, CPU). Collective under ZeRO."""
    if partitioned(param):
        from deepspeed.utils import safe_get_full_optimizer_state

        value = safe_get_full_optimizer_state(param, key)
    else:
        value = optimizer.state[param][key]
    return value.detach().float().cpu().contiguous()


def ensure_state(optimizer, params: list[nn.Parameter], step: int) -> None:
    """Create Adam's state (zeros, bias-correction step `step`) where torch would create it lazily
    at the first step, so that a resumed run can restore moments before that step.

    Under ZeRO the state belongs to the flat fp32 partitions; DeepSpeed links parameters to their
    fragments of it only after its first step, so the link is made here the same way (the one
    private DeepSpeed call in the project, `_lazy_init_hp_params_optimizer_state`; see also
    `link_partitions`).
    """
    if any(partitioned(p) for p in params):
        inner = optimizer.optimizer
        offloaded = getattr(optimizer, "cpu_offload", False)
        for flat in optimizer.single_partition_of_fp32_groups:
            inner.state[flat] = {"step": step if offloaded else _step(step, flat), "exp_avg": torch.zeros_like(flat),
                                 "exp_avg_sq": torch.zeros_like(flat)}
        optimizer._lazy_init_hp_params_optimizer_state()
        return
    for param in params:
        optimizer.state[param] = {"step": _step(step, param),
                                  **{key: torch.zeros_like(param) for key in MOMENTS}}


def _step(step: int, like: torch.Tensor) -> torch.Tensor:
    """Adam's step count as the fused AdamW keeps it: an fp32 scalar on the parameter's device
    (its kernel takes every state tensor from one device). DeepSpeed's CPU Adam (ZeRO-Offload)
    counts in a Python int instead."""
    return torch.tensor(float(step), dtype=torch.float32, device=like.device)


def link_partitions(optimizer) -> None:
    """Re-link parameters to their ZeRO state fragments after the first optimizer step.

    DeepSpeed 0.19 (stage 1/2) steps the torch optimizer one parameter group at a time and links
    every group's fragments after the *first* group's step, so the second group (our no-decay
    norms) stays linked to an empty state and `safe_get_full_optimizer_state` fails for it. Linking
    again once all groups have state fixes that; a no-op without ZeRO.
    """
    if hasattr(optimizer, "_hp_optimizer_states_linked"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def set_moment(optimizer, param: nn.Parameter, key: str, value: torch.Tensor) -> None:
    """Write the parameter's full moment `key` (each rank stores its own fragment)."""
    if partitioned(param):
        from deepspeed.utils import safe_set_full_optimizer_state

        safe_set_full_optimizer_state(param, value.to(param.device, torch.float32), key)
    else:
        optimizer.state[param][key].copy_(value.to(param.device))


def zero_moments(optimizer, param: nn.Parameter, slots: torch.Tensor) -> None:
    """Zero both moments at `slots` of a parameter (no-op before the optimizer's first step)."""
    if optimizer is None:
        return
    if partitioned(param):
        if not getattr(optimizer, "_hp_optimizer_states_linked", True):
            return  # DeepSpeed has not created the state yet
        for key in MOMENTS:
            full = get_moment(optimizer, param, key)
            full[slots.cpu()] = 0
            set_moment(optimizer, param, key, full)
        return
    state = optimizer.state.get(param, {})
    for key in MOMENTS:
        if key in state:
            state[key][slots] = 0


@torch.no_grad()
def write_slots(param: nn.Parameter, slots: torch.Tensor, values: torch.Tensor) -> None:
    """param[slots] = values, in the model copy and, when DeepSpeed keeps one, the fp32 master
    (which would otherwise overwrite the change at the next step)."""
    param[slots] = values.to(param.dtype)
    if partitioned(param):
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        master = safe_get_full_fp32_param(param)
        master[slots] = values.to(master.device, master.dtype)
        safe_set_full_fp32_param(param, master)
