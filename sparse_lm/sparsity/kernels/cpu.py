"""The compiled CPU kernels (`csrc/`), built on first use or absent.

* `block_kernels.cpp` — the in-place block products (`kernels`): B's blocks multiplied where they
  lie in memory, one BLAS call per block on a strips copy of the activations, where the pure-torch
  gathered path has to transpose activations and copy a [b, t] slab per block first (those copies
  were ~40% of a sparse step).
* `element_kernels.cpp` — the in-place element products (b = 1): each stored element moves one row
  of a transposed token tile into sums held in SIMD registers, where the tile path pays a whole
  dense product for any density.
* `counter_hash.cpp` — the integer half of `init.counter_normal_at` (θ₀ regenerated at
  reselection) in one pass instead of ~20 over int64 tensors, bit for bit the same numbers.

torch's JIT extension builder compiles them once per machine and torch version (20–30 s with a C++
compiler and ninja, cached under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions);
concurrent processes wait on its file lock. Where that cannot happen (no compiler, a torch without
BLAS symbols) training still runs, on the pure-torch paths, after one warning.
`SPARSE_LM_COMPILED_KERNELS=0` turns them off.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name("csrc") / name
           for name in ("block_kernels.cpp", "element_kernels.cpp", "counter_hash.cpp")]
SWITCH = "SPARSE_LM_COMPILED_KERNELS"


@functools.cache
def ops():
    """torch.ops.sparse_lm_cpu (`block_product`, `block_sddmm`, `element_product`, `element_sddmm`,
    `counter_uniforms`), or None where unavailable."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        # -fopenmp: at::parallel_for is a header template that runs its loop serially unless the
        # extension itself is built with OpenMP (torch's own build is); the runtime is torch's
        # already-loaded libgomp.
        openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
        load(name="sparse_lm_cpu", sources=[str(s) for s in SOURCES], extra_cflags=["-O3", *openmp],
             extra_ldflags=openmp, is_python_module=False)
        library = torch.ops.sparse_lm_cpu
        if library.available():
            return library
        reason = "this torch build exports no BLAS gemm"
    except Exception as error:  # no compiler or ninja, a failed build: the pure-torch path still works
        lines = str(error).strip().splitlines() or [type(error).__name__]
        reason = next((line.strip() for line in lines if "error:" in line), lines[0])  # a compiler's own line
    warnings.warn(f"sparse_lm: compiled CPU kernels unavailable ({reason}); using the pure-torch paths "
                  f"(slower; {SWITCH}=0 silences this)", stacklevel=2)
    return None


def runs_on(t: torch.Tensor) -> bool:
    """Whether the compiled kernels are built and `t` is on the CPU, where they run."""
    return t.device.type == "cpu" and ops() is not None
