"""Process-group set-up: one call that works under `deepspeed`, `torchrun` and a plain `python`.

DeepSpeed owns the default process group (gloo on CPU, NCCL on CUDA); megatron-core's
`parallel_state` then carves tensor/pipeline/data-parallel groups out of it, so the sparse layers,
the sharded threshold and the DeepSpeed engine all agree on who is a replica of whom.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from sparse_lm.errors import UserError


@dataclass(frozen=True)
class Topology:
    rank: int
    world: int
    tensor: int
    pipeline: int
    data: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_process_env() -> None:
    """A plain `python` / `sparse-lm` run is a world of one; give it the rendezvous env launchers set."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed(tensor: int = 1, pipeline: int = 1, timeout_s: int = 600) -> Topology:
    """Initialise torch.distributed through DeepSpeed and megatron-core's model-parallel groups.

    `timeout_s` bounds every collective, so a dead rank turns into an error instead of a hang.
    """
    import torch.distributed as dist

    on_cuda = torch.cuda.is_available()
    if not on_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _single_process_env()
    import deepspeed
    from megatron.core import parallel_state

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if on_cuda else torch.device("cpu")
    if on_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if on_cuda else "gloo", timeout=timedelta(seconds=timeout_s), verbose=False
        )
    world = dist.get_world_size()
    if world % (tensor * pipeline):
        raise UserError(
            f"parallel.tensor × parallel.pipeline = {tensor * pipeline} must divide the number of ranks ({world})"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(  # its groups get their own timeout (whole minutes)
            tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
            distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
        )
    return Topology(
        rank=dist.get_rank(),
        world=world,
        tensor=tensor,
        pipeline=pipeline,
        data=world // (tensor * pipeline),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
    )


def shutdown() -> None:
    """Tear down groups; without it a `deepspeed`-launched rank may abort at exit (PLATFORM_NOTES)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
