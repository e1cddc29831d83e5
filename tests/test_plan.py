"""`sparse-lm plan` against real runs: its model-state parts per rank against the tensors of real
DeepSpeed engines (one rank, and tensor 2 × pipeline 2 over four gloo ranks; element and block
granularity; ZeRO-0, ZeRO-1, bf16; ZeRO-Offload's device and host parts), its activation estimate
against the profiler's step peak, and `model_state_bytes` against every tensor alive in the
process (gc), under ZeRO-1 + bf16."""

from __future__ import annotations

import gc
import json

import pytest
import torch

from sparse_lm.config import load_config
from sparse_lm.plan.memory import activations, kernel_workspace, layout_of, model_state, resolved
from sparse_lm.train.memory import allocated_peak_bytes
from tests.cli_runs import REPO, run_cli
from tests.distributed import run_distributed

# The plan's parts that `model_state_bytes` measures (the rotary tables are derived, not state).
MEASURED_PARTS = ("parameters", "gradients", "master_weights", "optimizer_moments", "offload_buffers", "indices_masks",
                  "score_caches", "offload_host")
SINGLE_CASES = [  # (overrides) on configs/tiny.yaml, one rank
    ["sparsity.granularity=element", "parallel.zero_stage=0", "train.precision=fp32"],
    ["sparsity.granularity=element", "parallel.zero_stage=1", "train.precision=fp32", "sparsity.complement=offload"],
    ["sparsity.granularity=block", "parallel.zero_stage=0", "train.precision=fp32"],
    ["sparsity.granularity=block", "parallel.zero_stage=1", "train.precision=fp32"],
    ["sparsity.granularity=block", "parallel.zero_stage=0", "train.precision=bf16"],  # runs ZeRO-1
    ["sparsity.method=rigl", "sparsity.allocation=erk", "sparsity.granularity=block", "parallel.zero_stage=1",
     "train.precision=fp32"],  # a size per layer
]
PIPELINE_CASES = [  # on configs/tiny-tp2-pp2.yaml, four ranks
    ["sparsity.granularity=element", "parallel.zero_stage=0", "train.precision=fp32"],
    ["sparsity.granularity=block", "parallel.zero_stage=1", "train.precision=fp32"],
]


def _live_storages() -> dict[int, int]:
    """Bytes of every CPU tensor storage alive in this process, by address."""
    live = {}
    for obj in gc.get_objects():
        if torch.is_tensor(obj) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            live[storage.data_ptr()] = storage.nbytes()
    return live


def _measure_at_step(engine, optimizer, before: dict[int, int] | None) -> dict:
    """Wrap `optimizer.step` so that its second call (Adam creates its moments at the first) records
    `model_state_bytes` (and, given the storages alive `before` the engine was built, gc's count of
    those added since, less the derived rotary tables) while the step's gradients are still there;
    returns the record."""
    from sparse_lm.train.memory import model_state_bytes

    measured, inner_step, calls = {}, optimizer.step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            measured.update(model_state_bytes(engine.module, optimizer))
            if before is not None:
                gc.collect()
                derived = {b.untyped_storage().data_ptr() for n, b in engine.module.named_buffers()
                           if n.endswith(("cos", "sin"))}
                measured["gc"] = sum(n for ptr, n in _live_storages().items()
                                     if ptr not in before and ptr not in derived)
        return inner_step(*args, **kwargs)

    optimizer.step = step
    return measured


def _train_and_measure(rank: int, world: int, config: str, cases: list[list[str]], with_gc: bool = False) -> list:
    """Per case: (pipeline stage, model_state_bytes measured at the optimizer step, gc's count)."""
    import deepspeed

    from sparse_lm.model import resolve_vocab
    from sparse_lm.model.build import build_model
    from sparse_lm.parallel.state import init_distributed
    from sparse_lm.train.loop import make_engine

    deepspeed.init_distributed(dist_backend="gloo")  # the pipeline engine talks through DeepSpeed's comm layer
    results = []
    for overrides in cases:
        cfg = load_config(REPO / config, ["train.micro_batch=2", "train.seq_len=32", *overrides])
        topo = init_distributed(cfg.parallel.tensor, cfg.parallel.pipeline)
        cfg.model = resolve_vocab(cfg.model, cfg.data.vocab_size)
        gc.collect()
        before = _live_storages() if with_gc else {}
        model = build_model(cfg, topology=topo)
        engine, optimizer, _ = make_engine(model, cfg, topo)
        measured = _measure_at_step(engine, optimizer, before if with_gc else None)
        gen = torch.Generator().manual_seed(0)
        rows = [torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.train.seq_len + 1), generator=gen)
                for _ in range(cfg.train.grad_accum)]
        for _ in range(2):
            if topo.pipeline > 1:
                engine.train_batch(iter([(r[:, :-1], r[:, 1:]) for r in rows]))
                continue
            for r in rows:
                loss = engine(r[:, :-1], r[:, 1:])
                engine.backward(loss)
                del loss
                engine.step()
        results.append((topo.pp_rank, measured))
        del engine, optimizer, model
        gc.collect()
    return results


def _check_against_plan(config: str, cases: list[list[str]], results: list, world: int) -> None:
    for overrides, (stage, measured) in zip(cases, results):
        cfg = resolved(load_config(REPO / config, ["train.micro_batch=2", "train.seq_len=32", *overrides]))
        planned = model_state(cfg, layout_of(cfg, world), stage)
        for part in MEASURED_PARTS:
            assert planned[part] == pytest.approx(measured[part], rel=0.02, abs=256), (overrides, stage, part)
        assert measured["engine_buffers"] == 0, (overrides, stage)
        assert sum(planned[p] for p in MEASURED_PARTS) == pytest.approx(measured["total"], rel=0.02), (overrides, stage)


def test_plan_matches_the_engines_tensors_on_one_rank():
    (results,) = run_distributed(_train_and_measure, 1, "configs/tiny.yaml", SINGLE_CASES, timeout=300)
    _check_against_plan("configs/tiny.yaml", SINGLE_CASES, results, 1)


OFFLOAD_CASES = [  # ZeRO-Offload on configs/tiny.yaml, one rank
    ["sparsity.granularity=block", "parallel.zero_stage=1", "train.precision=fp32", "parallel.offload_optimizer=true"],
    ["sparsity.granularity=element", "parallel.zero_stage=1", "train.precision=bf16", "parallel.offload_optimizer=true",
     "train.grad_accum=2"],
]


def _gradients_between_micro_batches(rank: int, world: int, overrides: list[str]) -> int:
    """Bytes of `model_state_bytes`' gradients after the first micro-batch's backward pass of the
    second step: what a run holds from there until the last micro-batch."""
    import deepspeed

    from sparse_lm.model import resolve_vocab
    from sparse_lm.model.build import build_model
    from sparse_lm.parallel.state import init_distributed
    from sparse_lm.train.loop import make_engine
    from sparse_lm.train.memory import model_state_bytes

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(REPO / "configs/tiny.yaml", ["train.micro_batch=2", "train.seq_len=32", *overrides])
    topo = init_distributed(1, 1)
    cfg.model = resolve_vocab(cfg.model, cfg.data.vocab_size)
    engine, optimizer, _ = make_engine(build_model(cfg, topology=topo), cfg, topo)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    for step in range(2):
        for micro in range(cfg.train.grad_accum):
            engine.backward(engine(ids[:, :-1], ids[:, 1:]))
            if step == 1 and micro == 0:
                gradients = model_state_bytes(engine.module, optimizer)["gradients"]
            engine.step()
    return gradients


def test_plan_matches_an_offloaded_engine_on_one_rank():
    """Under ZeRO-Offload the plan's device part (weights, gradients, the device staging buffer)
    and host part (masters, moments, DeepSpeed's host buffers) against a real engine's tensors at
    the optimizer step, bf16 and fp32; with gradient accumulation the gradients DeepSpeed keeps on
    the device until the last micro-batch, measured after the first."""
    from sparse_lm.plan.memory import rank_memory

    (results,) = run_distributed(_train_and_measure, 1, "configs/tiny.yaml", OFFLOAD_CASES, timeout=300)
    for overrides, (_, measured) in zip(OFFLOAD_CASES, results):
        cfg = resolved(load_config(REPO / "configs/tiny.yaml", ["train.micro_batch=2", "train.seq_len=32", *overrides]))
        layout = layout_of(cfg, 1)
        planned = rank_memory(cfg, layout, 0)
        if cfg.train.grad_accum > 1:  # at the step the accumulated gradients are on the host already
            (measured["gradients_accumulating"],) = run_distributed(_gradients_between_micro_batches, 1, overrides)
            assert planned["parts"]["gradients"] == pytest.approx(measured["gradients_accumulating"], rel=0.02)
            measured["total"] += measured["gradients_accumulating"] - measured["gradients"]
            measured["gradients"] = measured["gradients_accumulating"]
        for part in MEASURED_PARTS:
            assert planned["parts"][part] == pytest.approx(measured[part], rel=0.02, abs=256), (overrides, part)
        host = sum(measured[p] for p in layout.host_parts)
        assert measured["offload_buffers"] > 0 and planned["host_bytes"] == pytest.approx(host, rel=0.05), overrides
        device = measured["total"] - host
        assert planned["model_state_bytes"] - planned["parts"]["rotary_tables"] == pytest.approx(device, rel=0.05)


def test_plan_matches_every_rank_of_tensor_2_pipeline_2():
    per_rank = run_distributed(_train_and_measure, 4, "configs/tiny-tp2-pp2.yaml", PIPELINE_CASES, timeout=300)
    assert sorted(stage for results in per_rank for stage, _ in results[:1]) == [0, 0, 1, 1]
    for results in per_rank:
        _check_against_plan("configs/tiny-tp2-pp2.yaml", PIPELINE_CASES, results, 4)


def test_model_state_bytes_counts_every_tensor_under_zero1_bf16():
    """Under bf16 + ZeRO-1 the engine holds bf16 weights and gradients (flat buffers) and fp32 masters
    beside Adam's moments: the count is every tensor the engine added to the process, nothing
    missed or counted twice (views of one flat buffer are one storage)."""
    cases = [["sparsity.granularity=block", "train.precision=bf16", "parallel.zero_stage=1"]]
    ((_, measured),) = run_distributed(_train_and_measure, 1, "configs/tiny.yaml", cases, True, timeout=300)[0]
    assert measured["master_weights"] > 0 and measured["gradients"] > 0
    assert measured["master_weights"] == pytest.approx(2 * measured["parameters"], rel=0.01)  # fp32 of bf16
    assert measured["total"] == pytest.approx(measured["gc"], rel=1e-3, abs=1024)


@pytest.mark.parametrize("overrides", [["sparsity.method=dense", "sparsity.supar=false"],
                                       ["sparsity.granularity=element"],
                                       ["sparsity.granularity=block", "model.n_kv_heads=2"]])
def test_activation_estimate_matches_the_profiled_step(overrides):
    from sparse_lm.model.build import build_model

    cfg = resolved(load_config(REPO / "configs/tiny.yaml", ["train.precision=fp32", "train.micro_batch=4",
                                                            "train.seq_len=256", *overrides]))
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.train.seq_len + 1))

    def forward_backward():
        model(ids[:, :-1], ids[:, 1:]).backward()

    forward_backward()  # the gradients exist before the measured pass, as in training
    measured = allocated_peak_bytes(forward_backward)
    layout = layout_of(cfg)
    estimate = activations(cfg, layout, 0, checkpointing=False)
    planned = estimate["saved"] + estimate["transient"] + kernel_workspace(cfg, layout)
    assert planned == pytest.approx(measured, rel=0.15), (planned, measured)


def test_plan_cli_answers_for_13b_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    proc = run_cli("plan", "--config", str(REPO / "configs/llama-13b.yaml"), "--gpu-memory-gib", "80",
                   "--json", str(out))
    assert "fits 80 GiB per GPU: sparse yes, dense no" in proc.stdout
    report = json.loads(out.read_text())
    parts = report["per_rank"]["parts"]
    assert report["per_rank"]["total_bytes"] == sum(v for k, v in parts.items() if k != "offload_host")
    assert report["fits"] is True and report["dense"]["total_bytes"] > 80 * 2**30
    assert report["flops_per_token"]["sparse"] < 0.2 * report["flops_per_token"]["dense"]
    assert "training FLOPs per token: sparse" in proc.stdout
    assert report["flops_per_token"]["training"]["sparse"] < 0.3 * report["flops_per_token"]["training"]["dense"]
    assert report["largest_fitting"]["sparse"] == "13B"
    bad = run_cli("plan", "--config", str(REPO / "configs/llama-70b.yaml"), "--world", "3", check=False)
    assert bad.returncode == 2 and "--world 3" in bad.stderr


# The block linears of SMALL (d_model 64, 2 key/value heads of 16, FFN 128): (weights, |A|, |B|) at
# D = M = 0.1, counted by hand: |A| = ⌈0.1·n⌉, |B| = ⌈0.2·n⌉, in weights (element) or 16×16 blocks.
SMALL = {"model": {"vocab_size": 320, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 128,
                   "max_seq_len": 32},
         "train": {"seq_len": 32}}
ELEMENT_SETS = {"q_proj": (4096, 410, 820), "k_proj": (2048, 205, 410), "v_proj": (2048, 205, 410),
                "o_proj": (4096, 410, 820), "gate_proj": (8192, 820, 1639), "up_proj": (8192, 820, 1639),
                "down_proj": (8192, 820, 1639)}
BLOCK_SETS = {"q_proj": (16, 2, 4), "k_proj": (8, 1, 2), "v_proj": (8, 1, 2), "o_proj": (16, 2, 4),
              "gate_proj": (32, 4, 7), "up_proj": (32, 4, 7), "down_proj": (32, 4, 7)}
FULL_WEIGHTS = 2 * 4096 + 2 * 2048 + 3 * 8192


def _training_by_hand(sparsity: dict) -> float:
    """Training FLOPs per token of SMALL from the definition: 2 FLOPs per weight for each of forward,
    input gradient (both over A) and weight gradient (over B); everything dense costs all three
    over all its weights; Spartan's A is its mean over the run, B's size for the first warmup_frac
    (falling linearly) and then its budget."""
    seq, d, vocab, layers = 32, 64, 320, 2
    dense_parts = layers * 2 * seq * d + 2 * d * vocab  # attention scores and values, the LM head
    method = sparsity.get("method")
    sets, unit = (BLOCK_SETS, 256) if sparsity.get("granularity") == "block" else (ELEMENT_SETS, 1)
    per_layer = 0.0
    for name, (n, a, b) in sets.items():
        if method == "dense" or name not in sparsity.get("targets", sets):
            per_layer += 3 * 2 * n * unit
            continue
        if method == "static":
            b = a
        if method == "spartan":
            w = sparsity["warmup_frac"]
            a = w * (a + b) / 2 + (1 - w) * a
        per_layer += (2 * a + 2 * a + 2 * b) * unit
    return 3 * dense_parts + layers * per_layer


@pytest.mark.parametrize("sparsity", [
    {"method": "topkast"},
    {"method": "static"},
    {"method": "dense"},
    {"method": "topkast", "targets": ["q_proj", "down_proj"]},
    {"method": "spartan", "granularity": "block", "block_size": 16, "warmup_frac": 0.3},
])
def test_training_flops_follow_their_definition(sparsity):
    from sparse_lm.config import config_from_dict
    from sparse_lm.plan.flops import plan_flops

    cfg = config_from_dict({**SMALL, "sparsity": {"density": 0.1, "exploration": 0.1, **sparsity}})
    training = plan_flops(cfg)["training"]
    dense = 3 * (2 * 2 * 32 * 64 + 2 * 64 * 320 + 2 * 2 * FULL_WEIGHTS)
    assert training["sparse"] == pytest.approx(_training_by_hand(sparsity), rel=1e-12)
    assert training["dense"] == pytest.approx(dense, rel=1e-12)
    assert training["ratio"] == pytest.approx(training["sparse"] / dense, rel=1e-12)


# d_model 1024, 8 layers, 32 tokens: gradients of ~110 MiB (vocabulary 4096), against which the
# gradient reduction's copy decides the peak; with a 32000 vocabulary the embedding's gradient does.
STEP_CASE = ["model.d_model=1024", "model.n_heads=8", "model.n_layers=8", "train.seq_len=32", "train.micro_batch=1",
             "sparsity.granularity=block", "sparsity.block_size=16", "train.precision=fp32"]


def _step_peaks(rank: int, world: int, overrides: list[str]) -> list[int]:
    """Per training step after the first (which also creates Adam's moments): the most bytes the
    step (forward, backward, optimizer step) holds at once above what was live before it, from the
    profiler's record of every allocation (RSS would follow glibc, which keeps freed heap pages)."""
    from sparse_lm.model import resolve_vocab
    from sparse_lm.model.build import build_model
    from sparse_lm.parallel.state import init_distributed
    from sparse_lm.train.loop import make_engine

    cfg = load_config(REPO / "configs/tiny.yaml", overrides)
    topo = init_distributed(cfg.parallel.tensor, cfg.parallel.pipeline)
    cfg.model = resolve_vocab(cfg.model, cfg.data.vocab_size)
    engine, _, _ = make_engine(build_model(cfg, topology=topo), cfg, topo)
    ids = torch.randint(0, cfg.model.vocab_size, (1, cfg.train.seq_len + 1), generator=torch.Generator().manual_seed(0))

    def step():
        engine.backward(engine(ids[:, :-1], ids[:, 1:]))
        engine.step()

    step()
    return [allocated_peak_bytes(step) for _ in range(2)]


@pytest.mark.parametrize("zero_stage, world, vocab, offload", [(0, 2, 4096, False), (1, 1, 4096, False),
                                                              (1, 1, 32000, False), (1, 1, 32000, True)])
def test_step_peak_matches_a_real_step(zero_stage, world, vocab, offload):
    """What a step holds above the weights and Adam's moments (DeepSpeed frees the gradients after
    each step): the gradients, the reduction's copy of them at the end of the backward pass (none
    without ZeRO on one replica, where the engine skips the all-reduce), and the optimizer step's
    transient — under ZeRO-1 its flat fp32 gradient partition; the fused AdamW over it (and over
    each parameter without ZeRO) adds nothing, where the single-tensor AdamW it replaced held two
    fp32 temporaries of the partition. With ZeRO-Offload the step's peak is the backward pass's
    end, the reduce bucket beside every gradient (`step_workspace`). The plan's total less its
    gradient-free state must match every rank's profiled peak."""
    from sparse_lm.plan.memory import rank_memory, reduce_transient, step_workspace

    overrides = [*STEP_CASE, f"data.vocab_size={vocab}", f"parallel.zero_stage={zero_stage}",
                 f"parallel.offload_optimizer={str(offload).lower()}"]
    measured = run_distributed(_step_peaks, world, overrides, timeout=300)
    cfg = resolved(load_config(REPO / "configs/tiny.yaml", overrides))
    layout = layout_of(cfg, world)
    planned = rank_memory(cfg, layout, 0)
    above_state = planned["total_bytes"] - planned["model_state_bytes"] + planned["parts"]["gradients"]
    if not offload:
        assert (step_workspace(cfg, layout, 0) == planned["parts"]["master_weights"]) == (zero_stage == 1)
    assert (reduce_transient(cfg, layout, 0) > 0) == (zero_stage == 1 or world > 1)
    for rank in measured:
        assert max(rank) == pytest.approx(above_state, rel=0.05), (measured, planned["parts"])


def test_step_without_zero_adds_nothing_to_the_gradients():
    """One replica without ZeRO: no reduction copy, and the fused AdamW allocates nothing, so a
    step's peak is its gradients and the loss's logits (the single-tensor AdamW's temporaries of
    the largest parameter, the 32000 × 1024 embedding, would add 262 MB, 76%). The plan's
    backward-pass part is an upper bound here: it counts the saved activations and the
    embedding's gradient on top of all the gradients, which a step holds at different moments."""
    from sparse_lm.plan.memory import rank_memory

    overrides = [*STEP_CASE, "data.vocab_size=32000", "parallel.zero_stage=0"]
    (measured,) = run_distributed(_step_peaks, 1, overrides, timeout=300)
    cfg = resolved(load_config(REPO / "configs/tiny.yaml", overrides))
    planned = rank_memory(cfg, layout_of(cfg), 0)
    gradients = planned["parts"]["gradients"]
    assert gradients < max(measured) < 1.05 * gradients
    assert max(measured) < planned["total_bytes"] - planned["model_state_bytes"] + gradients


@pytest.mark.parametrize("preset, gpu, host", [("configs/llama-13b-24gb.yaml", 24, 64),
                                               ("configs/llama-70b-1gpu.yaml", 80, 384)])
def test_offload_presets_fit_one_gpu_and_dense_does_not(preset, gpu, host, tmp_path):
    out = tmp_path / "plan.json"
    proc = run_cli("plan", "--config", str(REPO / preset), "--gpu-memory-gib", str(gpu), "--host-memory-gib",
                   str(host), "--json", str(out))
    assert f"fits {gpu} GiB per GPU and {host} GiB of host memory: sparse yes, dense no" in proc.stdout
    assert "optimizer offload per step:" in proc.stdout and "master_weights (host memory)" in proc.stdout
    report = json.loads(out.read_text())
    rank = report["per_rank"]
    assert report["layout"]["offload"] and report["layout"]["tensor"] * report["layout"]["data"] == 1
    assert rank["total_bytes"] == sum(v for k, v in rank["parts"].items() if k not in
                                      ("offload_host", "master_weights", "optimizer_moments", "offload_buffers"))
    assert rank["host_bytes"] > 3 * rank["parts"]["parameters"]  # 12+ bytes per weight against 2
    too_small = run_cli("plan", "--config", str(REPO / preset), "--gpu-memory-gib", str(gpu), "--host-memory-gib",
                        str(rank["host_bytes"] / 2**30 * 0.9))
    assert "sparse no" in too_small.stdout
