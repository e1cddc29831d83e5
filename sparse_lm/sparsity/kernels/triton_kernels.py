"""The in-place block products on the GPU: Triton kernels with the interface of the compiled CPU
ones (`block_product`, `block_sddmm`, csrc/block_kernels.cpp), so `kernels` picks a backend by
device and nothing else changes.

One program per (token tile, output block-column) sums its blocks' products `tl.dot(x tile,
block)` in fp32 registers and writes its [tile, b] piece of the result once: every block is read
where it lies in B's values, nothing is gathered or scattered, no dense tile exists. The value
gradient at B is one program per slot of B, `tl.dot(gᵀ tile, x tile)` summed over the tokens into
its b × b block. Work is proportional to the number of stored blocks.

`tl.dot` needs b ≥ 16 (a power of two). fp32 activations are multiplied in full fp32
(`input_precision="ieee"`), so results match the dense reference to fp32 rounding; bf16/fp16 ones
take the tensor cores, with fp32 accumulation.

Where no GPU is present, `TRITON_INTERPRET=1` runs the same kernels on CPU tensors in Triton's
interpreter: that is how tests/test_kernels.py checks them against dense matmuls on a CPU-only
machine. Before the kernels first serve a device, dtype and block size they are tried once on a
random layout against float64 (`works`, with `oracle`'s bounds): where this Triton cannot
build or run them (a GPU too old for bf16, say), or they give wrong numbers, the pure-torch gathered
path takes over after one warning instead of the step failing. Speed on a GPU: `tools/gpu_check.sh`
(`tools/bench_step.py --device cuda`) — not yet measured, no GPU having been lent to this project
so far; TOKEN_TILE and the path limits are untuned there.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from sparse_lm.sparsity.kernels import oracle

# Tokens per program. 64 keeps a b = 64 program's fp32 accumulator at 64×64 (16 KiB of registers).
TOKEN_TILE = 64


@functools.cache
def _triton():
    """(triton, triton.language), or None where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def version() -> str | None:
    return _triton()[0].__version__ if _triton() is not None else None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def works(device: torch.device, dtype: torch.dtype, block: int, interpret: bool) -> bool:
    """Whether both kernels build and give the right numbers (once per device, dtype, block size
    and mode) on a random layout: 4 of a 3 × 2 grid of blocks in shuffled slots, 70 tokens (a short
    second tile), against float64 with `oracle`'s dtype-aware bound, so a wrong index or a
    missing transpose shows here, not in a loss curve; if not, one warning says why. False
    without a warning where Triton is not installed."""
    if _triton() is None:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        layout = oracle.random_layout(3, 2, block, 4, 2, gen)
        on = {"device": device, "dtype": dtype}
        values = torch.randn(layout.capacity, block, block, generator=gen).to(**on)
        x, g = torch.randn(70, 2 * block, generator=gen).to(**on), torch.randn(70, 3 * block, generator=gen).to(**on)
        worst = oracle.worst_error(_product, _sddmm, layout, values, x, g)
        right = max(worst.values()) <= 1
        reason = "they missed the float64 product on a random layout (error / allowed: " + ", ".join(
            f"{name} {ratio:.3g}" for name, ratio in worst.items()) + ")"
    except Exception as error:  # a compiler error of Triton's, an unsupported GPU: the fallback still works
        right, reason = False, (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    if not right:
        warnings.warn(f"sparse_lm: Triton block kernels unavailable for {dtype} blocks of {block} on {device} "
                      f"({reason}); using the pure-torch gathered path", stacklevel=2)
    return right


@functools.cache
def _kernels(interpret: bool):
    """The two kernels, built for Triton's interpreter or for the GPU (`triton.jit` decides which
    when it wraps them, by TRITON_INTERPRET). They call Triton's builtins only, not the functions of
    its standard library (`tl.zeros` is one): those were wrapped, for one mode, when triton was
    first imported — by whichever library imported it first."""
    triton, tl = _triton()

    @triton.jit
    def product_kernel(a_ptr, v_ptr, slot_ptr, minor_ptr, start_ptr, out_ptr, tokens, stride_a, stride_out,
                       TRANSPOSE: tl.constexpr, B: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr):
        t = tl.program_id(0) * TILE + tl.arange(0, TILE)
        major = tl.program_id(1)
        i = tl.arange(0, B)
        inside = (t < tokens)[:, None]
        rows = t[:, None].to(tl.int64) * stride_a
        acc = tl.full((TILE, B), 0.0, tl.float32)
        for k in range(tl.load(start_ptr + major), tl.load(start_ptr + major + 1)):
            slot = tl.load(slot_ptr + k).to(tl.int64)
            minor = tl.load(minor_ptr + k).to(tl.int64)
            a = tl.load(a_ptr + rows + minor * B + i[None, :], mask=inside, other=0.0)
            w = tl.load(v_ptr + slot * B * B + i[:, None] * B + i[None, :])  # as stored, [out, in]: coalesced
            if TRANSPOSE:  # y = x · Wᵀ
                w = tl.trans(w)
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        out = out_ptr + t[:, None].to(tl.int64) * stride_out + major * B + i[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def sddmm_kernel(g_ptr, x_ptr, row_ptr, col_ptr, out_ptr, tokens, stride_g, stride_x,
                     B: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr):
        s = tl.program_id(0)
        r = tl.load(row_ptr + s).to(tl.int64)
        c = tl.load(col_ptr + s).to(tl.int64)
        i = tl.arange(0, B)
        acc = tl.full((B, B), 0.0, tl.float32)
        for t0 in range(0, tokens, TILE):
            t = t0 + tl.arange(0, TILE)
            inside = t < tokens
            g = tl.load(g_ptr + t[:, None].to(tl.int64) * stride_g + r * B + i[None, :], mask=inside[:, None],
                        other=0.0)  # [tile, b]: g's block-column r
            x = tl.load(x_ptr + t[:, None].to(tl.int64) * stride_x + c * B + i[None, :], mask=inside[:, None],
                        other=0.0)
            if IEEE:
                acc += tl.dot(tl.trans(g), x, input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(g), x)
        tl.store(out_ptr + s * B * B + i[:, None] * B + i[None, :], acc.to(out_ptr.dtype.element_ty))

    return product_kernel, sddmm_kernel


def _check(a: torch.Tensor, block: int, what: str) -> None:
    from sparse_lm.sparsity.kernels.backends import triton_takes  # the table of what each backend takes

    if not triton_takes(a, block):
        raise RuntimeError(f"triton_kernels.{what}: cannot take {a.dtype} on {a.device} with blocks of {block} "
                           "(Triton, a GPU or TRITON_INTERPRET=1, fp32/fp16/bf16, b a power of two ≥ 16)")


def block_product(a: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, minors: torch.Tensor,
                  starts: torch.Tensor, n_out: int, transpose: bool) -> torch.Tensor:
    """a · W_Aᵀ ([T, n_out]; transpose, the forward) or a · W_A (the input gradient), where output
    block-column m sums the blocks values[slots[k]] for k in starts[m] .. starts[m+1], each times
    activations' block-column minors[k]. Block-columns with no blocks come out zero."""
    block = values.shape[-1]
    _check(a, block, "block_product")
    return _product(a.contiguous(), values.to(a.dtype).contiguous(), slots.contiguous(), minors.contiguous(),
                    starts.contiguous(), n_out, transpose)


def block_sddmm(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
                block: int) -> torch.Tensor:
    """[n, b, b]: g[:, rows[s]-block]ᵀ · x[:, columns[s]-block] summed over the tokens, for each of
    the n slots given by their block-row and block-column."""
    _check(g, block, "block_sddmm")
    return _sddmm(g.contiguous(), x.contiguous(), rows.contiguous(), columns.contiguous(), block)


def _product(a, values, slots, minors, starts, n_out: int, transpose: bool) -> torch.Tensor:
    """`block_product` on contiguous tensors, unchecked."""
    block = values.shape[-1]
    out = a.new_empty(a.shape[0], n_out)
    if a.shape[0] == 0 or n_out == 0:
        return out
    product_kernel, _ = _kernels(interpreted())
    grid = (-(-a.shape[0] // TOKEN_TILE), n_out // block)
    product_kernel[grid](a, values, slots, minors, starts, out, a.shape[0], a.stride(0), out.stride(0),
                         TRANSPOSE=transpose, B=block, TILE=TOKEN_TILE, IEEE=a.dtype == torch.float32)
    return out


def _sddmm(g, x, rows, columns, block: int) -> torch.Tensor:
    """`block_sddmm` on contiguous tensors, unchecked."""
    out = g.new_empty(len(rows), block, block)
    if len(rows) == 0:
        return out
    _, sddmm_kernel = _kernels(interpreted())
    sddmm_kernel[(len(rows),)](g, x, rows, columns, out, g.shape[0], g.stride(0), x.stride(0), B=block,
                               TILE=TOKEN_TILE, IEEE=g.dtype == torch.float32)
    return out
