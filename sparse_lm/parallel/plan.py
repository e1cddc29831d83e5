"""What one rank holds of each weight under tensor parallelism, decided once from its `Topology`.

`model.build` derives the plan and hands it to the constructors (the layer factory, the
vocabulary), so the model never asks the process group how it is split: the same code builds a
whole model in a single process, a rank's shard under `deepspeed`, or whole layers in `convert`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sparse_lm.parallel.layout import BLOCK_LINEAR_NAMES, ShardSpec, partition_dim
from sparse_lm.parallel.state import Topology


@dataclass(frozen=True)
class TensorPlan:
    """This rank's ShardSpec of each block linear (by its name in the block: `q_proj`, ...) and of
    the vocabulary (embedding and LM head); none of them when the rank holds whole layers."""

    linears: dict[str, ShardSpec] = field(default_factory=dict)
    vocab: ShardSpec | None = None

    def linear(self, name: str) -> ShardSpec | None:
        """The spec of a block linear by its module name (`layers.3.mlp.up_proj`); None: whole."""
        return self.linears.get(name.rsplit(".", 1)[-1])


def tensor_plan(topology: Topology | None) -> TensorPlan:
    """Megatron's split (`layout`) over the topology's tensor-parallel group; None: one process."""
    if topology is None or topology.tensor == 1:
        return TensorPlan()

    def split(name: str) -> ShardSpec:
        return ShardSpec(partition_dim(name), topology.tp_rank, topology.tensor)

    return TensorPlan({leaf: split(leaf) for leaf in BLOCK_LINEAR_NAMES}, split("embed_tokens"))
