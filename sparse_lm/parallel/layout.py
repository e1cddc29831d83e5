"""The model's layout facts, torch-free and in one place: the linears of a Transformer block and
their shapes, and how every weight is split over tensor-parallel ranks (Megatron's layout, HF's
names). Config validation, the model, the parallel layers and the planner all read them here.

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

# The linears inside a Transformer block, in forward order (Hugging Face Llama names), each with the
# block's sub-module that holds it: the one list the model, the sparsity targets and the allocation use.
BLOCK_LINEARS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                 "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
BLOCK_LINEAR_NAMES = tuple(BLOCK_LINEARS)

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")
ROW_PARALLEL = ("o_proj", "down_proj")


def linear_name(layer: int, leaf: str) -> str:
    """The canonical name of block `layer`'s linear `leaf` (e.g. layers.0.self_attn.q_proj)."""
    return f"layers.{layer}.{BLOCK_LINEARS[leaf]}.{leaf}"


def block_linear_shapes(m) -> dict[str, tuple[int, int]]:
    """[rows (out), cols (in)] of each linear of a Transformer block of model config `m`, by name."""
    kv = m.n_kv_heads * m.head_dim
    return {"q_proj": (m.d_model, m.d_model), "k_proj": (kv, m.d_model), "v_proj": (kv, m.d_model),
            "o_proj": (m.d_model, m.d_model), "gate_proj": (m.ffn_hidden, m.d_model),
            "up_proj": (m.ffn_hidden, m.d_model), "down_proj": (m.d_model, m.ffn_hidden)}


def shard_shape(leaf: str, rows: int, cols: int, tensor: int) -> tuple[int, int]:
    """One tensor-parallel rank's [rows, cols] of a [rows, cols] weight named `leaf`: rows split for
    column-parallel weights, columns for row-parallel ones, whole when replicated."""
    dim = partition_dim(leaf)
    if dim == 0:
        return rows // tensor, cols
    if dim == 1:
        return rows, cols // tensor
    return rows, cols


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
