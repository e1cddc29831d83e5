"""Block products held to a float64 dense product, with tolerances that know the dtype.

The GPU kernels (`triton_kernels`) take fp32, fp16 and bf16 and sum in fp32. A 16-bit kernel that
summed in its own dtype would still land within a loose fixed tolerance (rtol 5e-2, atol 0.1), so
the bound here is what fp32 summation allows and no more: the output's one rounding to its dtype,
u·|reference|, plus the fp32 sum's error over K products, at most about K·2⁻²⁴·Σ|aᵢ·wᵢ| (doubled:
tensor cores may truncate where IEEE rounds). The reference is computed in float64 from the very
numbers the kernel was given, so their own rounding to 16 bits costs nothing. A bf16 sum misses this
bound on most outputs from K = 16 on (tests/test_kernel_oracle.py shows it on an emulated one).

`random_layout` draws which blocks of a layer are stored and in which slots (unused slots between
them), and `worst_error` runs a kernel pair on it against the dense product: the Triton kernels'
start-up probe (`triton_kernels.works`) and the tests use both, so an indexing or transpose error
shows wherever the kernels first run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
FP32_SUM_SLACK = 2.0  # tensor cores' fp32 sums: truncation, where IEEE would round to nearest


def allowed_error(dtype: torch.dtype, reference: torch.Tensor, magnitude: torch.Tensor, terms: int) -> torch.Tensor:
    """The largest |result − reference| of a K-term product summed in fp32 and written in `dtype`:
    `reference` the float64 product, `magnitude` the float64 product of the operands' absolute values."""
    u, fp32 = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[torch.float32]
    return u * reference.abs() + (1 + u) * FP32_SUM_SLACK * terms * fp32 * magnitude


@dataclass(frozen=True)
class Layout:
    """Which blocks of an [out_blocks·b, in_blocks·b] weight are stored: block (rows[k], cols[k])
    lives in slot slots[k] of a values tensor of `capacity` slots."""

    out_blocks: int
    in_blocks: int
    block: int
    rows: torch.Tensor
    cols: torch.Tensor
    slots: torch.Tensor
    capacity: int

    def product_args(self, transpose: bool, device) -> tuple:
        """(slots, minors, starts, n_out) of `block_product`: the forward (transpose) sums over each
        block-row's blocks, the input gradient over each block-column's."""
        major, minor, n_major = ((self.rows, self.cols, self.out_blocks) if transpose
                                 else (self.cols, self.rows, self.in_blocks))
        order = torch.argsort(major, stable=True)
        starts = torch.zeros(n_major + 1, dtype=torch.long)
        starts[1:] = torch.cumsum(torch.bincount(major, minlength=n_major), 0)
        return (self.slots[order].to(device), minor[order].to(device), starts.to(device), n_major * self.block)

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """The float64 weight these slots of `values` make, zeros where no block is stored."""
        b = self.block
        weight = torch.zeros(self.out_blocks * b, self.in_blocks * b, dtype=torch.float64)
        for r, c, s in zip(self.rows.tolist(), self.cols.tolist(), self.slots.tolist()):
            weight[r * b:(r + 1) * b, c * b:(c + 1) * b] = values[s].double().cpu()
        return weight


def random_layout(out_blocks: int, in_blocks: int, block: int, n_stored: int, spare: int,
                  generator: torch.Generator) -> Layout:
    """`n_stored` of the grid's blocks drawn at random, in shuffled slots among `spare` unused ones."""
    positions = torch.randperm(out_blocks * in_blocks, generator=generator)[:n_stored]
    slots = torch.randperm(n_stored + spare, generator=generator)[:n_stored]
    return Layout(out_blocks, in_blocks, block, positions // in_blocks, positions % in_blocks, slots,
                  n_stored + spare)


def worst_error(product, sddmm, layout: Layout, values: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> dict:
    """{forward, input_gradient, value_gradient: max |error| / allowed_error}: the pair of kernels
    (`block_product`- and `block_sddmm`-like) against float64 on this layout; ≤ 1 everywhere is right.
    x [tokens, in], g [tokens, out] and values [capacity, b, b] are on the kernels' device."""
    weight, dtype, b = layout.dense(values), x.dtype, layout.block
    x64, g64 = x.double().cpu(), g.double().cpu()
    stored_rows = torch.bincount(layout.rows, minlength=layout.out_blocks).max().item() if len(layout.rows) else 0
    stored_cols = torch.bincount(layout.cols, minlength=layout.in_blocks).max().item() if len(layout.cols) else 0
    results = {
        "forward": (product(x, values, *layout.product_args(True, x.device), True), x64 @ weight.T,
                    x64.abs() @ weight.abs().T, stored_rows * b),
        "input_gradient": (product(g, values, *layout.product_args(False, x.device), False), g64 @ weight,
                           g64.abs() @ weight.abs(), stored_cols * b),
    }
    full, magnitude = g64.T @ x64, g64.abs().T @ x64.abs()  # dL/dW [out, in] and its magnitude
    rows, cols = layout.rows.to(x.device), layout.cols.to(x.device)
    got = sddmm(g, x, rows, cols, b)
    pick = [(slice(r * b, (r + 1) * b), slice(c * b, (c + 1) * b)) for r, c in zip(layout.rows, layout.cols)]
    results["value_gradient"] = (got, torch.stack([full[p] for p in pick]) if pick else got.double().cpu(),
                                 torch.stack([magnitude[p] for p in pick]) if pick else got.double().cpu().abs(),
                                 x.shape[0])
    worst = {}
    for name, (result, reference, size, terms) in results.items():
        error = (result.double().cpu() - reference).abs()
        bound = allowed_error(dtype, reference, size, max(terms, 1)) + torch.finfo(torch.float64).tiny
        worst[name] = float((error / bound).max()) if error.numel() else 0.0
    return worst
