"""The kernel backends and what each takes — device, dtypes, block sizes — declared in one place.

* `cpu`: the compiled C++ kernels (`cpu.py`, `csrc/`), in place, for fp32 and fp64 on the CPU;
  elements (b = 1) and blocks of any size have kernels (the path rules decide where they pay).
* `triton`: the Triton kernels (`triton_kernels.py`), in place, on a CUDA device (or anywhere
  under Triton's interpreter), fp32/fp16/bf16, blocks that `tl.dot` multiplies (powers of two
  ≥ 16), once a start-up probe on a random layout has checked them against float64.
* `torch`: the gathered and tile paths (`gathered.py`, `tiles.py`), pure torch, anything torch runs.

`in_place_ops` picks the in-place backend for a product; the path rules (`paths.py`) decide
whether the in-place path is taken at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_lm.sparsity.kernels import cpu, triton_kernels


@dataclass(frozen=True)
class Backend:
    name: str
    devices: str
    dtypes: tuple[torch.dtype, ...] | None  # None: any
    blocks: str

    def takes_dtype(self, dtype: torch.dtype) -> bool:
        return self.dtypes is None or dtype in self.dtypes


CPU = Backend("cpu", "CPU", (torch.float32, torch.float64), "elements and any block size")
TRITON = Backend("triton", "CUDA, or Triton's interpreter (TRITON_INTERPRET=1)",
                 (torch.float32, torch.float16, torch.bfloat16), "powers of two ≥ 16")
TORCH = Backend("torch", "any", None, "any")
BACKENDS = (CPU, TRITON, TORCH)


def triton_block(block: int) -> bool:
    """Whether `tl.dot` multiplies b × b blocks: a power of two of at least 16."""
    return block >= 16 and block & (block - 1) == 0


def cpu_takes(a: torch.Tensor) -> bool:
    """Whether the compiled CPU kernels take activations like `a` (and are built)."""
    return CPU.takes_dtype(a.dtype) and cpu.runs_on(a)


def triton_takes(a: torch.Tensor, block: int) -> bool:
    """Whether the Triton kernels take activations like `a` for blocks of `block`: the cheap
    checks first (no import of triton for CPU tensors), then the probe (`triton_kernels.works`)."""
    interpreted = triton_kernels.interpreted()
    return ((a.is_cuda or interpreted) and TRITON.takes_dtype(a.dtype) and triton_block(block)
            and triton_kernels.works(a.device, a.dtype, block, interpreted))


def in_place_ops(a: torch.Tensor, block: int):
    """The in-place kernels for activations like `a` and blocks of `block` (an object with
    `block_product` and `block_sddmm`; the CPU one also has the element products), or None."""
    if cpu_takes(a):
        return cpu.ops()
    if block > 1 and triton_takes(a, block):
        return triton_kernels
    return None
