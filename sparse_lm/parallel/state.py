"""Process-group set-up: one call that works under `deepspeed`, `torchrun` and a plain `python`.

DeepSpeed owns the default process group (gloo on CPU, NCCL on CUDA); megatron-core's
`parallel_state` then carves tensor/pipeline/data-parallel groups out of it, so the sparse layers,
the sharded threshold and the DeepSpeed engine all agree on who is a replica of whom.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

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


def _unlink_shm_segment() -> None:
    """Remove this rank's DeepSpeed CPU all-reduce segment from /dev/shm once every rank has mapped it.

    DeepSpeed's CPU communication op creates a 66 MB shared-memory file per rank whenever all
    ranks share one host (a plain single-process run included) and never deletes it: each run
    leaks RAM until the machine runs out. After a barrier every peer has the segment mapped, so
    unlinking the name frees the memory when the last process exits, even after a SIGKILL.
    """
    import torch.distributed as dist

    if os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    with contextlib.suppress(OSError):
        (Path("/dev/shm") / name).unlink()


def data_parallel_size(world: int, tensor: int, pipeline: int) -> int:
    """The number of model replicas `world` ranks hold; a layout that does not fit is refused."""
    if world % (tensor * pipeline):
        raise UserError(
            f"parallel.tensor × parallel.pipeline = {tensor * pipeline} must divide the number of ranks ({world})"
        )
    return world // (tensor * pipeline)


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

    from sparse_lm.parallel.mcore import parallel_state

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if on_cuda else torch.device("cpu")
    if on_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            deepspeed.init_distributed(
                dist_backend="nccl" if on_cuda else "gloo", timeout=timedelta(seconds=timeout_s), verbose=False
            )
        except dist.DistError as exc:  # e.g. a node that never joins the rendezvous
            first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"rank {os.environ.get('RANK')}: could not form the process group with "
                f"{os.environ.get('WORLD_SIZE')} ranks at "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                f"within parallel.timeout_s={timeout_s} ({first_line})"
            ) from None
    if not on_cuda:
        _unlink_shm_segment()
    world = dist.get_world_size()
    data = data_parallel_size(world, tensor, pipeline)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(  # its groups (DeepSpeed's data-parallel one too) get the same bound
            tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
            distributed_timeout_minutes=timeout_s / 60,  # used as timedelta(minutes=...): fractions are fine
        )
    return Topology(
        rank=dist.get_rank(),
        world=world,
        tensor=tensor,
        pipeline=pipeline,
        data=data,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
    )


class DeepSpeedMPU:
    """megatron-core's groups in the shape DeepSpeed's engine expects as `mpu`.

    With it the engine all-reduces gradients over the data-parallel group only (not the world),
    and its gradient norm counts every tensor-parallel shard once and every replicated parameter
    once: DeepSpeed sums a parameter on all ranks of the "model-parallel group" when it is marked
    tensor-parallel and only where "model-parallel rank" is 0 otherwise, so the rank reported here
    is the tensor-parallel rank while the group is megatron's whole model-parallel group (TP × PP,
    whose stages hold different parameters).
    """

    _SAME_AS_MEGATRON = (  # passed through unchanged; anything else DeepSpeed probes for is absent
        "get_model_parallel_group",
        "get_tensor_model_parallel_group", "get_tensor_model_parallel_rank",
        "get_tensor_model_parallel_world_size", "get_tensor_model_parallel_src_rank",
        "get_pipeline_model_parallel_group", "get_pipeline_model_parallel_rank",
        "get_pipeline_model_parallel_world_size",
        "get_data_parallel_group", "get_data_parallel_rank", "get_data_parallel_world_size",
    )

    def __getattr__(self, name: str):
        if name not in self._SAME_AS_MEGATRON:
            raise AttributeError(name)
        from sparse_lm.parallel.mcore import parallel_state

        return getattr(parallel_state, name)

    def get_model_parallel_rank(self) -> int:
        from sparse_lm.parallel.mcore import parallel_state

        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        from sparse_lm.parallel.mcore import parallel_state

        return (parallel_state.get_tensor_model_parallel_world_size()
                * parallel_state.get_pipeline_model_parallel_world_size())


def shutdown() -> None:
    """Tear down groups; without it a `deepspeed`-launched rank may abort at exit (docs/design/parallel.md)."""
    import torch.distributed as dist

    from sparse_lm.parallel.mcore import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
