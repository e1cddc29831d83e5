"""How the model's weights are split over tensor-parallel ranks (Megatron's layout, HF's names).

Column-parallel linears (q/k/v, gate/up) and the vocabulary (embedding, LM head) split their
*rows* — the output features — so each rank computes its own heads, FFN columns or vocabulary
slice; row-parallel linears (o, down) split their *columns* and their partial outputs are summed.
Everything else (norms) is replicated. The same table serves model building, the counter-based
initialiser (a shard regenerates its own slice of the global weight) and the gathering of shards
back into whole layers for export and tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")
ROW_PARALLEL = ("o_proj", "down_proj")


def partition_dim(module_name: str) -> int | None:
    """0 (rows split), 1 (columns split) or None (replicated) for a module's weight."""
    leaf = module_name.rsplit(".", 1)[-1]
    if leaf in COLUMN_PARALLEL:
        return 0
    if leaf in ROW_PARALLEL:
        return 1
    return None


@dataclass(frozen=True)
class ShardSpec:
    """This rank's piece of a weight split along `dim` into `size` equal parts."""

    dim: int
    rank: int
    size: int

    def global_shape(self, local: tuple[int, int]) -> tuple[int, int]:
        rows, cols = local
        return (rows * self.size, cols) if self.dim == 0 else (rows, cols * self.size)

    def offset(self, local: tuple[int, int]) -> tuple[int, int]:
        """(first global row, first global column) of this rank's piece."""
        rows, cols = local
        return (self.rank * rows, 0) if self.dim == 0 else (0, self.rank * cols)


def canonical_name(name: str) -> str:
    """A parameter or module name as the single-process model has it: DeepSpeed's pipeline prefixes
    each stage layer's names with its position (`3.layers.2.mlp.up_proj.values`), which is dropped."""
    first, _, rest = name.partition(".")
    return rest if first.isdigit() else name


def local_size(total: int, parts: int, what: str) -> int:
    """`total / parts`, or a one-line error naming what does not divide."""
    from sparse_lm.errors import UserError

    if total % parts:
        raise UserError(f"parallel.tensor={parts} must divide {what} ({total})")
    return total // parts


@functools.lru_cache(maxsize=16)
def _stage_bounds(n_layers: int, pipeline: int) -> tuple[int, ...]:
    from deepspeed.runtime.utils import partition_balanced

    return tuple(int(b) for b in partition_balanced([0] + [1] * n_layers + [0], pipeline))


def stage_of(name: str, n_layers: int, pipeline: int) -> int:
    """The pipeline stage holding a canonical name, as DeepSpeed partitions `model.pipeline`'s
    layers (embedding, n_layers blocks, head; blocks balanced over the stages)."""
    if pipeline == 1:
        return 0
    bounds = _stage_bounds(n_layers, pipeline)
    first = name.split(".", 1)[0]
    position = (0 if first == "embed_tokens" else n_layers + 1 if first in ("norm", "lm_head")
                else 1 + int(name.split(".")[1]))
    return next(stage for stage in range(pipeline) if bounds[stage] <= position < bounds[stage + 1])
