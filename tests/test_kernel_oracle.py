"""The block kernels against a float64 dense product with dtype-aware bounds (`kernels.oracle`):
the bounds pass an fp32 sum and fail a 16-bit one; the oracle and the start-up probe catch a
transposed block; and the Triton kernels meet them in fp32, fp16 and bf16 for b = 16, 32, 64 on
layouts with no block, every block and a ragged draw (on a GPU; on the CPU Triton's interpreter
runs fp32, and fp16, whose sums it keeps in fp32 as the GPU does — its bf16 is wrong)."""

from __future__ import annotations

import functools

import pytest
import torch

from sparse_lm.sparsity.kernels import oracle
from sparse_lm.sparsity.kernels.oracle import allowed_error, random_layout, worst_error

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _sum_in(dtype, a, w, accumulate):
    """a @ w with every partial sum kept in `accumulate`, written in `dtype` (an emulated kernel)."""
    acc = torch.zeros(a.shape[0], w.shape[1], dtype=accumulate)
    for k in range(a.shape[1]):
        acc = (acc.double() + a[:, k:k + 1].double() * w[k].double()).to(accumulate)
    return acc.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("terms", [16, 64, 256])
def test_bounds_pass_an_fp32_sum_and_fail_a_16_bit_one(dtype, terms):
    gen = torch.Generator().manual_seed(terms)
    a, w = (torch.randn(shape, generator=gen).to(dtype) for shape in ((64, terms), (terms, 48)))
    reference, magnitude = a.double() @ w.double(), a.double().abs() @ w.double().abs()
    bound = allowed_error(dtype, reference, magnitude, terms)
    assert ((_sum_in(dtype, a, w, torch.float32).double() - reference).abs() <= bound).all()
    misses = (_sum_in(dtype, a, w, dtype).double() - reference).abs() > bound
    assert misses.float().mean() > 0.2  # not one unlucky element: a good share of the outputs


def _torch_product(a, values, slots, minors, starts, n_out, transpose, forget_transpose=False):
    """`block_product` by its definition, in float64 (a transposed block when told to forget)."""
    b, out = values.shape[-1], torch.zeros(a.shape[0], n_out, dtype=torch.float64)
    for m in range(len(starts) - 1):
        for k in range(int(starts[m]), int(starts[m + 1])):
            block = values[slots[k]].double()
            block = block.T if transpose != forget_transpose else block
            out[:, m * b:(m + 1) * b] += a[:, minors[k] * b:(minors[k] + 1) * b].double() @ block
    return out.to(a.dtype)


def _torch_sddmm(g, x, rows, columns, block):
    return torch.stack([g[:, r * block:(r + 1) * block].double().T @ x[:, c * block:(c + 1) * block].double()
                        for r, c in zip(rows.tolist(), columns.tolist())]).to(g.dtype)


def _problem(block, n_stored, dtype, device="cpu", out_blocks=4, in_blocks=3, tokens=150, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layout = random_layout(out_blocks, in_blocks, block, n_stored, 0 if n_stored == out_blocks * in_blocks else 3, gen)
    on = {"device": device, "dtype": dtype}
    values = torch.randn(layout.capacity, block, block, generator=gen).to(**on)
    x = torch.randn(tokens, in_blocks * block, generator=gen).to(**on)
    g = torch.randn(tokens, out_blocks * block, generator=gen).to(**on)
    return layout, values, x, g


def test_the_oracle_catches_a_transposed_block():
    layout, values, x, g = _problem(16, 7, torch.float32)
    assert max(worst_error(_torch_product, _torch_sddmm, layout, values, x, g).values()) <= 1
    wrong = functools.partial(_torch_product, forget_transpose=True)
    assert worst_error(wrong, _torch_sddmm, layout, values, x, g)["forward"] > 1


def test_the_probe_turns_away_a_transposing_kernel(monkeypatch):
    """The start-up probe (a random layout) refuses kernels that transpose a block: with a block of
    ones, as the probe once had, nobody would have noticed."""
    from sparse_lm.sparsity.kernels import triton_kernels

    monkeypatch.setattr(triton_kernels, "_sddmm", _torch_sddmm)
    monkeypatch.setattr(triton_kernels, "_product", _torch_product)
    probe = triton_kernels.works.__wrapped__
    assert probe(torch.device("cpu"), torch.float32, 16, True)
    monkeypatch.setattr(triton_kernels, "_product", functools.partial(_torch_product, forget_transpose=True))
    with pytest.warns(UserWarning, match="missed the float64 product on a random layout"):
        assert not probe(torch.device("cpu"), torch.float32, 16, True)


def _device_for(dtype, monkeypatch) -> str:
    """A GPU where there is one, else the CPU under Triton's interpreter (whose bf16 is wrong)."""
    pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it on Linux)")
    if torch.cuda.is_available():
        return "cuda"
    if dtype == torch.bfloat16:
        pytest.skip("bf16 on a GPU only: Triton's interpreter computes it wrongly on the CPU")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


@pytest.mark.parametrize("stored", ["none", "all", "ragged"])
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_kernels_meet_the_float64_oracle(monkeypatch, dtype, block, stored):
    """fp32 sums wherever the dtype: a kernel summing in bf16 (or fp16) misses these bounds. The
    start-up probe must pass too, or `supports` would leave the products to the gathered path."""
    from sparse_lm.sparsity.kernels import backends, triton_kernels

    device = _device_for(dtype, monkeypatch)
    grid = 4 * 3
    n_stored = {"none": 0, "all": grid, "ragged": int(torch.randint(1, grid, (1,),
                                                                    generator=torch.Generator().manual_seed(block)))}
    layout, values, x, g = _problem(block, n_stored[stored], dtype, device, seed=block)
    assert backends.triton_takes(x, block), "the start-up probe failed"
    worst = worst_error(triton_kernels.block_product, triton_kernels.block_sddmm, layout, values, x, g)
    assert max(worst.values()) <= 1, worst


def test_the_bounds_know_every_kernel_dtype():
    from sparse_lm.sparsity.kernels import backends

    assert set(oracle.UNIT_ROUNDOFF) == set(backends.TRITON.dtypes)
