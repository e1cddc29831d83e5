"""Spartan (docs/design/spartan.md) inside Top-KAST's backward set: dual averaging with a hard forward
mask and a soft backward mask over blocks, its schedules, and the allocation of the budget.

B — the candidate blocks — is chosen and re-chosen by magnitude exactly as in Top-KAST (`topkast.
reselect`, sharded), so storage stays always-sparse: only B's values, positions and Adam moments
exist. Within B, each step:

* the forward pass uses the hard selection A = the top-k blocks of B by unit value uⱼ = Σ|θ|/b²
  (k = the layer's current budget), re-picked after every optimizer step;
* the backward pass differentiates w = θ ⊙ m instead, where m = σ(β·u/ū + μ) is Spartan's soft
  top-k over B's blocks (`soft_topk`, budget k, μ found over the tensor-parallel group). The
  straight-through form w = θ⊙m + (θ⊙1_A − θ⊙m).detach() gives the forward value of the hard
  mask and the gradient of the soft one, so blocks of B outside A keep learning (scaled by their
  soft weight) and can enter A, and the magnitudes feel the selection through ∂m/∂u.

u is divided by ū, the mean unit value over the layer's B (a constant per step, all-reduced over
the tensor-parallel group), so that β means the same at any weight scale: the paper's β_target·
√(block elements) then spreads the soft mask over a few blocks' worth of u either way.

Schedules over the run of T steps (progress p = t / (warmup_frac·T), capped at 1):
* budget: k_t = |B| + (budget − |B|)·p, from all of the candidate set down to the allocation's
  share (`allocation`), so training starts dense within B;
* β_t = β_target·b·p;
* from (1 − finetune_frac)·T on, A and B are frozen and the gradient reaches A only.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch import nn

from sparse_lm.config import RunConfig
from sparse_lm.parallel.layers import collective_device, enter_region, leave_region
from sparse_lm.sparsity.allocation import DYNAMIC, reallocate, stage_flops, static_budgets, uniform_budgets
from sparse_lm.sparsity.kernels import SparseMatmul
from sparse_lm.sparsity.soft_topk import soft_topk
from sparse_lm.sparsity.storage import SparseLinear, score_dtype
from sparse_lm.sparsity.topkast import TopKAST


class SpartanLinear(SparseLinear):
    """A `SparseLinear` trained by Spartan's dual averaging; `budget` is its share of A (blocks of
    the whole layer), saved with it. `k_now`, `beta_now`, `u_scale` and `frozen` are set by the
    `Spartan` schedule before every step (functions of the step and the weights, so not saved)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("budget", torch.tensor(self.k_forward, dtype=torch.int64))
        self.k_now, self.beta_now, self.u_scale, self.frozen = self.k_forward, 0.0, 1.0, False

    def select_forward(self, k: int | None = None) -> torch.Tensor:
        return super().select_forward(self.k_now if k is None else k)

    def unit_values(self, slots: torch.Tensor) -> torch.Tensor:
        """uⱼ = Σ|θ| / b² of the blocks in `slots` (differentiable), in fp32 at least, like every
        block score (`storage.block_sums`): in bf16 the soft top-k would see mostly ties."""
        return self.values[slots].to(score_dtype(self.values.dtype)).abs().sum(dim=(1, 2)) / self.block**2

    def soft_mask(self) -> torch.Tensor:
        """Spartan's soft top-k of B's blocks with budget k_now, per slot (0 on unused slots)."""
        slots = torch.nonzero(self.live).view(-1)
        if self.k_now >= self.k_backward:  # the budget is all of B: the mask is 1, with no gradient
            soft = torch.ones(len(slots), dtype=self.values.dtype, device=self.values.device)
        else:
            u = self.unit_values(slots) / self.u_scale
            soft = soft_topk(u, torch.ones_like(u), float(self.k_now), self.beta_now, self.group).to(self.values.dtype)
        return self.values.new_zeros(self.capacity).index_put((slots,), soft)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hard = self.forward_mask.to(self.values.dtype).view(-1, 1, 1)
        if not self.training:
            weights = self.values
        elif self.frozen:
            weights = self.values * hard
        else:
            soft = self.values * self.soft_mask().view(-1, 1, 1)
            weights = soft + (self.values * hard - soft).detach()
        y = SparseMatmul.apply(enter_region(x, self.spec), weights, self.forward_mask, self.index, self.shape,
                               self.block, 0.0, self.density)
        return leave_region(y, self.spec)


def spartan_layers(model: nn.Module) -> list[SpartanLinear]:
    return [m for m in model.modules() if isinstance(m, SpartanLinear)]


class Spartan(TopKAST):
    """The schedule: B reselected by magnitude every `reselect_every` steps (Top-KAST's), the
    budget re-split at the same time for `global`, and after every step the schedules
    advanced and A re-picked — until the finetune phase freezes both."""

    def __init__(self, model: nn.Module, cfg: RunConfig, group=None):
        s = cfg.sparsity
        super().__init__(model, s, cfg.train.steps, group)
        self.layers: list[SpartanLinear] = spartan_layers(model)
        self.run_cfg = cfg
        self.warmup_steps = s.warmup_frac * cfg.train.steps
        self.freeze_at = (1 - s.finetune_frac) * cfg.train.steps
        self.beta = s.beta * s.block  # β_target·√(b²)
        self.dynamic = s.allocation in DYNAMIC
        self.reselects_b = s.candidates == "backward_set"
        self.total = sum(uniform_budgets(cfg).values())

    def progress(self, step: int) -> float:
        return min(1.0, step / self.warmup_steps) if self.warmup_steps else 1.0

    def start(self, step: int) -> None:
        """Before the first step of a run (step 0) apply the allocation and pick A; on resume the
        budgets and A come from the checkpoint and only the per-step values are restored."""
        if step == 0:
            budgets = static_budgets(self.run_cfg)
            for layer in self.layers:
                layer.budget.fill_(budgets[layer.name])
            if self.dynamic:
                reallocate(self.layers, self.total, self.group)
        self._advance(step, repick=step == 0)

    def after_step(self, step: int, optimizer) -> dict | None:
        if step >= self.freeze_at:
            self._advance(step, repick=False)
            return None
        record = None
        if step % self.every == 0 and (self.reselects_b or self.dynamic):  # dense candidates: B is every block
            old_a = [layer.index.long()[layer.forward_mask] for layer in self.layers]
            started = time.perf_counter()
            record = (self.reselect_all(optimizer, pick_forward=False) if self.reselects_b
                      else {"changed_b": 0.0, "capacity_bound_layers": 0})
            if self.dynamic:
                reallocate(self.layers, self.total, self.group)
            self._advance(step, repick=True)
            record["changed_a"] = self._changed_a(old_a)
            record["seconds"] = time.perf_counter() - started
        else:
            self._advance(step, repick=True)
        return record

    def _advance(self, step: int, repick: bool) -> None:
        """Set every layer's k, β, ū and phase for the step after `step`; re-pick A if asked."""
        p = self.progress(step)
        for layer in self.layers:
            layer.k_now = round(layer.k_backward + (int(layer.budget) - layer.k_backward) * p)
            layer.beta_now = self.beta * p
            layer.frozen = step >= self.freeze_at
            if repick:
                layer.forward_mask.copy_(layer.select_forward())
        self._set_unit_scales()

    @torch.no_grad()
    def _set_unit_scales(self) -> None:
        """ū per layer: Σu / |B| over the tensor-parallel group, one all-reduce for all layers."""
        group = next((layer.group for layer in self.layers if layer.group is not None), None)
        sums = torch.zeros(len(self.layers), dtype=torch.float64, device=collective_device(group))
        for i, layer in enumerate(self.layers):
            sums[i] = float(layer.unit_values(torch.nonzero(layer.live).view(-1)).double().sum())
        if group is not None:
            dist.all_reduce(sums, group=group)
        for layer, total in zip(self.layers, sums.tolist()):
            layer.u_scale = total / layer.k_backward if total > 0 else 1.0

    def _changed_a(self, old_a: list[torch.Tensor]) -> float:
        """Fraction of the model's A that is new since `old_a` (counted over the whole group)."""
        counts = torch.zeros(2, dtype=torch.float64, device=collective_device(self.group))
        for layer, old in zip(self.layers, old_a):
            new = layer.index.long()[layer.forward_mask]
            counts += torch.tensor([float((~torch.isin(new, old)).sum()), float(len(new))], dtype=torch.float64,
                                   device=counts.device)
        if self.group is not None:
            dist.all_reduce(counts, group=self.group)
        return float(counts[0] / counts[1]) if counts[1] else math.nan

    def describe(self) -> str:
        """One line for the log: the allocation, and for `pipeline_balanced` the forward FLOPs per
        token of each stage before (uniform) and after it."""
        s = self.run_cfg.sparsity
        line = (f"spartan: allocation {s.allocation}, blocks {s.block}, budget annealed over "
                f"{self.warmup_steps:.0f} steps, frozen from step {self.freeze_at:.0f}, beta {self.beta:g}")
        if s.allocation == "pipeline_balanced":
            before = stage_flops(self.run_cfg, uniform_budgets(self.run_cfg))
            after = stage_flops(self.run_cfg, static_budgets(self.run_cfg))
            line += (f"; forward MFLOP/token per stage {', '.join(f'{f / 1e6:.2f}' for f in before)} (uniform) -> "
                     f"{', '.join(f'{f / 1e6:.2f}' for f in after)}")
        return line
