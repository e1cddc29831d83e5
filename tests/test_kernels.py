"""SparseMatmul against dense autograd: forward, input gradient, and the value gradient sampled at
all of B (A and B \\ A alike), on both paths (gathered blocks and dense tiles).

Tolerances: rtol = atol = 1e-5 in fp32 with O(1) inputs and sums of at most a few hundred terms
(the paths add in different orders); 1e-10 in fp64."""

from __future__ import annotations

import functools

import pytest
import torch

from sparse_lm.sparsity import kernels
from sparse_lm.sparsity.kernels import SparseMatmul, backends, cpu


def _layer(out_f, in_f, block, n_used, n_a, spare, dtype, seed=0, empty_row=False, empty_col=False):
    """(values, forward_mask, index, dense B weight) with `spare` unused slots shuffled in."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = out_f // block, in_f // block
    allowed = torch.ones(rows, cols, dtype=torch.bool)
    if empty_row:
        allowed[1] = False
    if empty_col:
        allowed[:, -1] = False
    candidates = torch.nonzero(allowed.view(-1)).view(-1)
    positions = candidates[torch.randperm(len(candidates), generator=gen)[:n_used]]
    capacity = n_used + spare
    index = torch.full((capacity,), rows * cols, dtype=torch.int32)
    mask = torch.zeros(capacity, dtype=torch.bool)
    slots = torch.randperm(capacity, generator=gen)[:n_used]  # used slots in no particular order
    index[slots] = positions.int()
    mask[slots[:n_a]] = True
    values = torch.randn(capacity, block, block, generator=gen, dtype=dtype)
    values[index == rows * cols] = 0
    return values, mask, index


def _entries(index, shape, block):
    """(rows, cols) [n, b, b]: the weight entries of each slot's block, by the layout's definition —
    slot s holds the b×b block at block-row index[s] // (in/b), block-column index[s] % (in/b) —
    written out here rather than taken from the code under test."""
    r, c = index.long() // (shape[1] // block), index.long() % (shape[1] // block)
    offsets = torch.arange(block, device=index.device)
    return ((r * block).view(-1, 1, 1) + offsets.view(1, -1, 1)).expand(-1, block, block), \
        ((c * block).view(-1, 1, 1) + offsets.view(1, 1, -1)).expand(-1, block, block)


def _dense(values, mask, index, shape, block):
    """W_A [out, in]: the blocks of the used slots in A at their positions, zeros elsewhere."""
    keep = mask & (index.long() < (shape[0] // block) * (shape[1] // block))
    rows, cols = _entries(index[keep], shape, block)
    weight = values.new_zeros(shape)
    weight[rows, cols] = values[keep]
    return weight


def _check(shape, block, n_used, n_a, spare=3, dtype=torch.float32, lead=(2, 5), penalty=0.0, rtol=None,
           atol=None, device="cpu", **kw):
    values0, mask, index = (t.to(device) for t in _layer(*shape, block, n_used, n_a, spare, dtype, **kw))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    tol = {name: given if given is not None else tol[name] for name, given in (("rtol", rtol), ("atol", atol))}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, shape[1], generator=gen, dtype=dtype).to(device).requires_grad_(True)
    weight = torch.randn(*lead, shape[0], generator=gen, dtype=dtype).to(device)  # loss = Σ weight · y

    leaf = values0.clone().requires_grad_(True)
    values = leaf * 1.0  # a non-leaf, as Spartan passes
    y = SparseMatmul.apply(x, values, mask, index, shape, block, penalty, 0.25)
    (y * weight).sum().backward()

    ref_x = x.detach().clone().requires_grad_(True)
    effective = _dense(values0, mask, index, shape, block).requires_grad_(True)  # W_A
    ref_y = ref_x @ effective.T
    (ref_y * weight).sum().backward()

    used = index.long() < (shape[0] // block) * (shape[1] // block)
    expected = torch.zeros_like(values0)  # dL/dW_A sampled at all of B; unused slots: zeros
    rows, cols = _entries(index[used], shape, block)
    expected[used] = effective.grad[rows, cols]
    if penalty:
        expected = expected + torch.where(mask, penalty, penalty / 0.25).to(dtype).view(-1, 1, 1) * values0
    torch.testing.assert_close(y, ref_y, **tol)
    torch.testing.assert_close(x.grad, ref_x.grad, **tol)
    torch.testing.assert_close(leaf.grad, expected, **tol)
    assert leaf.grad.dtype == dtype and torch.all(leaf.grad[~used] == 0)


@pytest.fixture(params=kernels.PATHS)
def path(request):
    """Forces one path for every product (all must give the same numbers). The in-place path must
    really run: its compiled kernels have to build here."""
    if request.param == "in_place":
        assert cpu.ops() is not None, "the compiled block kernels did not build"
    with kernels.forced_path(request.param):
        yield request.param


@pytest.mark.parametrize("block", [1, 4, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_dense(path, block, dtype):
    shape = (4 * 32, 3 * 32)
    n = (shape[0] // block) * (shape[1] // block)
    n_used = max(2, n // 3)
    _check(shape, block, n_used, n_used // 2, dtype=dtype, penalty=1e-2, empty_row=True, empty_col=True)


@pytest.mark.parametrize("seed", range(4))
def test_random_shapes(path, seed):
    """Shapes, blocks, fractions of the grid in B and A, and token counts drawn at random (fp64, so
    that only a wrong kernel can fail)."""
    gen = torch.Generator().manual_seed(100 + seed)
    block = [8, 16, 32][int(torch.randint(3, (1,), generator=gen))]
    rows, cols, tokens = (int(v) for v in torch.randint(1, 7, (3,), generator=gen))
    n = rows * cols
    n_used = int(torch.randint(0, n + 1, (1,), generator=gen))
    n_a = int(torch.randint(0, n_used + 1, (1,), generator=gen))
    _check((rows * block, cols * block), block, n_used, n_a, dtype=torch.float64, lead=(tokens * 50,), seed=seed)


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("forward_share", [0.0, 1.0])
def test_all_or_nothing_in_a(path, block, forward_share):
    shape = (128, 192)
    n = (shape[0] // block) * (shape[1] // block)
    _check(shape, block, n, round(forward_share * n), spare=0 if forward_share else 2, lead=(7,))


def test_layer_without_used_slots(path):
    _check((64, 32), 16, 0, 0, spare=4, lead=(3,))


def test_no_tokens(path):
    _check((64, 96), 32, 4, 2, lead=(0, 3))


@pytest.mark.parametrize("slabs", [1, 3])
def test_small_chunks_do_not_change_the_numbers(monkeypatch, path, slabs):
    """Chunks of one or three [b, t] slabs (fewer than some block-rows hold) reuse the workspaces,
    in passes of 4 tokens over 6 (the last one short)."""
    monkeypatch.setattr(kernels, "GATHER_TOKENS", 4)
    monkeypatch.setattr(kernels, "GATHER_CHUNK_ELEMENTS", slabs * 4 * 16)
    _check((128, 96), 16, 30, 20, lead=(2, 3))


def test_many_tokens(path):
    """600 tokens: the compiled kernels' passes of 256 tokens (the last one short) and the gathered
    path's of GATHER_TOKENS (fp64: sums of 600 terms)."""
    _check((96, 64), 32, 4, 2, lead=(2, 300), dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
def test_random_element_layers(path, seed):
    """Element mode on random shapes, fractions of B and A, and token counts that straddle the
    element kernels' token tiles (64 fp32 / 32 fp64) and value-gradient passes (512), in both
    dtypes."""
    gen = torch.Generator().manual_seed(200 + seed)
    out_f, in_f = (int(v) for v in torch.randint(1, 160, (2,), generator=gen))
    n_used = int(torch.randint(0, out_f * in_f + 1, (1,), generator=gen))
    n_a = int(torch.randint(0, n_used + 1, (1,), generator=gen))
    tokens = int(torch.randint(1, 1100, (1,), generator=gen))
    dtype = (torch.float32, torch.float64)[seed % 2]
    _check((out_f, in_f), 1, n_used, n_a, dtype=dtype, lead=(tokens,), seed=seed,
           **({"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}))


@pytest.mark.parametrize("block", [1, 32])
def test_threads_do_not_change_the_numbers(block):
    """The in-place kernels give each output column (block-row) and each value gradient to one
    thread, summed in one order: 1 or 3 threads, the same bits."""
    values, mask, index = _layer(192, 128, block, (192 // block) * (128 // block) // 4, 10, 2, torch.float32)
    gen = torch.Generator().manual_seed(3)
    x, g = torch.randn(300, 128, generator=gen), torch.randn(300, 192, generator=gen)
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            with kernels.forced_path("in_place"):
                x_leaf, v_leaf = x.clone().requires_grad_(True), values.clone().requires_grad_(True)
                y = SparseMatmul.apply(x_leaf, v_leaf, mask, index, (192, 128), block, 0.0, 1.0)
                y.backward(g)
            results.append((y.detach(), x_leaf.grad, v_leaf.grad))
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(*results):
        assert torch.equal(one, three)


def test_element_keys_fit_in_64_bits():
    """(row, column, slot) must pack in one word for the element kernels' sort; larger layers take
    the tiles."""
    assert kernels.element_keys_fit((1 << 20, 1 << 20), (1 << 24) - 1)
    assert not kernels.element_keys_fit((1 << 20, 1 << 20), 1 << 24)
    assert kernels.element_keys_fit((1, 1), 0)
    assert kernels.layer_path(torch.zeros(1, 2), 1, 1, ((1 << 31) - 1, (1 << 31) - 1), 4) == "tiles"
    assert kernels.layer_path(torch.zeros(1, 2), 1, 1, (4, 4), 4) == "in_place"


def test_element_kernels_check_their_positions():
    """A position outside the layer is an error, not a read past the activations."""
    ops = cpu.ops()
    a, outside = torch.zeros(4, 8), torch.tensor([17])  # grid 2 × 8: 16 means unused, 17 is outside
    with pytest.raises(RuntimeError, match="position out of range"):
        ops.element_product(a, torch.ones(1), outside, torch.ones(1, dtype=torch.bool), 2, 8, True)
    with pytest.raises(RuntimeError, match="position out of range"):
        ops.element_sddmm(torch.zeros(4, 2), a, outside, 2, 8)


def test_rules_pick_blocks_only_for_large_sparse_blocks():
    assert kernels.use_in_place(16, 60, 100) and not kernels.use_in_place(16, 61, 100)
    assert kernels.use_in_place(32, 70, 100) and not kernels.use_in_place(48, 71, 100)
    assert kernels.use_in_place(128, 80, 100) and not kernels.use_in_place(64, 81, 100)
    assert kernels.use_in_place(1, 25, 100) and not kernels.use_in_place(1, 26, 100)
    assert not kernels.use_in_place(8, 1, 100) and not kernels.use_in_place(2, 1, 100)
    assert kernels.use_blocks(8, 20, 100) and not kernels.use_blocks(8, 21, 100)
    assert kernels.use_blocks(16, 40, 100) and not kernels.use_blocks(16, 41, 100)
    assert kernels.use_blocks(32, 50, 100) and not kernels.use_blocks(128, 56, 100)
    assert not kernels.use_blocks(4, 1, 100) and not kernels.use_blocks(1, 1, 100)


@pytest.mark.parametrize("compiled_kernels", [True, False])
def test_default_rule_matches_dense(monkeypatch, compiled_kernels):
    """No forcing: A (5 of 32 blocks) takes the in-place path where the kernels are built, else the
    gathered one; B (24 of 32) the tiles."""
    if not compiled_kernels:
        monkeypatch.setattr(cpu, "ops", lambda: None)
    shape, block = (256, 128), 32
    assert kernels.use_in_place(block, 5, 32) and not kernels.use_in_place(block, 24, 32)
    assert kernels.use_blocks(block, 5, 32) and not kernels.use_blocks(block, 24, 32)
    _check(shape, block, 24, 5, lead=(4, 3))


def test_compiled_kernels_only_where_they_run():
    """CPU fp32/fp64 only: bf16 and other devices keep the pure-torch paths."""
    assert backends.cpu_takes(torch.zeros(2, 2)) and backends.cpu_takes(torch.zeros(2, 2, dtype=torch.float64))
    assert not backends.cpu_takes(torch.zeros(2, 2, dtype=torch.bfloat16))
    assert not backends.cpu_takes(torch.zeros(2, 2, device="meta"))


def test_forced_path_is_checked():
    with pytest.raises(ValueError, match="path must be one of"), kernels.forced_path("csr"):
        pass
    x = torch.zeros(3, 64, dtype=torch.bfloat16)
    with kernels.forced_path("in_place"), pytest.raises(RuntimeError, match="no in-place kernels take torch.bfloat16"):
        SparseMatmul.apply(x, torch.zeros(2, 32, 32, dtype=torch.bfloat16), torch.ones(2, dtype=torch.bool),
                           torch.tensor([0, 1], dtype=torch.int32), (64, 64), 32, 0.0, 0.5)


def _need_triton() -> None:
    pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it on Linux)")


def _interpreted_triton(monkeypatch) -> None:
    """Triton's interpreter on, from here: `triton_kernels` builds its kernels for each mode apart,
    whichever mode triton itself was first imported in (another library may have imported it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _need_triton()


@pytest.fixture
def triton_in_place(monkeypatch):
    """The device on which every product takes the in-place path with the Triton kernels
    (`triton_kernels`): a GPU where there is one, else the CPU, by Triton's interpreter — the GPU
    kernels' own code, checked on a CPU-only machine."""
    if torch.cuda.is_available():
        _need_triton()
        device = "cuda"
    else:
        _interpreted_triton(monkeypatch)
        monkeypatch.setattr(backends, "cpu_takes", lambda a: False)  # CPU tensors go to Triton, not csrc/
        device = "cpu"
    with kernels.forced_path("in_place"):
        yield device


@pytest.mark.parametrize("seed", range(4))
def test_triton_kernels_match_dense(triton_in_place, seed):
    """Random shapes, b = 16, 32, 64, fractions of B and A, and token counts (not multiples of the
    64-token tile), with an empty block-row and block-column; fp32 is multiplied in full fp32."""
    gen = torch.Generator().manual_seed(200 + seed)
    block = [16, 32, 64][seed % 3]
    rows, cols, tokens = (int(v) for v in torch.randint(2, 6, (3,), generator=gen))
    n_used = int(torch.randint(2, rows * cols - rows - cols + 2, (1,), generator=gen))
    n_a = int(torch.randint(1, n_used + 1, (1,), generator=gen))
    _check((rows * block, cols * block), block, n_used, n_a, lead=(tokens * 37,), penalty=1e-2, seed=seed,
           empty_row=True, empty_col=True, device=triton_in_place)


@pytest.mark.parametrize("n_used, n_a, lead", [(0, 0, (5,)), (12, 12, (3, 30)), (12, 5, (0, 4))])
def test_triton_kernels_at_the_edges(triton_in_place, n_used, n_a, lead):
    """Density 0 (no block used), 1 (all in A, no spare slot) and no tokens at all."""
    _check((64, 96), 16, n_used, n_a, spare=0 if n_used == 12 else 3, lead=lead, device=triton_in_place)


# bf16 on a GPU only: Triton's interpreter computes it wrongly on the CPU.
@pytest.mark.parametrize("dtype", [torch.float16] + [torch.bfloat16] * torch.cuda.is_available())
def test_triton_kernels_in_half_precision(triton_in_place, dtype):
    """16-bit activations and blocks, fp32 sums: within their rounding of the reference (itself
    computed from the same 16-bit numbers)."""
    rtol, atol = (1e-2, 2e-2) if dtype == torch.float16 else (5e-2, 1e-1)
    _check((96, 64), 32, 4, 3, dtype=dtype, lead=(70,), rtol=rtol, atol=atol, device=triton_in_place)


def test_triton_kernels_that_do_not_build_leave_the_products_to_the_gathered_path(monkeypatch):
    """A Triton that cannot build the kernels for a GPU (or dtype) costs one warning, not the step."""
    from sparse_lm.sparsity.kernels import triton_kernels

    _interpreted_triton(monkeypatch)

    def cannot_build(interpret):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(triton_kernels, "_kernels", cannot_build)
    monkeypatch.setattr(triton_kernels, "works", functools.cache(triton_kernels.works.__wrapped__))  # untried
    monkeypatch.setattr(backends, "cpu_takes", lambda a: False)
    with pytest.warns(UserWarning, match="Triton block kernels unavailable .*PassManager::run failed"):
        assert kernels.in_place_ops(torch.zeros(2, 64), 32) is None
    assert kernels.choose_path(torch.zeros(2, 64), 32, 5, 32) == "gathered"
    _check((256, 128), 32, 24, 5, lead=(4, 3))


def test_triton_kernels_only_where_they_run(monkeypatch):
    """A GPU (or the interpreter), fp32/fp16/bf16, and blocks that tl.dot multiplies."""
    from sparse_lm.sparsity.kernels import backends

    _interpreted_triton(monkeypatch)
    assert backends.triton_takes(torch.zeros(2, 2), 16) and backends.triton_takes(torch.zeros(2, 2), 64)
    assert not backends.triton_takes(torch.zeros(2, 2), 8) and not backends.triton_takes(torch.zeros(2, 2), 48)
    assert not backends.triton_takes(torch.zeros(2, 2, dtype=torch.float64), 32)
    assert kernels.in_place_ops(torch.zeros(2, 2), 32) is cpu.ops()  # the CPU prefers csrc/
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not backends.triton_takes(torch.zeros(2, 2), 32)  # a CPU tensor, no interpreter
