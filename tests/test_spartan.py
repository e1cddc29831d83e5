"""Spartan inside Top-KAST's B against the dense oracle (tests/reference/dense_spartan.py), step by
step on a small Llama, and the allocations' budgets (sparsity/allocation.py)."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch.func import functional_call

from sparse_lm.config import ModelConfig, ParallelConfig, RunConfig, SparsityConfig, TrainConfig
from sparse_lm.errors import UserError
from sparse_lm.methods.factory import make_schedule
from sparse_lm.model.build import build_model
from sparse_lm.sparsity import allocation, kernels
from sparse_lm.sparsity.spartan import Spartan, SpartanLinear, spartan_layers
from tests.reference.dense_spartan import DenseSpartanLinear

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.95), 1e-8, 0.1
# The oracle's schedule for `_config()`'s 30 steps: warmup over 30 · 0.3 = 9 steps, the last
# 30 · 0.2 = 6 steps (25-30) frozen, B reselected every 5 steps before that.
WARMUP_STEPS, FROZEN_AFTER, RESELECTIONS = 9, 24, (5, 10, 15, 20)


class SpartanRun(NamedTuple):
    model: torch.nn.Module
    schedule: Spartan
    opt: torch.optim.AdamW
    gen: torch.Generator
    layers: list[SpartanLinear]

    def update(self, ids: torch.Tensor) -> torch.Tensor:
        """One optimizer step on `ids` (next-token targets); the loss before it."""
        loss = self.model(ids[:, :-1], ids[:, 1:])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss


def spartan_run(cfg: RunConfig, topology=None, group=None) -> SpartanRun:
    """A Spartan training run as the trajectory tests drive it: the model with its schedule started,
    AdamW with the oracle's constants, and the generator of the steps' data (seed 3), so that every
    such test trains on the same batches. `topology` and `group`: one tensor-parallel rank's."""
    model = build_model(cfg, topology=topology)
    schedule = make_schedule(model, cfg, group)
    schedule.start(0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    return SpartanRun(model, schedule, opt, torch.Generator().manual_seed(3), spartan_layers(model))


def _config(steps=30, allocation_name="uniform", block=1, pipeline=1, n_layers=2, d_model=32, **sparsity) -> RunConfig:
    sparsity = {"method": "spartan", "density": 0.25, "exploration": 0.25, "reselect_every": 5,
                "warmup_frac": 0.3, "finetune_frac": 0.2, "allocation": allocation_name,
                "granularity": "block" if block > 1 else "element", "block_size": block} | sparsity
    cfg = RunConfig(model=ModelConfig(vocab_size=64, d_model=d_model, n_layers=n_layers, n_heads=2,
                                      ffn_hidden=2 * d_model, max_seq_len=16),
                    sparsity=SparsityConfig(**sparsity), train=TrainConfig(steps=steps, seq_len=16),
                    parallel=ParallelConfig(pipeline=pipeline))
    return cfg.validate()


class Oracle:
    """A dense Llama whose sparse linears' weights come from `DenseSpartanLinear`s, trained by
    AdamW (other parameters) and the oracle's written-out AdamW (the sparse weights)."""

    def __init__(self, cfg: RunConfig, sparse_model):
        self.cfg = cfg
        dense_cfg = RunConfig(model=cfg.model, train=cfg.train)
        self.model = build_model(dense_cfg)  # same seed: θ₀ of every tensor equals the sparse model's
        s = cfg.sparsity
        self.layers = {}
        for layer in spartan_layers(sparse_model):
            exploration = 1 - s.density if s.candidates == "dense" else s.exploration
            self.layers[layer.name] = DenseSpartanLinear(
                layer.out_features, layer.in_features, s.density, exploration, s.block, 0.0, "regenerate",
                layer.seed, layer.stream, layer.init_std, beta=s.beta)
        sparse_names = {f"{name}.weight" for name in self.layers}
        self.others = [p for n, p in self.model.named_parameters() if n not in sparse_names]
        self.opt = torch.optim.AdamW(self.others, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
        self.total = sum(d.k_forward for d in self.layers.values())
        assert (cfg.train.steps, s.warmup_frac, s.finetune_frac, s.reselect_every) == (30, 0.3, 0.2, 5)
        if s.allocation == "global":
            self.reallocate()
        self.advance(0, repick=True)

    def reallocate(self):
        """One torch.topk over the unit values of every layer's B, each layer's best block first."""
        scores = [d.block_scores(d.theta)[d.B] for d in self.layers.values()]
        for x in scores:  # every layer keeps its best block
            x[x.argmax()] = torch.inf
        top = torch.topk(torch.cat(scores), self.total).indices
        bounds = torch.tensor([0] + [len(x) for x in scores]).cumsum(0)
        for d, lo, hi in zip(self.layers.values(), bounds, bounds[1:]):
            d.budget = int(((top >= lo) & (top < hi)).sum())

    def advance(self, step, repick):
        """The schedule after optimizer step `step`, from its definition for this test's config
        (T = 30 steps, warmup_frac 0.3, finetune_frac 0.2, reselect_every 5): the budget and β
        move linearly over the first 9 steps, A and B are frozen once step 24 is done."""
        for d in self.layers.values():
            d.advance(min(step, WARMUP_STEPS) / WARMUP_STEPS, step >= FROZEN_AFTER, repick and step < FROZEN_AFTER)

    def step(self, step, ids):
        thetas, weights = {}, {}
        for name, d in self.layers.items():
            thetas[name], weights[f"{name}.weight"] = d.weight()
        loss = functional_call(self.model, weights, (ids[:, :-1], ids[:, 1:]))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        for name, d in self.layers.items():
            d.adamw(d.gradient(thetas[name].grad), step, LR, BETAS, EPS, WD)
        if step in RESELECTIONS:
            for d in self.layers.values():
                d.select()
            if self.cfg.sparsity.allocation == "global":
                self.reallocate()
        self.advance(step, repick=True)
        return loss.item()


def _selected(layer: SpartanLinear, forward: bool) -> torch.Tensor:
    mask = torch.zeros(layer.n_blocks, dtype=torch.bool)
    index = layer.index.long()
    mask[index[layer.forward_mask] if forward else index[layer.live]] = True
    return mask


@pytest.fixture
def default_dtype(request):
    """The model's dtype for the test (the counter-based initialiser gives float32 either way)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(previous)


F64, F32 = torch.float64, torch.float32
# (block, allocation, candidates, density = exploration, dtype, the path every product takes or None)
ORACLE_CASES = [
    (1, "uniform", "backward_set", 0.25, F64, None), (4, "uniform", "backward_set", 0.25, F64, None),
    (4, "global", "backward_set", 0.25, F64, None),
    (4, "global", "dense", 0.25, F64, None),  # B is every block, yet the budget is re-split every 5 steps
    (4, "uniform", "backward_set", 0.25, F32, None),
    # the in-place kernels at D = 0.1 (|B| ≤ 20% of each grid; d_model 4·b); blocks in float64: in fp32
    # a 16×16 or 32×32 block's soft mask (β = 160 or 320) turns rounding into near-tie flips of A
    (16, "global", "backward_set", 0.1, F64, "in_place"), (16, "uniform", "backward_set", 0.1, F64, "in_place"),
    (32, "uniform", "backward_set", 0.1, F64, "in_place"), (1, "global", "backward_set", 0.1, F32, "in_place"),
]


@pytest.mark.parametrize("block,allocation_name,candidates,density,default_dtype,path", ORACLE_CASES,
                         indirect=["default_dtype"], ids=[f"b{c[0]}-{c[1]}-{c[2]}-D{c[3]}-{str(c[4])[6:]}"
                                                          for c in ORACLE_CASES])
def test_spartan_follows_the_dense_oracle(block, allocation_name, candidates, density, default_dtype, path):
    """30 steps (warmup 9, reselection every 5, finetune from step 24). float64: losses to rel
    1e-6 (the model takes its cross-entropy in fp32, so the two losses may differ by an fp32 ulp of
    the logits' rounding: 1.1e-7 seen on one machine), A, B and budgets exactly, θ to 1e-7 at every
    step (θ ~ 0.05). Spartan's steep soft mask
    (β = 10·b) and Adam amplify fp32 rounding between two implementations, so in fp32 the losses
    agree to rel 1e-5 and θ to 2e-4 at every step; A, B and budgets are still identical. Where a
    path is named, every product took it (recorded)."""
    exact = default_dtype == F64
    cfg = _config(block=block, allocation_name=allocation_name, candidates=candidates, density=density,
                  exploration=density, d_model=max(32, 4 * block))  # at least 4 × 4 blocks per layer
    run = spartan_run(cfg)
    model, schedule, opt, gen, layers = run
    oracle = Oracle(cfg, model)
    moved = 0
    budgets_seen = set()
    with kernels.recorded_paths() as paths:
        for step in range(1, cfg.train.steps + 1):
            ids = torch.randint(0, 64, (4, 17), generator=gen)
            loss = run.update(ids)
            record = schedule.after_step(step, opt)
            loss_d = oracle.step(step, ids)
            assert loss.item() == pytest.approx(loss_d, rel=1e-6 if exact else 1e-5), (step, loss.item() / loss_d - 1)
            moved += record["changed_b"] if record else 0
            for layer in layers:
                d = oracle.layers[layer.name]
                assert int(layer.budget) == d.budget and layer.k_now == d.k_now, (step, layer.name)
                assert torch.equal(_selected(layer, forward=False), d.B), (step, layer.name)
                assert torch.equal(_selected(layer, forward=True), d.A), (step, layer.name)
                torch.testing.assert_close(layer.dense_weight(forward_only=False).to(d.theta.dtype), d.theta, rtol=0,
                                           atol=1e-7 if exact else 2e-4,
                                           msg=lambda m, at=(step, layer.name): f"{at}: {m}")
                budgets_seen.add(int(layer.budget))
    assert moved > 0 or candidates == "dense"  # B changed at some reselection
    if allocation_name == "global":
        assert len(budgets_seen) > 1  # the global threshold gives layers different shares
    if path:
        assert {product for product, _ in paths} == {"forward", "input_grad", "value_grad"}, paths
        assert {p for _, p in paths} == {path}, paths


def test_soft_mask_reaches_blocks_outside_a():
    """Dual averaging: blocks of B outside A get gradient (through the soft mask), and not once frozen."""
    cfg = _config(block=4, warmup_frac=0.0)
    model = build_model(cfg)
    schedule = make_schedule(model, cfg)
    schedule.start(1)
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    model(ids[:, :-1], ids[:, 1:]).backward()
    layer = spartan_layers(model)[0]
    outside = layer.live & ~layer.forward_mask
    assert outside.any() and layer.values.grad[outside].abs().sum() > 0
    for frozen_layer in spartan_layers(model):
        frozen_layer.frozen = True
    model.zero_grad()
    model(ids[:, :-1], ids[:, 1:]).backward()
    assert layer.values.grad[outside].abs().sum() == 0


def test_spartan_stores_only_b():
    """After training steps with reselections: every tensor a Spartan layer holds (parameters,
    buffers, gradient, Adam moments) is B-sized, far below the dense weight."""
    cfg = _config(steps=6, block=4, reselect_every=2, warmup_frac=0.5, finetune_frac=0.0)
    model = build_model(cfg)
    schedule = make_schedule(model, cfg)
    schedule.start(0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    for step in range(1, 7):
        opt.zero_grad()
        model(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()
        schedule.after_step(step, opt)
    for layer in spartan_layers(model):
        held = dict(layer.named_parameters()) | dict(layer.named_buffers()) | {"grad": layer.values.grad}
        held |= {f"state.{k}": v for k, v in opt.state[layer.values].items() if torch.is_tensor(v) and v.ndim}
        for name, tensor in held.items():
            assert tensor.numel() <= layer.k_backward * layer.block**2 < layer.out_features * layer.in_features, name


def test_budget_anneals_from_b_to_the_target():
    cfg = _config(steps=10, warmup_frac=0.5, finetune_frac=0.0)
    model = build_model(cfg)
    schedule = make_schedule(model, cfg)
    schedule.start(0)
    layer = spartan_layers(model)[0]
    assert layer.k_now == layer.k_backward and int(layer.forward_mask.sum()) == layer.k_backward
    seen = []
    for step in range(1, 11):
        schedule.after_step(step, None)
        seen.append(layer.k_now)
        assert int(layer.forward_mask.sum()) == layer.k_now
    assert seen == sorted(seen, reverse=True) and seen[-1] == layer.k_forward and seen[4] == layer.k_forward


# ---------------------------------------------------------------------------------- allocations
def _llama_cfg(allocation_name, n_layers=3, pipeline=2, vocab_size=8192, **sparsity) -> RunConfig:
    s = {"method": "spartan", "density": 0.1, "exploration": 0.1, "granularity": "block", "block_size": 16,
         "allocation": allocation_name} | sparsity
    cfg = RunConfig(model=ModelConfig(vocab_size=vocab_size, d_model=256, n_layers=n_layers, n_heads=4,
                                      max_seq_len=256),
                    sparsity=SparsityConfig(**s), parallel=ParallelConfig(pipeline=pipeline))
    return cfg.validate()


@pytest.mark.parametrize("name", ["uniform", "erk", "pipeline_balanced"])
def test_static_allocations_spend_the_uniform_total_within_each_layers_b(name):
    cfg = _llama_cfg(name)
    budgets = allocation.static_budgets(cfg)
    caps = allocation.layer_caps(cfg)
    assert sum(budgets.values()) == sum(allocation.uniform_budgets(cfg).values())
    assert all(1 <= budgets[n] <= caps[n] for n in budgets)


def test_erk_density_follows_the_layer_shape():
    """Uncapped, a layer's share is ∝ (n_in + n_out)/(n_in·n_out) of its N blocks, i.e. ∝ (rows +
    cols): within one block of exact proportionality (rounding)."""
    cfg = _llama_cfg("erk", pipeline=1, density=0.05, exploration=0.5)
    budgets = allocation.static_budgets(cfg)
    shapes = {s.name: s for s in allocation.sparse_linear_shapes(cfg)}
    total, perimeter = sum(budgets.values()), sum(s.rows + s.cols for s in shapes.values())
    for name, k in budgets.items():
        assert abs(k - total * (shapes[name].rows + shapes[name].cols) / perimeter) <= 1, name
    density = {n: budgets[n] * 256 / (shapes[n].rows * shapes[n].cols) for n in budgets}
    assert density["layers.0.self_attn.q_proj"] > 1.3 * density["layers.0.mlp.up_proj"]


def test_pipeline_balanced_equalises_stage_flops():
    """3 blocks on 2 stages (2 + 1, the LM head on the second): unbalanced, then balanced by the
    allocation to within one block's FLOPs, with the same total."""
    cfg = _llama_cfg("pipeline_balanced", vocab_size=1024)
    assert [s.stage for s in allocation.sparse_linear_shapes(cfg)] == [0] * 14 + [1] * 7
    before = allocation.stage_flops(cfg, allocation.uniform_budgets(cfg))
    after = allocation.stage_flops(cfg, allocation.static_budgets(cfg))
    block_flops = 2 * 16**2
    assert max(before) - min(before) > 100 * block_flops
    assert max(after) - min(after) <= block_flops
    assert sum(after) == pytest.approx(sum(before))


def test_global_allocation_is_one_threshold_over_all_layers():
    """Single process: each layer's budget is its count among torch.topk of every B block's u."""
    cfg = _config(block=4, allocation_name="global")
    model = build_model(cfg)
    layers = spartan_layers(model)
    for layer in layers:  # make layers differ in scale so the split is far from uniform
        with torch.no_grad():
            layer.values.mul_(1 + 3 * (layers.index(layer) % 3))
    make_schedule(model, cfg).start(0)
    scores = [layer.unit_values(torch.nonzero(layer.live).view(-1)).detach() for layer in layers]
    for x in scores:  # every layer keeps its best block
        x[x.argmax()] = torch.inf
    total = sum(layer.k_forward for layer in layers)
    top = torch.topk(torch.cat(scores), total).indices
    bounds = torch.tensor([0] + [len(s) for s in scores]).cumsum(0)
    expected = [int(((top >= lo) & (top < hi)).sum()) for lo, hi in zip(bounds, bounds[1:])]
    assert [int(layer.budget) for layer in layers] == expected
    assert sum(expected) == total and len(set(expected)) > 1


def test_dense_candidates_hold_every_block():
    cfg = _config(block=4, candidates="dense")
    model = build_model(cfg)
    for layer in spartan_layers(model):
        assert layer.k_backward == layer.n_blocks and bool(layer.live.all())


@pytest.mark.parametrize("field,value,message", [
    ("allocation", "erk2", "sparsity.allocation: expected one of: uniform, global, erk, pipeline_balanced"),
    ("beta", 0.0, "sparsity.beta: expected a positive number"),
    ("finetune_frac", 0.9, "sparsity.finetune_frac: expected at most 1 - sparsity.warmup_frac = 0.3"),
    ("candidates", "all", "sparsity.candidates: expected one of: backward_set, dense"),
])
def test_bad_spartan_fields_are_named(field, value, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        _config(warmup_frac=0.7, **{field: value})


@pytest.mark.parametrize("method, allocation_name, expected", [
    ("topkast", "erk", "uniform"),
    ("rigl", "global", "one of uniform, erk"),
    ("static", "pipeline_balanced", "one of uniform, erk"),
])
def test_other_methods_refuse_what_they_cannot_follow(method, allocation_name, expected):
    cfg = RunConfig(sparsity=SparsityConfig(method=method, allocation=allocation_name))
    with pytest.raises(UserError, match=f"sparsity.allocation: expected {expected} with sparsity.method={method}"):
        cfg.validate()


def test_pipeline_balanced_budgets_reach_the_layers_and_the_log():
    cfg = _config(allocation_name="pipeline_balanced", pipeline=2, n_layers=3, block=4)
    model = build_model(cfg)  # one process holding every stage's layers
    schedule = make_schedule(model, cfg)
    schedule.start(0)
    assert {layer.name: int(layer.budget) for layer in spartan_layers(model)} == allocation.static_budgets(cfg)
    assert "forward MFLOP/token per stage" in schedule.describe() and "(uniform) -> " in schedule.describe()
