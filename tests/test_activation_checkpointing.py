"""Activation checkpointing (`train.activation_checkpointing`) changes memory, never numbers: over
12 steps with reselections, a run that recomputes every block's forward in backward has the same
loss at every step, bit for bit, and the same final weights, masks and budgets as one that keeps
the activations — Top-KAST element-wise and Spartan with blocks in one process (the model built
by `build_model`, trained by its schedule, gradient accumulation over 2 micro-batches); Spartan on
TP 2 × PP 2 (4 gloo ranks, DeepSpeed's pipeline engine) is compared in tests/test_parallel.py, beside
the run that keeps its activations there.
"""

from __future__ import annotations

import torch

STEPS = 12
RESELECTS = [4, 8]
MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32}
SPARTAN = {"method": "spartan", "density": 0.25, "exploration": 0.25, "reselect_every": 4, "granularity": "block",
           "block_size": 8, "allocation": "global", "warmup_frac": 0.3, "finetune_frac": 0.05}
TOPKAST = {"method": "topkast", "density": 0.2, "exploration": 0.2, "reselect_every": 4}


def _train_in_process(sparsity: dict, recompute: bool, accum: int) -> tuple[list[float], dict, int]:
    """(loss per step, final state dict, forward calls of one block linear) of 12 AdamW steps on
    fixed random tokens, reselecting through the method's schedule after every step."""
    from sparse_lm.config import RunConfig
    from sparse_lm.methods.factory import make_schedule
    from sparse_lm.model.build import build_model

    cfg = RunConfig()
    cfg.model.vocab_size = 128
    for key, value in MODEL.items():
        setattr(cfg.model, key, value)
    for key, value in sparsity.items():
        setattr(cfg.sparsity, key, value)
    cfg.train.steps, cfg.train.seq_len, cfg.train.grad_accum = STEPS, 16, accum
    cfg.train.activation_checkpointing = recompute
    model = build_model(cfg.validate())
    calls = []
    model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda *_: calls.append(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = make_schedule(model, cfg)
    schedule.start(0)
    tokens = torch.randint(0, 128, (STEPS, accum, 2, 17), generator=torch.Generator().manual_seed(0))
    losses, reselected = [], []
    for step in range(1, STEPS + 1):
        optimizer.zero_grad()
        total = 0.0
        for micro in tokens[step - 1]:
            loss = model(micro[:, :-1], micro[:, 1:]) / accum
            loss.backward()
            total += loss.item()
        optimizer.step()
        losses.append(total)
        if schedule.after_step(step, optimizer) is not None:
            reselected.append(step)
    assert reselected == RESELECTS
    return losses, {k: v.clone() for k, v in model.state_dict().items()}, len(calls)


def test_one_process_runs_are_identical_with_recomputed_blocks():
    for sparsity, accum in ((TOPKAST, 2), (SPARTAN, 2)):
        kept, kept_state, kept_calls = _train_in_process(sparsity, False, accum)
        redone, redone_state, redone_calls = _train_in_process(sparsity, True, accum)
        assert kept_calls == STEPS * accum and redone_calls == 2 * STEPS * accum  # the forward did run twice
        assert redone == kept, sparsity["method"]
        assert redone_state.keys() == kept_state.keys()
        for key in kept_state:  # values, positions, masks, budgets, dense weights
            assert torch.equal(redone_state[key], kept_state[key]), (sparsity["method"], key)


def _pipeline_blocks_body(rank, world):
    """This rank's stage's blocks' `recompute`, built without and with the flag."""
    import deepspeed

    from sparse_lm.config import RunConfig
    from sparse_lm.model.build import build_model
    from sparse_lm.model.llama import Block
    from sparse_lm.parallel.state import init_distributed, shutdown

    try:
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # DeepSpeed's handle on run_distributed's group
        topology = init_distributed(1, 2)
        flags = []
        for recompute in (False, True):
            cfg = RunConfig()
            cfg.model.vocab_size = 128
            cfg.parallel.pipeline = 2
            cfg.train.activation_checkpointing = recompute
            stage = build_model(cfg.validate(), initialize=False, topology=topology)
            flags.append([module.recompute for module in stage.modules() if isinstance(module, Block)])
        return flags
    finally:
        shutdown()


def test_pipeline_stages_recompute_their_blocks():
    """`build_model` hands the flag to every block of a pipeline stage (the identical-runs test
    above cannot tell a stage that silently keeps its activations)."""
    from tests.distributed import run_distributed

    # 4 layers, 2 per stage
    assert run_distributed(_pipeline_blocks_body, 2, timeout=300) == [[[False] * 2, [True] * 2]] * 2
