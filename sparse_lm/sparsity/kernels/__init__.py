"""Products with a weight held only as B's blocks: forward through A, input gradient through A,
value gradient sampled at B (SDDMM) — without ever forming the dense weight or its gradient.

Each product takes one of three paths, picked by `choose_path` from the block size b and the
fraction of the block grid it covers (`IN_PLACE_LIMITS`, `ELEMENT_IN_PLACE_LIMIT`, `GATHER_LIMITS`):
*in place* (compiled CPU kernels, or Triton on a GPU, that read B's blocks or elements where they
lie), *gathered* (pure torch: activation slabs gathered per block into a reused workspace, one
`bmm`), or *tiles* (the weight scattered one bounded dense tile at a time). The limits are the
measured crossovers against dense. Layout, shared with `storage.SparseLinear`: `index[s]` is the
row-major grid position of slot s's b×b block (b = 1: elements), `values[s]` its numbers; unused
slots (index = number of blocks) take part in no product. How each path works and why:
docs/design/kernels.md.

The package: `layout` (blocks and their positions), `paths` (the rules), `backends` (what each
backend takes, in one place), `cpu` and `triton_kernels` (the in-place backends), `gathered` and
`tiles` (pure torch), `products` (the three products by path), `autograd` (`SparseMatmul`),
`oracle` (the float64 reference and dtype-aware bounds the GPU check and tests use).
"""


from __future__ import annotations

from sparse_lm.sparsity.kernels.autograd import SparseMatmul
from sparse_lm.sparsity.kernels.backends import in_place_ops
from sparse_lm.sparsity.kernels.gathered import GATHER_CHUNK_ELEMENTS, GATHER_TOKENS
from sparse_lm.sparsity.kernels.layout import (
    MAX_TILE_ELEMENTS,
    from_blocks,
    gather_blocks,
    scatter_blocks,
    slots_in_rows,
    to_blocks,
)
from sparse_lm.sparsity.kernels.paths import (
    ELEMENT_IN_PLACE_LIMIT,
    GATHER_LIMITS,
    IN_PLACE_LIMITS,
    PATHS,
    choose_path,
    element_keys_fit,
    forced_path,
    layer_path,
    recorded_paths,
    use_blocks,
    use_in_place,
)

__all__ = ["ELEMENT_IN_PLACE_LIMIT", "GATHER_CHUNK_ELEMENTS", "GATHER_LIMITS", "GATHER_TOKENS", "IN_PLACE_LIMITS",
           "MAX_TILE_ELEMENTS", "PATHS", "SparseMatmul", "choose_path", "element_keys_fit", "forced_path",
           "from_blocks", "gather_blocks", "in_place_ops", "layer_path", "recorded_paths", "scatter_blocks",
           "slots_in_rows", "to_blocks", "use_blocks", "use_in_place"]
