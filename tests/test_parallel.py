"""Tensor, pipeline and data parallelism over sparse shards, against the single-process run (real
launcher, gloo ranks).

Every comparison is with a single-process run of the same config, seed and micro-batches: TP=2,
TP=2 × PP=2 (also for Spartan), TP=2 × DP=2 and PP=2 × DP=2 (ZeRO-1), with SμPar and per-group
learning rates, must give the same loss at
every step (12 steps, reselection at 4 and 8) to 1e-5 relative in fp32, select the same sets, and
hold the same weights once their shards are merged.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cli_runs import REPO, free_port, records, run_cli, write_config

STEPS_TP = 12
RESELECTS = [4, 8]  # every 4 steps, until the end (Top-KAST) or the finetune (Spartan, from step 12)
LR = 3e-3  # at 1e-2, Adam turns rounding differences into near-tie flips of A within ~20 steps
MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32}
# "element" also runs SμPar with a learning rate per group (sparse 3e-3 · 0.2 / 0.2), so every
# layout below checks that each shard and stage puts its parameters in the right group.
GROUP_LRS = {"lr_mult_embedding": 2.0, "lr_mult_head": 1.5, "lr_mult_hidden": 0.2, "lr_mult_norm": 0.5}
VARIANTS = {
    "element": {"method": "topkast", "density": 0.2, "exploration": 0.2, "reselect_every": 4, "supar": True},
    "block-offload": {"method": "topkast", "density": 0.25, "exploration": 0.25, "reselect_every": 4,
                      "granularity": "block", "block_size": 8, "complement": "offload"},
    # Spartan with one threshold over every layer of both stages and shards; budget annealed over
    # steps 1-4, A and B frozen from step 12 (after the last reselection).
    "spartan-global": {"method": "spartan", "density": 0.25, "exploration": 0.25, "reselect_every": 4,
                       "granularity": "block", "block_size": 8, "allocation": "global", "warmup_frac": 0.3,
                       "finetune_frac": 0.05},
    # RigL: each shard's growth scores from its own inputs and output gradients, selected over the
    # shards; over data-parallel replicas, the gradient chunks summed first.
    "rigl": {"method": "rigl", "density": 0.25, "reselect_every": 4, "granularity": "block", "block_size": 8,
             "allocation": "erk"},  # layers of their own sizes, the same on every layout
}


def _sections(variant: str, tensor: int, data: int = 1, accum: int = 2, **parallel) -> dict:
    """The config of a run on tensor × data × pipeline ranks with the same global batch of 4
    sequences, in `accum` micro-batches per replica (a pipeline needs ≥ 2 for its stages to
    overlap; the one-process reference splits its batch the same way, as summation order is part
    of fp32)."""
    if data > 1:
        parallel.update(zero_stage=1, verify_replicas=True)
    if variant != "element":  # 8×8-block grids: one shard may take well over its half of B's 32 blocks;
        parallel.setdefault("shard_headroom", 1.0)  # room for all of B, so no shard is capacity-bound
    return {"model": MODEL, "sparsity": VARIANTS[variant], "parallel": {"tensor": tensor, **parallel},
            "train": {"steps": STEPS_TP, "micro_batch": 4 // data // accum, "grad_accum": accum, "lr": LR,
                      **(GROUP_LRS if variant == "element" else {})},
            "checkpoint": {"every": 6, "keep": 3}}


def _launcher(ranks: int) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", free_port()]


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory, data_dir):
    """Runs by (variant, tensor, data, pipeline size, activation checkpointing), trained on first use."""
    done: dict[tuple, Path] = {}

    def get(variant: str, tensor: int, data: int = 1, pipeline: int = 1, recompute: bool = False) -> Path:
        key = (variant, tensor, data, pipeline, recompute)
        if key not in done:
            tmp = tmp_path_factory.mktemp(f"{variant}-tp{tensor}-dp{data}-pp{pipeline}{'-recompute' * recompute}")
            sections = _sections(variant, tensor, data, pipeline=pipeline)
            sections["train"]["activation_checkpointing"] = recompute
            config = write_config(tmp, data_dir, "run", **sections)
            if tensor * data * pipeline == 1:
                run_cli("pretrain", "--config", str(config))
            else:
                run_cli(str(REPO / "launch" / "pretrain.py"), "--config", str(config),
                        launcher=_launcher(tensor * data * pipeline))
            done[key] = tmp / "run"
        return done[key]

    return get


def _assert_same_run(got: Path, ref: Path, rel: float) -> None:
    got_sel, ref_sel = records(got, "reselect"), records(ref, "reselect")
    assert [r["step"] for r in got_sel] == [r["step"] for r in ref_sel] == RESELECTS
    for a in got_sel:
        assert a["capacity_bound_layers"] == 0
    # The sets themselves (first: a wrong set explains a wrong loss), merged over the shards: the
    # checkpoints at steps 6 and 12 hold B (and, for Top-KAST, A) as reselected at steps 4 and 8;
    # Spartan re-picks A after every step.
    for step in (6, 12):
        want, have = _selected_sets(ref, step), _selected_sets(got, step)
        assert set(have) == set(want)
        for name in want:
            assert torch.equal(have[name][0], want[name][0]), (step, name, "B")
            assert torch.equal(have[name][1], want[name][1]), (step, name, "A")
    ref_steps = {r["step"]: r["loss"] for r in records(ref, "step")}
    steps = records(got, "step")
    assert [r["step"] for r in steps] == list(range(1, STEPS_TP + 1))
    for r in steps:
        assert r["loss"] == pytest.approx(ref_steps[r["step"]], rel=rel), r["step"]


def _selected_sets(run: Path, step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{sparse layer: (B, A)} of the checkpoint at `step`, as ascending grid positions of the whole
    layer (the shards merged)."""
    from sparse_lm.checkpoint.model_io import load_trained_model
    from sparse_lm.sparsity.storage import SparseLinear

    model = load_trained_model(run / "checkpoints" / f"step_{step:08d}")[0]
    return {name: (torch.sort(m.index.long()[m.live]).values, torch.sort(m.index.long()[m.forward_mask]).values)
            for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def _merged_weights(run: Path) -> dict[str, torch.Tensor]:
    """Every weight of the final checkpoint as one process sees it: A of each sparse layer
    (dense), all current values (A, B \\ A and the complement), and the dense parameters."""
    from sparse_lm.checkpoint.model_io import load_trained_model
    from sparse_lm.sparsity.storage import SparseLinear

    model, _, manifest = load_trained_model(run / "checkpoints")
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            out[f"{name}.A"] = module.dense_weight()
            out[f"{name}.all"] = module.dense_weight(forward_only=False)
    for name, param in model.named_parameters():
        if not name.endswith(".values"):
            out[name] = param.detach()
    return out


@pytest.mark.parametrize("variant", ["block-offload", "element"])
def test_tensor_parallel_matches_one_process(tp_runs, variant):
    single, tp2 = tp_runs(variant, 1), tp_runs(variant, 2)
    _assert_same_run(tp2, single, rel=1e-5)
    manifest = json.loads((tp2 / "checkpoints" / "step_00000012" / "manifest.json").read_text())
    assert manifest["topology"] == {"tensor": 2, "pipeline": 1, "data": 1}
    assert {"model-tp00-pp00.safetensors", "model-tp01-pp00.safetensors"} <= set(manifest["files"])
    want, got = _merged_weights(single), _merged_weights(tp2)
    assert set(got) == set(want)
    # Adam divides by √v: a rounding-level gradient difference can move a weight by ~lr · 1e-3, so
    # weights (of size ~1e-2) agree to 1e-4; a wrong shard mapping would be off by their own size.
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-3, atol=1e-4), key


def test_tensor_and_data_parallel_with_zero1_match_one_process(tp_runs):
    _assert_same_run(tp_runs("element", 2, data=2), tp_runs("element", 1), rel=1e-5)


def test_pipeline_and_data_parallel_with_zero1_match_one_process(tp_runs):
    """PP 2 × DP 2 with ZeRO-1: DeepSpeed's pipeline engine partitions Adam's state over the
    replicas and clips itself; reselection rewrites slots through its fp32 master partitions."""
    _assert_same_run(tp_runs("element", 1, data=2, pipeline=2), tp_runs("element", 1), rel=1e-5)


def test_tensor_and_pipeline_parallel_match_one_process(tp_runs):
    """TP 2 × PP 2 on 4 ranks (DeepSpeed's pipeline engine, two micro-batches per step): same
    losses and selections; the four shard files merge into the single-process weights."""
    single, both = tp_runs("element", 1), tp_runs("element", 2, pipeline=2)
    _assert_same_run(both, single, rel=1e-5)
    manifest = json.loads((both / "checkpoints" / "step_00000012" / "manifest.json").read_text())
    assert manifest["topology"] == {"tensor": 2, "pipeline": 2, "data": 1}
    assert {f"model-tp{t:02d}-pp{p:02d}.safetensors" for t in (0, 1) for p in (0, 1)} <= set(manifest["files"])
    want, got = _merged_weights(single), _merged_weights(both)
    assert set(got) == set(want)
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-3, atol=1e-4), key


def test_rigl_on_tensor_and_pipeline_parallel_and_data_parallel_matches_one_process(tp_runs):
    """RigL (ERK: each layer its own size) on TP 2 × PP 2 and on two data-parallel replicas (ZeRO-1,
    replicas verified alike): the same losses, the same blocks dropped and grown at every update,
    the same weights."""
    single = tp_runs("rigl", 1)
    for run in (tp_runs("rigl", 2, pipeline=2), tp_runs("rigl", 1, data=2)):
        _assert_same_run(run, single, rel=1e-5)
        want, got = _merged_weights(single), _merged_weights(run)
        for key in want:
            assert torch.allclose(got[key], want[key], rtol=1e-3, atol=1e-4), key


def test_spartan_on_tensor_and_pipeline_parallel_matches_one_process(tp_runs):
    """Spartan, `global` allocation, TP 2 × PP 2: the soft top-k's μ over each layer's shards, the
    hard threshold of the allocation over all four ranks — same losses, the same blocks moving at
    every reselection, the same per-layer budgets (exact in total) and weights."""
    single, both = tp_runs("spartan-global", 1), tp_runs("spartan-global", 2, pipeline=2)
    _assert_same_run(both, single, rel=1e-5)
    want, got = _merged_weights(single), _merged_weights(both)
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-3, atol=1e-4), key
    from sparse_lm.checkpoint.model_io import load_trained_model
    from sparse_lm.sparsity.spartan import spartan_layers

    budgets = [{layer.name: int(layer.budget) for layer in spartan_layers(load_trained_model(run / "checkpoints")[0])}
               for run in (single, both)]
    assert budgets[0] == budgets[1] and len(set(budgets[0].values())) > 1
    assert sum(budgets[0].values()) == sum(-(-layer_blocks // 4) for layer_blocks in _block_counts())


def test_tensor_and_pipeline_parallel_runs_are_identical_with_recomputed_blocks(tp_runs):
    """Spartan on TP 2 × PP 2 with activation checkpointing: the recomputed forward repeats the
    soft top-k's and the row-parallel all-reduces inside backward, on both shards of every stage
    in step — the same loss at every step, bit for bit, and the same final weights, masks and
    budgets as the run that keeps its activations."""
    kept, redone = tp_runs("spartan-global", 2, pipeline=2), tp_runs("spartan-global", 2, pipeline=2, recompute=True)
    kept_steps, redone_steps = records(kept, "step"), records(redone, "step")
    assert [r["step"] for r in redone_steps] == list(range(1, STEPS_TP + 1))
    assert [r["loss"] for r in redone_steps] == [r["loss"] for r in kept_steps]
    assert [r["step"] for r in records(redone, "reselect")] == RESELECTS
    for t in (0, 1):
        for p in (0, 1):
            name = f"model-tp{t:02d}-pp{p:02d}.safetensors"
            want = load_file(kept / "checkpoints" / f"step_{STEPS_TP:08d}" / name)
            got = load_file(redone / "checkpoints" / f"step_{STEPS_TP:08d}" / name)
            assert got.keys() == want.keys()
            for key in want:
                assert torch.equal(got[key], want[key]), (name, key)


def _block_counts() -> list[int]:
    """8×8 blocks of each sparse linear of MODEL (d 64, 2 layers, 4 heads, 2 k/v heads, FFN 192)."""
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (192, 64), (192, 64), (64, 192)]
    return [rows * cols // 64 for rows, cols in shapes] * MODEL["n_layers"]


def test_each_rank_stores_only_its_shard_of_b(tp_runs):
    """Per rank: the q_proj shard has capacity ⌈k_B / 2 · 1.25⌉ slots, never a dense weight."""
    from safetensors.torch import load_file

    step = tp_runs("element", 2) / "checkpoints" / "step_00000012"
    q = "layers.0.self_attn.q_proj"
    k_b = int(0.4 * 64 * 64) + (0.4 * 64 * 64 % 1 > 0)
    used = 0
    for rank in (0, 1):
        shard = load_file(step / f"model-tp{rank:02d}-pp00.safetensors")
        assert f"{q}.weight" not in shard
        assert shard[f"{q}.values"].shape[0] == -(-k_b * 5 // 8)  # ⌈k_B/2 · 1.25⌉
        assert shard["embed_tokens.weight"].shape[0] * 2 == 512  # vocabulary split over the ranks
        used += int((shard[f"{q}.index"] < 32 * 64).sum())
    assert used == k_b  # the layer's budget is exact over the two shards


def test_eval_reads_a_tensor_parallel_checkpoint_on_one_process(tp_runs, tmp_path):
    results = []
    for run in (tp_runs("element", 1), tp_runs("element", 2)):
        out = tmp_path / f"{run.parent.name}.json"
        run_cli("eval", "--checkpoint", str(run / "checkpoints"), "--corpus", "heldout", "--context", "32",
                "--json", str(out))
        results.append(json.loads(out.read_text()))
    assert results[1]["tokens"] == results[0]["tokens"]
    assert results[1]["loss"] == pytest.approx(results[0]["loss"], rel=1e-5)


def test_tensor_parallel_resume_is_exact(tp_runs, data_dir, tmp_path):
    run = tp_runs("element", 2)
    ckpt = tmp_path / "resumed" / "checkpoints"
    ckpt.mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step_00000006", ckpt / "step_00000006")
    (ckpt / "latest").write_text("step_00000006\n")
    config = write_config(tmp_path, data_dir, "resumed", **_sections("element", 2))
    run_cli(str(REPO / "launch" / "pretrain.py"), "--config", str(config), "--resume", launcher=_launcher(2))
    full = {r["step"]: r["loss"] for r in records(run, "step")}
    resumed = records(tmp_path / "resumed", "step")
    assert [r["step"] for r in resumed] == list(range(7, STEPS_TP + 1))
    for r in resumed:
        assert r["loss"] == pytest.approx(full[r["step"]], rel=1e-6, abs=1e-6), r["step"]


def test_a_killed_rank_then_resume_reproduces_the_tensor_parallel_run(tp_runs, data_dir, tmp_path):
    """Rank 1 of a TP 2 run is SIGKILLed as step 8 starts (after the step-6 checkpoint): rank 0
    stops with one line within `parallel.timeout_s`, step 6 stays the latest checkpoint, and
    `--resume` on two ranks gives the uninterrupted run's losses for steps 7-12."""
    sections = _sections("element", 2, timeout_s=20)
    config = write_config(tmp_path, data_dir, "killed", **sections)
    proc = run_cli(str(REPO / "launch" / "pretrain.py"), "--config", str(config), launcher=_launcher(2), check=False,
                   env={"SPARSE_LM_FAULTS": "kill_rank1@8"})
    assert proc.returncode != 0
    assert "another rank probably died or stalled" in proc.stdout + proc.stderr
    ckpt = tmp_path / "killed" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000006"
    run_cli(str(REPO / "launch" / "pretrain.py"), "--config", str(config), "--resume", launcher=_launcher(2))
    full = {r["step"]: r["loss"] for r in records(tp_runs("element", 2), "step")}
    resumed = {r["step"]: r["loss"] for r in records(tmp_path / "killed", "step")}  # the last attempt's
    for step in range(7, STEPS_TP + 1):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-6), step


def test_other_topology_is_refused_with_a_pointer_to_convert(tp_runs, data_dir, tmp_path):
    ckpt = tmp_path / "one" / "checkpoints"
    shutil.copytree(tp_runs("element", 2) / "checkpoints", ckpt)
    config = write_config(tmp_path, data_dir, "one", **_sections("element", 1))
    proc = run_cli("pretrain", "--config", str(config), "--resume", check=False)
    assert proc.returncode == 2
    assert "tensor=2" in proc.stderr and "sparse-lm convert" in proc.stderr


@pytest.mark.parametrize("override, field", [
    ({"parallel": {"tensor": 3}}, "parallel.tensor"),
    ({"sparsity": {"method": "topkast", "granularity": "block", "block_size": 64}, "parallel": {"tensor": 2}},
     "sparsity.block_size"),
])
def test_bad_tensor_parallel_config_is_one_line(data_dir, tmp_path, override, field):
    sections = {"model": MODEL, **override}
    config = write_config(tmp_path, data_dir, "bad", **sections)
    proc = run_cli("pretrain", "--config", str(config), check=False)
    assert proc.returncode == 2 and field in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _sorted_shard(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A shard with each sparse layer's slots in position order (slot order carries no meaning)."""
    out = dict(tensors)
    layers = {k[: -len(".index")] for k in tensors if k.endswith(".index")}
    for layer in layers:
        order = torch.argsort(tensors[f"{layer}.index"].long(), stable=True)
        for key in tensors:
            if key == f"{layer}.index" or key.startswith(f"{layer}.values") or key == f"{layer}.forward_mask":
                out[key] = tensors[key][order]
    return out


def test_reshard_round_trip_is_exact(tp_runs, tmp_path):
    """TP2×PP2 → 1×1 → TP2×PP2: every weight, slot, mask and Adam moment comes back bit for bit."""
    from safetensors.torch import load_file

    source = tp_runs("element", 2, pipeline=2) / "checkpoints"
    run_cli("convert", "reshard", "--from", str(source), "--to", str(tmp_path / "one"), "--tensor", "1",
            "--pipeline", "1")
    proc = run_cli("convert", "reshard", "--from", str(tmp_path / "one"), "--to", str(tmp_path / "back"),
                   "--tensor", "2", "--pipeline", "2")
    assert "re-sharded step 12" in proc.stdout
    assert json.loads((tmp_path / "one" / "step_00000012" / "manifest.json").read_text())["topology"]["tensor"] == 1
    for kind in ("model", "optim"):
        for name in (f"{kind}-tp{t:02d}-pp{p:02d}.safetensors" for t in (0, 1) for p in (0, 1)):
            want = load_file(source / "step_00000012" / name)
            got = load_file(tmp_path / "back" / "step_00000012" / name)
            if kind == "optim":  # moments follow their slots: order them by the model shard's index
                index = {k: v for k, v in load_file(source / "step_00000012" / name.replace("optim", "model")).items()
                         if k.endswith(".index")}
                index_back = {k: v for k, v in load_file(tmp_path / "back" / "step_00000012"
                                                         / name.replace("optim", "model")).items()
                              if k.endswith(".index")}
                want, got = _sorted_shard(want | index), _sorted_shard(got | index_back)
            else:
                want, got = _sorted_shard(want), _sorted_shard(got)
            assert set(got) == set(want), name
            for key in want:
                assert torch.equal(got[key], want[key]), (name, key)
    run_cli("checkpoint", "verify", str(tmp_path / "back"))


def test_training_resumes_on_another_layout_after_convert(tp_runs, data_dir, tmp_path):
    """A one-process checkpoint at step 6, re-sharded to TP2 × PP2, resumes on 4 ranks with the
    one-process run's losses for steps 7-12."""
    single = tp_runs("element", 1)
    run_cli("convert", "reshard", "--from", str(single / "checkpoints" / "step_00000006"),
            "--to", str(tmp_path / "ckpt"), "--tensor", "2", "--pipeline", "2")
    sections = _sections("element", 2, pipeline=2)
    sections["checkpoint"]["dir"] = str(tmp_path / "ckpt")
    config = write_config(tmp_path, data_dir, "resumed", **sections)
    run_cli(str(REPO / "launch" / "pretrain.py"), "--config", str(config), "--resume", launcher=_launcher(4))
    full = {r["step"]: r["loss"] for r in records(single, "step")}
    resumed = records(tmp_path / "resumed", "step")
    assert [r["step"] for r in resumed] == list(range(7, STEPS_TP + 1))
    for r in resumed:
        assert r["loss"] == pytest.approx(full[r["step"]], rel=1e-5), r["step"]


def _replica_body(rank, world, differ):
    from sparse_lm.errors import UserError
    from sparse_lm.sparsity.storage import SparseLinear
    from sparse_lm.sparsity.topkast import verify_replicas

    layer = SparseLinear("q", 32, 32, density=0.2, exploration=0.2)
    layer.initialize(seed=1, stream=2, std=0.02)
    if differ and rank == 1:
        layer.index[[0, 1]] = layer.index[[1, 0]]  # same set, another slot order: still a divergence
    try:
        verify_replicas([layer], torch.distributed.group.WORLD, step=7)
    except UserError as exc:
        return str(exc)
    return None


def test_verify_replicas_catches_diverged_sets():
    from tests.distributed import run_distributed

    assert run_distributed(_replica_body, 2, False, timeout=60) == [None, None]
    errors = run_distributed(_replica_body, 2, True, timeout=60)
    assert all(e and "step 7: data-parallel replicas selected different sparse sets" in e for e in errors)


def test_megatron_core_is_imported_without_compiling_its_fusions():
    """`parallel.mcore` imports megatron-core with its unused fusions left plain (no TorchDynamo or
    Inductor pulled into every rank's start-up), and puts the real torch.compile back."""
    code = ("import sys, torch; from sparse_lm.parallel import mcore; from megatron.core import jit; "
            "print(jit.jit_fuser is jit.noop_decorator, torch.compile.__module__, "
            "'torch._inductor.compile_fx' in sys.modules, mcore.parallel_state.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "torch", "False", "megatron.core.parallel_state"]
