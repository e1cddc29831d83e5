"""Held-out loss during training: the mean token loss of fixed batches, under any parallel layout."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from sparse_lm.parallel.state import Topology


def data_parallel_sum(values: list[float], device: torch.device) -> list[float]:
    """`values` summed over the data-parallel ranks (unchanged in a one-rank run)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        from sparse_lm.parallel.mcore import parallel_state

        dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
    return tensor.tolist()


@torch.no_grad()
def heldout_loss(engine, batches: list[torch.Tensor], topo: Topology) -> float:
    """Mean token loss over the fixed held-out batches, split over data-parallel ranks (a pipeline
    evaluates all of them on every replica: its `eval_batch` averages over data-parallel ranks)."""
    if topo.pipeline > 1:
        losses = [float(engine.eval_batch(iter([(rows[:, :-1].to(topo.device), rows[:, 1:].to(topo.device))]),
                                          num_micro_batches=1)) for rows in batches]
        engine.train()
        return sum(losses) / len(losses)
    model = engine.module
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for i, rows in enumerate(batches):
        if i % topo.data != topo.dp_rank:
            continue
        rows = rows.to(topo.device)
        n = rows[:, 1:].numel()
        total += float(model(rows[:, :-1], rows[:, 1:])) * n
        count += n
    model.train(was_training)
    total, count = data_parallel_sum([total, count], topo.device)
    return total / count if count else math.nan
