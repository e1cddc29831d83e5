"""The optimizer step's gate: global gradient norm, skip on non-finite, clip — for ZeRO stage 0.

DeepSpeed's own fp32 clipping discards the norm it computes and steps whatever it is given, and
the pipeline engine runs clipping and the step inside `train_batch`, out of the loop's reach. So
with ZeRO-0 the engine's clipping is switched off and the torch optimizer's `step` is wrapped
instead: it measures the pre-clipping norm over the whole model (a tensor-parallel shard's
gradient counts on every rank, a replicated parameter's on tensor-parallel rank 0 only; summed
over tensor and pipeline ranks — data-parallel replicas hold identical, already averaged
gradients), skips the update entirely when the norm is not finite (no moment, step-count or
weight-decay change), and otherwise clips like `torch.nn.utils.clip_grad_norm_`. Under ZeRO-1
DeepSpeed does all three itself (it skips overflowing steps) and reports the norm.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

NORM_CHUNK_ELEMENTS = 1 << 20


class GuardedStep:
    """Installs itself as `optimizer.step`; `norm` and `skipped` describe the last call."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, max_norm: float, tp_rank: int,
                 group: dist.ProcessGroup | None):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.counted = [p for p in self.params if tp_rank == 0 or getattr(p, "tensor_model_parallel", False)]
        self.max_norm, self.group = max_norm, group
        self.norm, self.skipped = math.nan, False
        self.on_step: Callable[[], Any] | None = None  # called once, before the next update ...
        self.measured: Any = None  # ... and its result kept here (the loop measures memory so)
        self._step = optimizer.step
        optimizer.step = self.step  # an instance attribute shadows the class's method

    def global_norm(self) -> float:
        """Accumulated in float64 (an fp32 norm of a 32M-element gradient is off by ~0.3%), over
        NORM_CHUNK_ELEMENTS at a time: a float64 copy of a whole gradient and its square would
        add four times the largest gradient's bytes to the step's peak."""
        squares = torch.zeros((), dtype=torch.float64, device=self.params[0].device)
        for param in self.counted:
            if param.grad is not None:
                for chunk in param.grad.detach().reshape(-1).split(NORM_CHUNK_ELEMENTS):
                    squares += torch.linalg.vector_norm(chunk, dtype=torch.float64).square()
        if self.group is not None:
            dist.all_reduce(squares, group=self.group)
        return float(squares.sqrt())

    def step(self, *args, **kwargs):
        if self.on_step is not None:
            self.measured, self.on_step = self.on_step(), None
        self.norm = self.global_norm()
        self.skipped = not math.isfinite(self.norm)
        if self.skipped:
            return None
        if self.max_norm > 0:
            coefficient = self.max_norm / (self.norm + 1e-6)
            if coefficient < 1:
                for param in self.params:
                    if param.grad is not None:
                        param.grad.mul_(coefficient)
        return self._step(*args, **kwargs)
