"""Model-state memory per rank, counted from the tensors that actually exist.

"Model state" is what a training rank must hold besides activations: parameters, their
gradients, the optimizer's tensors and the model's buffers (a sparse layer's indices, A masks and
offload store). It is measured here from live tensors, not from formulas, so a hidden dense copy
anywhere would show up. The dense figure for comparison is what the same shapes occupy as a dense
model trained with the same optimizer: fp32 weights + gradients + Adam's two moments.
"""

from __future__ import annotations

import torch
from torch import nn

from sparse_lm.sparsity.storage import SparseLinear

ADAM_DENSE_BYTES_PER_WEIGHT = 4 + 4 + 8  # fp32 weight, gradient, exp_avg and exp_avg_sq


def _bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Bytes of parameters, gradients, optimizer state and buffers held by this rank."""
    params = list(model.parameters())
    optimizer_bytes = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            optimizer_bytes += sum(_bytes(v) for v in state.values() if torch.is_tensor(v) and v.ndim)
    parts = {
        "parameters": sum(_bytes(p) for p in params),
        "gradients": sum(_bytes(p.grad) for p in params),
        "optimizer": optimizer_bytes,
        "buffers": sum(_bytes(b) for _, b in model.named_buffers() if not _derived(model, _)),
    }
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
