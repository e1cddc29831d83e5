"""Which path a product takes — the measured crossovers against dense — and the switches tests
and benchmarks use to force or record it."""

from __future__ import annotations

import collections
import contextlib

import torch

from sparse_lm.sparsity.kernels.backends import in_place_ops

# The largest fraction f of a layer's block grid each block path takes, by block size b (the entry
# of the largest size ≤ b applies; smaller blocks take the tiles). Both paths do b multiply-adds
# per number they move, so their cost against the dense tile falls with b and grows with f. Set
# from the crossovers against the tile path in docs/bench/kernels.md (`tools/bench_kernels.py`: a
# 4096×1024 weight, 1024 tokens, 1 CPU thread, forward / input gradient / value gradient; times
# vary by ±15% on a shared machine): in place, b = 16 is level with the tiles at f ≈ 0.6, b = 32
# at ≈ 0.75, b = 64 at ≈ 0.9, while b = 8 is slower than dense from f = 0.1 on (one BLAS call per
# 8×8 block); gathered, b = 8 is level at f ≈ 0.25, b = 16 at ≈ 0.45, b = 32 at ≈ 0.55, b = 64 at
# ≈ 0.6. The limits sit a little below, where the block path is still clearly ahead. Elements in
# place are level with the tiles at f ≈ 0.25 (input and value gradients) to 0.3 (forward).
IN_PLACE_LIMITS = {16: 0.6, 32: 0.7, 64: 0.8}
ELEMENT_IN_PLACE_LIMIT = 0.25
GATHER_LIMITS = {8: 0.2, 16: 0.4, 32: 0.5, 64: 0.55}


def _within(limits: dict, block: int, n_slots: int, n_blocks: int) -> bool:
    sizes = [size for size in limits if size <= block]
    return bool(sizes) and n_slots <= limits[max(sizes)] * n_blocks


def use_in_place(block: int, n_slots: int, n_blocks: int) -> bool:
    """Whether a product over `n_slots` of a layer's `n_blocks` blocks takes the in-place path
    (where in-place kernels can run at all: `in_place_ops`). Elements (b = 1) have kernels
    of their own; blocks of 2–15 have none worth taking (one BLAS call per small block)."""
    if block == 1:
        return n_slots <= ELEMENT_IN_PLACE_LIMIT * n_blocks
    return _within(IN_PLACE_LIMITS, block, n_slots, n_blocks)


def use_blocks(block: int, n_slots: int, n_blocks: int) -> bool:
    """Whether such a product takes the gathered path where the in-place one cannot run."""
    return _within(GATHER_LIMITS, block, n_slots, n_blocks)


PATHS = ("in_place", "gathered", "tiles")
_forced_path: str | None = None


@contextlib.contextmanager
def forced_path(path: str):
    """Every product inside the block takes `path` (one of PATHS), whatever the rules say: for the
    benchmarks and tests that compare the paths on the same numbers."""
    global _forced_path
    if path not in PATHS:
        raise ValueError(f"forced_path: path must be one of {PATHS}, got {path!r}")
    previous, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = previous


_recorders: list[collections.Counter] = []


@contextlib.contextmanager
def recorded_paths():
    """A Counter of (product, path) for every product run inside the block — product one of
    "forward", "input_grad", "value_grad", path one of PATHS — so that a test can assert which
    path its products really took (and fail if a rule change routes them elsewhere). Outside such
    a block recording costs one test of an empty list per product."""
    counts: collections.Counter = collections.Counter()
    _recorders.append(counts)
    try:
        yield counts
    finally:
        _recorders.remove(counts)


def record(product: str, path: str) -> None:
    for counts in _recorders:
        counts[product, path] += 1


def choose_path(a: torch.Tensor, block: int, n_slots: int, n_blocks: int) -> str:
    """One of PATHS: the path of a product over `n_slots` of a layer's `n_blocks` blocks, on
    activations like `a`."""
    if _forced_path is not None:
        if _forced_path == "in_place" and in_place_ops(a, block) is None:
            raise RuntimeError(f"forced_path: no in-place kernels take {a.dtype} on {a.device} with blocks of {block}")
        return _forced_path
    if use_in_place(block, n_slots, n_blocks) and in_place_ops(a, block) is not None:
        return "in_place"
    return "gathered" if use_blocks(block, n_slots, n_blocks) else "tiles"


def element_keys_fit(shape: tuple[int, int], capacity: int) -> bool:
    """Whether the element kernels can pack (row, column, slot) of a layer with `capacity` slots in
    one 64-bit word (their radix sort's; true for any layer below ~2^40 elements)."""
    return sum(max(n - 1, 0).bit_length() for n in (*shape, capacity + 1)) <= 64


def layer_path(a, block: int, n_slots: int, shape: tuple[int, int], capacity: int) -> str:
    """`choose_path` for a product over `n_slots` of a [out, in] layer's blocks; elements of a layer
    too large for the element kernels' keys take the tiles."""
    path = choose_path(a, block, n_slots, (shape[0] // block) * (shape[1] // block))
    if path == "in_place" and block == 1 and not element_keys_fit(shape, capacity):
        return "tiles"
    return path
