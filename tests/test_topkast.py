"""Always-sparse Top-KAST against the dense oracle (tests/reference/dense_topkast.py), step by step,
and the storage promise: nothing of dense size in parameters, buffers, gradients or optimizer state."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_lm.config import ModelConfig, SparsityConfig
from sparse_lm.methods.factory import linear_factory
from sparse_lm.model import Llama, init_weights
from sparse_lm.sparsity import kernels
from sparse_lm.sparsity.kernels import cpu
from sparse_lm.sparsity.storage import SparseLinear, block_sums
from sparse_lm.sparsity.topkast import TopKAST, initialize_static, reselect, sparse_layers
from tests.reference.dense_topkast import DenseTopKASTLinear
from tests.reference.regression import regression_step

LR, BETAS, EPS, WD = 3e-2, (0.9, 0.95), 1e-8, 0.1


def _two_layer_run(complement: str, block: int, steps: int = 60, every: int = 5, dims=((32, 24), (16, 32)),
                   density: float = 0.25, exploration: float = 0.25, specs=(None, None), headroom: float = 0.25,
                   promote: str = "any", churn_cap: float | None = None):
    """A 2-layer MLP regression trained sparse and dense-oracle side by side; yields per-step pairs.

    dims: (out, in) of each whole layer. specs: each layer's tensor-parallel shard (layer 0 split by
    rows, layer 1 by columns, as Megatron's column- and row-parallel pair) or None; the oracle is
    always the whole layer. `churn_cap`: the cap on A's newcomers at the first reselection,
    cosine-decayed to 0 at the last step (written out here, not taken from the schedule)."""
    torch.manual_seed(0)
    penalty = 1e-2
    sparse, dense = [], []
    for i, ((o, i_), spec) in enumerate(zip(dims, specs)):
        local_o, local_i = (o, i_) if spec is None else (o // spec.size, i_) if spec.dim == 0 else (o, i_ // spec.size)
        layer = SparseLinear(f"l{i}", local_i, local_o, density, exploration, block, penalty, complement, spec=spec,
                             headroom=headroom)
        layer.initialize(seed=7, stream=100 + i, std=0.3)
        sparse.append(layer)
        dense.append(DenseTopKASTLinear(o, i_, density, exploration, block, penalty, complement, 7, 100 + i, 0.3,
                                        promote))
    opt = torch.optim.AdamW([m.values for m in sparse], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        loss_s, loss_d, weights = regression_step(sparse, opt, dense, gen, dims)
        for d, w in zip(dense, weights):
            d.adamw(d.gradient(w.grad), step, LR, BETAS, EPS, WD)
        reselected = []
        if step % every == 0:
            fraction = None if churn_cap is None else churn_cap / 2 * (1 + math.cos(math.pi * step / steps))
            for layer, d in zip(sparse, dense):
                cap = None if fraction is None else math.floor(fraction * d.k_forward)
                change = reselect(layer, opt, promote=promote, max_entering_a=cap)
                reselected.append(change.entered_b / layer.k_backward)
                assert layer.capped_ranks == 0, step  # a shard at capacity would depart from the exact top-k
                d.select(max_new=cap)
        yield step, loss_s, loss_d, sparse, dense, reselected


def _local(layer: SparseLinear, whole: torch.Tensor, grid: bool) -> torch.Tensor:
    """The part of an oracle tensor (a block mask over the whole grid, or θ [out, in]) that this
    (possibly sharded) layer holds."""
    if grid:
        whole = whole.view(layer.block_rows * (layer.spec.size if layer.spec and layer.spec.dim == 0 else 1), -1)
        r0, c0 = layer.row0 // layer.block, layer.col0 // layer.block
        return whole[r0 : r0 + layer.block_rows, c0 : c0 + layer.block_cols].reshape(-1)
    return whole[layer.row0 : layer.row0 + layer.out_features, layer.col0 : layer.col0 + layer.in_features]


def _assert_follows_oracle(run, rel: float, tol: float) -> float:
    """Every step: the loss to `rel`, B and A exactly, θ (B and the complement) to rtol = atol = tol.
    Returns the summed fraction of B that changed at reselections (this shard's count)."""
    changed = 0.0
    for step, loss_s, loss_d, sparse, dense, reselected in run:
        assert loss_s == pytest.approx(loss_d, rel=rel, abs=1e-7), step
        for layer, d in zip(sparse, dense):
            index, live = layer.index.long(), layer.live
            selected_b = torch.zeros(layer.n_blocks, dtype=torch.bool)
            selected_b[index[live]] = True
            assert torch.equal(selected_b, _local(layer, d.B, grid=True)), step
            selected_a = torch.zeros(layer.n_blocks, dtype=torch.bool)
            selected_a[index[layer.forward_mask]] = True
            assert torch.equal(selected_a, _local(layer, d.A, grid=True)), step
            torch.testing.assert_close(layer.dense_weight(forward_only=False), _local(layer, d.theta, grid=False),
                                       rtol=tol, atol=tol, msg=lambda m, at=f"step {step}, {layer.name}": f"{at}: {m}")
        changed += sum(reselected)
    return changed


@pytest.mark.parametrize("complement, block, promote, churn_cap", [
    ("offload", 1, "any", None), ("offload", 4, "any", None), ("regenerate", 1, "any", None),
    ("regenerate", 4, "any", None), ("regenerate", 8, "any", None), ("regenerate", 1, "trained", None),
    ("offload", 4, "trained", None), ("regenerate", 1, "any", 0.3), ("offload", 4, "trained", 0.5)])
def test_sparse_training_follows_the_dense_oracle(complement, block, promote, churn_cap):
    """60 steps, 12 reselections: losses to rel 1e-5, selections exactly, θ (B and complement) to
    rtol 1e-5 / atol 1e-5 with θ ~ 0.3 (fp32; sums run in different orders, and Adam magnifies
    the difference for entries whose gradient is near zero). Block 8 with `regenerate` scores
    reselections from θ₀'s kept block scores and regenerates only entering blocks. At these
    densities most products take the dense tiles; the kernels' own paths are followed by the
    cases below."""
    changed = _assert_follows_oracle(_two_layer_run(complement, block, promote=promote, churn_cap=churn_cap),
                                     rel=1e-5, tol=1e-5)
    assert changed > 0  # the run must have moved blocks between B and the complement


def test_promote_trained_keeps_newcomers_out_of_a_while_enough_blocks_stayed():
    """Blocks entering B with the largest values of all: `any` puts them straight into A,
    `trained` keeps A among the blocks that stayed, and takes newcomers only to fill A."""
    def run(promote: str, boosted: int):
        layer = SparseLinear("l", 16, 16, 0.25, 0.25, 1, 0.0, "offload")
        layer.initialize(0, 1, 1.0)
        before = set(layer.index[layer.live].tolist())
        outside = [p for p in range(layer.n_blocks) if p not in before][:boosted]
        with torch.no_grad():  # the complement at 0 but for `boosted` blocks far above all of B
            layer.complement.zero_()
            layer.complement.view(-1)[outside] = 100.0
        change = reselect(layer, None, promote=promote)
        newcomers = sum(p not in before for p in layer.index[layer.forward_mask].tolist())
        return change, newcomers

    change, new_in_a = run("any", boosted=8)
    assert change.entered_b == 8 and new_in_a == 8  # the paper's rule: the largest 8 go straight into A
    change, new_in_a = run("trained", boosted=8)
    assert change.entered_b == 8 and new_in_a == 0 and change.entered_a_from_outside == 0
    change, new_in_a = run("trained", boosted=100)  # only 28 of B's 128 stayed: A (64) needs 36 newcomers
    assert change.entered_b == 100 and new_in_a == 64 - 28 == change.entered_a_from_outside


# Shapes and densities at which each product takes the path named (D = 0.1: A is 10% of each grid,
# B 20%): two layers 128 → 192 → 64, 40 steps with a reselection every 5.
KERNEL_CASES = {
    "in_place-b16": {"block": 16, "complement": "regenerate", "path": "in_place"},
    "in_place-b32": {"block": 32, "complement": "offload", "path": "in_place"},
    "gathered-b32": {"block": 32, "complement": "regenerate", "path": "gathered"},  # no compiled kernels
    "in_place-elements": {"block": 1, "complement": "regenerate", "path": "in_place"},
    "in_place-elements-promote": {"block": 1, "complement": "regenerate", "path": "in_place", "promote": "trained"},
    "in_place-elements-cap": {"block": 1, "complement": "offload", "path": "in_place", "churn_cap": 0.3},
}
KERNEL_DIMS = ((192, 128), (64, 192))


def _kernel_run(case: str, specs=(None, None)):
    c = KERNEL_CASES[case]
    return _two_layer_run(c["complement"], c["block"], steps=40, dims=KERNEL_DIMS, density=0.1, exploration=0.1,
                          specs=specs, headroom=1.0, promote=c.get("promote", "any"), churn_cap=c.get("churn_cap"))


def _check_paths(paths, case: str) -> None:
    """Every product (forward, input and value gradients) of the run took the case's path."""
    assert {product for product, _ in paths} == {"forward", "input_grad", "value_grad"}, paths
    assert {path for _, path in paths} == {KERNEL_CASES[case]["path"]}, paths


def _without_compiled_kernels(monkeypatch, case: str) -> None:
    """The gathered case: the in-place kernels unavailable (as with no C++ compiler)."""
    if KERNEL_CASES[case]["path"] == "gathered":
        monkeypatch.setattr(cpu, "ops", lambda: None)


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_paths_follow_the_dense_oracle(monkeypatch, case):
    """The same oracle, fp32, on shapes where every product takes an in-place or the gathered path
    (recorded and asserted, so a rule change that routes them back to the tiles fails here): 40
    steps, 8 reselections, losses to rel 1e-5, A and B exactly and θ to 1e-5 at every step."""
    _without_compiled_kernels(monkeypatch, case)
    with kernels.recorded_paths() as paths:
        changed = _assert_follows_oracle(_kernel_run(case), rel=1e-5, tol=1e-5)
    assert changed > 0
    _check_paths(paths, case)


def _tensor_parallel_body(rank, world):
    from sparse_lm.parallel.layout import ShardSpec
    from sparse_lm.parallel.mcore import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    ops, changed = cpu.ops, {}
    try:
        for case in KERNEL_CASES:  # one launch for all cases: starting the ranks is most of the time
            cpu.ops = (lambda: None) if KERNEL_CASES[case]["path"] == "gathered" else ops
            specs = (ShardSpec(dim=0, rank=rank, size=world), ShardSpec(dim=1, rank=rank, size=world))
            with kernels.recorded_paths() as paths:
                try:
                    changed[case] = _assert_follows_oracle(_kernel_run(case, specs), rel=1e-5, tol=1e-5)
                except AssertionError as exc:
                    raise AssertionError(f"{case}: {exc}") from exc
            _check_paths(paths, case)
        return changed
    finally:
        cpu.ops = ops
        parallel_state.destroy_model_parallel()


def test_kernel_paths_on_two_tensor_parallel_ranks_follow_the_dense_oracle():
    """Each case on TP 2 over gloo (layer 0 split by rows, layer 1 by columns, B's and A's budgets
    selected over both shards): each rank's shard follows its part of the whole-layer oracle —
    losses, A, B and θ at every step — with every product on the case's path."""
    from tests.distributed import run_distributed

    changed = run_distributed(_tensor_parallel_body, 2, timeout=600)
    for case in KERNEL_CASES:
        assert changed[0][case] + changed[1][case] > 0, case


def test_reselection_moves_blocks_and_zeros_their_moments():
    layer = SparseLinear("l", 16, 16, 0.25, 0.25, 1, 0.0, "regenerate")
    layer.initialize(0, 1, 1.0)
    opt = torch.optim.AdamW([layer.values], lr=1.0)
    layer(torch.randn(4, 16)).sum().backward()
    opt.step()
    before = layer.index.clone()
    with torch.no_grad():  # push the smallest-magnitude slot far above the rest: it must stay, others leave
        layer.values.mul_(0.0)
        layer.values[0] = 100.0
    change = reselect(layer, opt)
    state = opt.state[layer.values]
    moved = layer.index != before
    assert moved.any() and change.entered_b / layer.k_backward == pytest.approx(float(moved.float().mean()))
    assert not moved[0] and layer.forward_mask[0]
    assert torch.all(state["exp_avg"][moved] == 0) and torch.all(state["exp_avg_sq"][moved] == 0)
    assert torch.all(state["exp_avg_sq"][~moved] > 0)
    # every block of A but slot 0 left B, so A's newcomers all come from outside it
    assert change.entered_a == change.entered_a_from_outside == layer.k_forward - 1


def test_churn_of_a_is_split_by_where_its_newcomers_were():
    """A's newcomers promoted from B \\ A are not counted as coming from outside B."""
    layer = SparseLinear("l", 16, 16, 0.25, 0.25, 1, 0.0, "regenerate")
    layer.initialize(0, 1, 1.0)
    with torch.no_grad():  # B \ A far above the complement, A below it: B \ A becomes A, A's blocks leave
        layer.values[layer.forward_mask] = 0.0
        layer.values[~layer.forward_mask & layer.live] = 100.0
    change = reselect(layer, None)
    assert change.entered_b == layer.k_backward - layer.k_forward and change.entered_a == layer.k_forward
    assert change.entered_a_from_outside == 0


def test_churn_cap_decays_like_rigl_and_bounds_each_reselection():
    """`sparsity.churn_cap` c: the reselection after step t replaces at most ⌊c/2·(1 + cos(πt/T))·k_A⌋
    blocks of each layer's A, T the freezing step; the record says the fraction, and A's change
    (which uncapped is larger at every one of these reselections) stays within it."""
    model, sparsity = _tiny_model("topkast", reselect_every=2, churn_cap=0.4, freeze_masks_after=0.8)
    schedule = TopKAST(model, sparsity, total_steps=10)
    assert [schedule.churn_fraction(t) for t in (0, 4, 8, 9)] == pytest.approx([0.4, 0.2, 0.0, 0.0])
    uncapped = TopKAST(model, SparsityConfig(**{**vars(sparsity), "churn_cap": None}), total_steps=10)
    assert uncapped.churn_fraction(4) is None
    opt = torch.optim.AdamW(model.parameters(), lr=0.3)
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    for step in range(1, 7):
        opt.zero_grad()
        model(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()
        before = [layer.index[layer.forward_mask].sort().values for layer in sparse_layers(model)]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        free = uncapped.reselect_all(None) if step % 2 == 0 else None  # the same reselection uncapped, undone
        model.load_state_dict(state)
        record = schedule.after_step(step, opt)
        if step % 2:
            assert record is None
            continue
        fraction = 0.2 * (1 + math.cos(math.pi * step / 8))
        assert record["churn_cap"] == pytest.approx(fraction) and record["changed_a"] <= fraction
        for layer, old in zip(sparse_layers(model), before):
            assert int((~torch.isin(layer.index[layer.forward_mask], old)).sum()) <= fraction * layer.k_forward
        assert free["changed_a"] > record["changed_a"], step


def test_tiles_do_not_change_the_numbers(monkeypatch):
    """A layer computed in many small tiles equals one computed in a single tile."""
    layer = SparseLinear("l", 40, 24, 0.3, 0.2, 4, 1e-3, "regenerate")
    layer.initialize(3, 5, 0.5)
    x = torch.randn(2, 7, 40, requires_grad=True)
    outs = []
    for tile in (1 << 24, 4 * 40):
        monkeypatch.setattr(kernels, "MAX_TILE_ELEMENTS", tile)
        layer.values.grad, x.grad = None, None
        y = layer(x)
        (y * torch.arange(y.numel()).view(y.shape)).sum().backward()
        outs.append((y.detach(), x.grad.clone(), layer.values.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _tiny_model(method: str, complement: str = "regenerate", **extra):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
    sparsity = SparsityConfig(method=method, density=0.2, exploration=0.2, complement=complement, **extra)
    model = Llama(cfg, linear_factory(sparsity))
    init_weights(model, 0, initialize_static if method == "static" else None)
    return model, sparsity


@pytest.mark.parametrize("granularity", ["element", "block"])
def test_nothing_dense_persists_in_a_sparse_model(granularity):
    model, sparsity = _tiny_model("topkast", granularity=granularity, block_size=8, reselect_every=1)
    layers = sparse_layers(model)
    assert len(layers) == 2 * 7
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = TopKAST(model, sparsity, total_steps=10)
    ids = torch.randint(0, 64, (2, 17))
    for step in range(1, 4):
        opt.zero_grad()
        model(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()
        assert schedule.due(step)
        schedule.reselect_all(opt)
    for layer in layers:
        dense = layer.out_features * layer.in_features
        held = dict(layer.named_parameters()) | dict(layer.named_buffers())
        held |= {f"state.{k}": v for k, v in opt.state[layer.values].items() if torch.is_tensor(v) and v.ndim}
        held["grad"] = layer.values.grad
        for name, tensor in held.items():
            assert tensor.numel() <= min(layer.k_backward * layer.block**2, 0.5 * dense), (
                layer.name, name, tensor.shape)
        assert layer.values.numel() == layer.k_backward * layer.block**2


def test_offload_keeps_the_complement_off_the_optimizer():
    model, _ = _tiny_model("topkast", complement="offload")
    for layer in sparse_layers(model):
        assert layer.complement.shape == layer.shape and not layer.complement.requires_grad
        assert all(p is layer.values for p in layer.parameters())
        # the store holds θ₀, which B's initial values are taken from
        torch.testing.assert_close(layer.dense_weight(forward_only=False), layer.complement)


def test_offload_store_stays_on_the_host_in_fp32():
    """DeepSpeed moves the module to its GPU and casts it to bf16; the store is a dense weight, so
    it stays in host memory, fp32, while B's values move (the meta device stands in for a GPU)."""
    model, _ = _tiny_model("topkast", complement="offload")
    layer = sparse_layers(model)[0]
    store = layer.complement
    model.to(torch.bfloat16)
    assert layer.values.dtype == torch.bfloat16 and layer.complement is store and store.dtype == torch.float32
    model.to("meta")
    assert layer.values.is_meta and layer.index.is_meta and layer.complement is store and not store.is_meta
    assert "complement" in dict(layer.named_buffers())  # still saved and loaded with the layer


def test_block_scores_of_bf16_values_are_summed_in_fp32():
    """On a GPU the model copy of B's values is bf16: its block scores must still be fp32 sums, or
    reselection picks among ties (57 distinct bf16 sums among these 4096 blocks)."""
    blocks = (torch.randn(4096, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    scores = block_sums(blocks)
    assert scores.dtype == torch.float32 and torch.equal(scores, block_sums(blocks.float()))
    assert len(torch.unique(scores)) > 4000
    layer = SparseLinear("l", 64, 64, 0.25, 0.25, 4)
    layer.initialize(seed=1, stream=2, std=0.02)
    with torch.no_grad():
        layer.values.copy_(layer.values.bfloat16())  # numbers bf16 can hold, in both layers
    a_fp32 = layer.select_forward()
    layer.to(torch.bfloat16)
    assert torch.equal(layer.select_forward(), a_fp32)


def test_static_mask_is_random_and_fixed():
    model, sparsity = _tiny_model("static")
    schedule = TopKAST(model, sparsity, total_steps=10)
    assert not schedule.due(sparsity.reselect_every)
    layer = sparse_layers(model)[0]
    assert layer.k_backward == layer.k_forward and bool(layer.forward_mask.all())
    magnitude_top = torch.topk(layer.dense_weight(False).abs().reshape(-1), layer.k_forward).indices
    assert not torch.equal(magnitude_top.sort().values, layer.index.long().sort().values)


def test_dense_and_sparse_models_share_theta0():
    dense, _ = _tiny_model("dense")
    sparse, _ = _tiny_model("topkast")
    for name, module in sparse.named_modules():
        if isinstance(module, SparseLinear):
            reference = dict(dense.named_modules())[name].weight
            torch.testing.assert_close(module.dense_weight(forward_only=False), reference.detach())
            kept = module.dense_weight(forward_only=True)
            assert int((kept != 0).sum()) == module.k_forward


@pytest.mark.parametrize("dim", [0, 1])
def test_entering_blocks_are_regenerated_exactly_on_any_shard(dim):
    """`initial_blocks` (θ₀ of single blocks, hashed element by element, as reselection reads
    entering blocks and the kept block scores) equals the rows `initial_rows` regenerates, on the
    second of two tensor-parallel shards split by rows or by columns."""
    from sparse_lm.parallel.layout import ShardSpec
    from sparse_lm.sparsity.kernels import to_blocks

    layer = SparseLinear("q", 48, 32, 0.25, 0.25, block=8, spec=ShardSpec(dim=dim, rank=1, size=2))
    layer.seed, layer.stream, layer.init_std = 5, 9, 0.1
    positions = torch.tensor([0, 3, 7, layer.n_blocks - 1])
    whole = to_blocks(layer.initial_rows(0, layer.block_rows), 8)
    assert torch.equal(layer.initial_blocks(positions), whole[positions])
    assert torch.equal(layer.initial_block_scores(), whole.abs().sum(dim=(1, 2)))
