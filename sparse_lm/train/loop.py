"""The pretraining loop: DeepSpeed engine, deterministic data, logging, periodic eval and checkpoints.

`pretrain` drives a run from config to final held-out loss; it is the same code under a plain
`sparse-lm pretrain`, the `deepspeed` launcher and `torchrun` (see launch/pretrain.py). A run is
checked (`preflight.check_run`), set up (`setup`), then each iteration is one `train_step` followed
by the after-step work, one call each: record, bad-step guard, reselection, progress, held-out
evaluation, checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sparse_lm import faults
from sparse_lm.checkpoint.store import find_checkpoint, load_checkpoint, read_latest, save_checkpoint
from sparse_lm.config import RunConfig
from sparse_lm.errors import UserError
from sparse_lm.eval.heldout import data_parallel_sum, heldout_loss
from sparse_lm.methods.factory import make_schedule
from sparse_lm.model.build import build_model
from sparse_lm.optim_state import link_partitions
from sparse_lm.parallel.state import Topology, init_distributed, shutdown
from sparse_lm.sparsity.topkast import TopKAST, verify_replicas
from sparse_lm.termination import Terminated, stopped_by_sigterm
from sparse_lm.train.engine import make_engine, model_parallel_group
from sparse_lm.train.guard import GuardedStep
from sparse_lm.train.memory import dense_equivalent_bytes, model_state_bytes
from sparse_lm.train.metrics import MetricsLog, format_eta, layer_densities, peak_rss_bytes
from sparse_lm.train.param_groups import init_stds, peak_rates
from sparse_lm.train.preflight import Plan, check_run
from sparse_lm.train.schedule import learning_rate


@dataclass
class RunState:
    """What a checkpoint must carry beyond tensors to continue exactly."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0  # wall time of the training processes before this one, so resumes add up

    def as_dict(self) -> dict[str, int | float]:
        return {"step": self.step, "samples_seen": self.samples_seen, "tokens_seen": self.tokens_seen,
                "train_seconds": self.train_seconds}


@dataclass
class Run:
    """A set-up run: what the steps and the after-step work share."""

    cfg: RunConfig
    topo: Topology
    plan: Plan
    engine: Any
    optimizer: Any
    guard: GuardedStep | None
    schedule: TopKAST
    log: MetricsLog
    state: RunState
    tokens_per_step: int
    dense_bytes: int = 0
    memory: dict[str, int] | None = None  # model state per rank, measured once gradients and Adam state live
    bad_streak: int = 0
    last_heldout: float = math.nan
    started: float = field(default_factory=time.time)
    window_start: float = field(default_factory=time.time)  # of the steps the next tok/s covers
    window_steps: int = 0


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool
    lr: float


def pretrain(cfg: RunConfig, plan: Plan | None = None) -> dict[str, Any]:
    """Train per `cfg`; returns the final summary (rank 0's view). Bad config, data or outputs are
    refused before anything is built (`preflight.check_run`, unless its `plan` is given). A dead or
    stalled peer and a SIGTERM (under `cli.main`'s guard) become one-line `UserError`s; checkpoints
    stay whole either way, being written to a staging directory and renamed."""
    plan = plan or check_run(cfg)
    topo = init_distributed(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.timeout_s)
    try:
        return _pretrain(cfg, plan, topo)
    except RuntimeError as exc:  # a peer died or a collective timed out: say so in one line
        if not _collective_failure(exc):
            raise
        first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"rank {topo.rank}: a collective failed ({first_line}); another rank probably died or stalled "
            f"(parallel.timeout_s={cfg.parallel.timeout_s}). Resume from the last checkpoint with --resume"
        ) from None
    except Terminated:
        raise UserError(f"{stopped_by_sigterm(topo.rank)}. Resume from the last checkpoint with --resume") from None
    finally:
        # The launcher's SIGTERM often lands here, while a dead peer's error is on its way up: that
        # error is the better report, so the signal must not replace it.
        with contextlib.suppress(Terminated):
            shutdown()


# Text of the errors gloo / NCCL raise (as plain RuntimeError on CPU) when a peer is gone or stuck.
_COLLECTIVE_FAILURES = ("gloo", "NCCL", "Connection closed", "Connection reset", "timed out", "Timed out")


def _collective_failure(exc: RuntimeError) -> bool:
    return isinstance(exc, dist.DistError) or any(marker in str(exc) for marker in _COLLECTIVE_FAILURES)


def _pretrain(cfg: RunConfig, plan: Plan, topo: Topology) -> dict[str, Any]:
    run = setup(cfg, plan, topo)
    while run.state.step < cfg.train.steps:
        step = train_step(run)
        record_step(run, step)
        check_bad_steps(run, step)
        reselect(run)
        log_progress(run, step)
        paused = time.time()
        evaluate(run)
        checkpoint(run)
        run.window_start += time.time() - paused  # tok/s and the ETA measure training steps only
    return finish(run)


def setup(cfg: RunConfig, plan: Plan, topo: Topology) -> Run:
    """Model, engine, resumed state, metrics log and sparsity schedule of a checked run."""
    model = build_model(cfg, topology=topo)
    engine, optimizer, guard = make_engine(model, cfg, topo)
    state, manifest = RunState(), None
    if plan.resume_from is not None:
        manifest = load_checkpoint(plan.resume_from, engine.module, optimizer, topo, config=plan.config)
        state = RunState(**manifest["state"])
    log = MetricsLog(Path(cfg.train.out_dir) / "metrics.jsonl", enabled=topo.is_main, start_step=state.step,
                     monitor=engine.monitor if engine.monitor.enabled else None)
    if manifest is not None:
        log.say(f"resumed from {manifest['path']} at step {state.step}")
        log.write("resume", step=state.step, path=manifest["path"])
    if engine.zero_optimization_stage() != cfg.parallel.zero_stage:
        log.say(f"bf16: DeepSpeed ZeRO stage {engine.zero_optimization_stage()} (parallel.zero_stage="
                f"{cfg.parallel.zero_stage}), whose fp32 masters reselection and checkpoints can reach")
    schedule = make_schedule(engine.module, cfg, group=model_parallel_group(topo))
    run = Run(cfg, topo, plan, engine, optimizer, guard, schedule, log, state,
              tokens_per_step=plan.global_batch * cfg.train.seq_len)
    _log_model(run)
    _log_parameterisation(run)
    schedule.start(state.step)
    if schedule.layers and state.step == 0:  # a resumed run has its step's record
        log.write("density", step=state.step, layers=layer_densities(engine.module))
    note = schedule.describe()
    if note:
        log.say(note)
    engine.train()
    run.dense_bytes = dense_equivalent_bytes(engine.module)
    run.started = run.window_start = time.time()
    return run


def _log_model(run: Run) -> None:
    cfg, topo, t = run.cfg, run.topo, run.cfg.train
    n_params = sum(p.numel() for p in run.engine.module.parameters())
    stats = run.schedule.stats()
    sparse_note = ""
    if stats:
        sparse_note = (f" ({(n_params + stats['dense_extra']) / 1e6:.2f}M dense-equivalent; {stats['layers']} "
                       f"{cfg.sparsity.method} linears, forward density {stats['forward_density']:.3f})")
    run.log.say(
        f"model: {n_params / 1e6:.2f}M stored parameters{sparse_note}, vocab {run.engine.module.cfg.vocab_size}; "
        f"ranks {topo.world} (tp {topo.tensor} pp {topo.pipeline} dp {topo.data}); "
        f"{run.tokens_per_step} tokens/step; {t.steps} steps; train tokens {run.plan.sampler.split.n_tokens}"
    )


def _log_parameterisation(run: Run) -> None:
    """What the run trains with, beyond the config's words: each group's peak learning rate and
    each linear kind's init std (with SμPar's gains), said once and recorded in metrics.jsonl."""
    rates, stds = peak_rates(run.cfg), init_stds(run.engine.module)
    run.log.write("parameterisation", step=run.state.step, supar=run.cfg.sparsity.supar, lr_groups=rates,
                  init_std=stds)
    run.log.say("peak lr by group: " + ", ".join(f"{name} {rate:.3g}" for name, rate in rates.items())
                + (" (SμPar)" if run.cfg.sparsity.supar else "") + "; init std: "
                + ", ".join(f"{name} {std:.4g}" for name, std in stds.items()))


def train_step(run: Run) -> StepResult:
    """One optimizer step at the scheduled learning rate: `train.grad_accum` micro-batches per
    data-parallel rank (through DeepSpeed's pipeline schedule under `parallel.pipeline` > 1)."""
    t, topo, state, engine = run.cfg.train, run.topo, run.state, run.engine
    lr = learning_rate(state.step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    faults.maybe_fail_rank(state.step + 1)
    firsts = [state.samples_seen + micro * t.micro_batch * topo.data + topo.dp_rank * t.micro_batch
              for micro in range(t.grad_accum)]
    measure = run.memory is None and (state.step >= 1 or t.steps == 1)  # after the first step Adam state lives
    if measure and run.guard is not None:
        # gradients and Adam state both live
        run.guard.on_step = lambda: model_state_bytes(engine.module, run.optimizer)
    if topo.pipeline > 1:
        sampler = run.plan.sampler
        micro_batches = [tuple(x.to(topo.device) for x in sampler.batch(first, t.micro_batch)) for first in firsts]
        loss = float(engine.train_batch(iter(micro_batches)))  # averaged over replicas, on every stage
    else:
        loss = _micro_batches(run, firsts, measure and run.guard is None)
    if state.step == 0 and engine.zero_optimization_stage():
        link_partitions(run.optimizer)
    if run.guard is not None:
        grad_norm, skipped = run.guard.norm, run.guard.skipped
        run.memory = run.memory or run.guard.measured
    else:  # ZeRO skips a non-finite step itself
        grad_norm = float(engine.get_global_grad_norm() or math.nan)
        skipped = not math.isfinite(grad_norm)
    return StepResult(loss, grad_norm, skipped, lr)


def _micro_batches(run: Run, firsts: list[int], measure: bool) -> float:
    """Forward, backward and DeepSpeed's step per micro-batch; the step's loss averaged over
    micro-batches and data-parallel ranks. `measure`: take the model-state bytes at the boundary."""
    t, topo, engine = run.cfg.train, run.topo, run.engine
    loss_sum = 0.0
    for first in firsts:
        inputs, targets = run.plan.sampler.batch(first, t.micro_batch)
        loss = engine(inputs.to(topo.device), targets.to(topo.device))
        if faults.nan_loss(run.state.step + 1):
            loss = loss * math.nan
        engine.backward(loss)
        loss_sum += loss.item()
        if measure and engine.is_gradient_accumulation_boundary():
            run.memory = model_state_bytes(engine.module, run.optimizer)
        engine.step()
    (loss_total,) = data_parallel_sum([loss_sum / t.grad_accum], topo.device)
    return loss_total / topo.data


def record_step(run: Run, step: StepResult) -> None:
    """Count the step's samples and tokens and write its metrics record."""
    state = run.state
    state.step += 1
    state.samples_seen += run.plan.global_batch
    state.tokens_seen += run.tokens_per_step
    run.window_steps += 1
    run.log.write("step", step=state.step, loss=step.loss, lr=step.lr, grad_norm=step.grad_norm,
                  tokens=state.tokens_seen, skipped=step.skipped)


def check_bad_steps(run: Run, step: StepResult) -> None:
    """Report a skipped update; stop after `train.max_bad_steps` non-finite steps in a row."""
    t, state = run.cfg.train, run.state
    run.bad_streak = run.bad_streak + 1 if step.skipped or not math.isfinite(step.loss) else 0
    if step.skipped:
        run.log.say(f"step {state.step:>6}/{t.steps} | non-finite loss or gradients: update skipped "
                    f"({run.bad_streak} in a row, limit train.max_bad_steps={t.max_bad_steps})")
    if run.bad_streak >= t.max_bad_steps:
        last = read_latest(run.cfg.checkpoint_dir) if run.cfg.checkpoint_dir.is_dir() else None
        raise UserError(
            f"step {state.step}: {run.bad_streak} consecutive steps with non-finite loss or gradients "
            f"(train.max_bad_steps={t.max_bad_steps}); stopping. Last good checkpoint: {last or 'none'}; "
            "lower train.lr or check the data, then resume"
        )


def reselect(run: Run) -> None:
    """The sparsity schedule's after-step work (reselection when due), checked and logged."""
    state, t = run.state, run.cfg.train
    change = run.schedule.after_step(state.step, run.optimizer)
    if change is None:
        return
    if run.cfg.parallel.verify_replicas and run.topo.data > 1:
        from sparse_lm.parallel.mcore import parallel_state

        verify_replicas(run.schedule.layers, parallel_state.get_data_parallel_group(), state.step)
    run.log.write("reselect", step=state.step, **change)
    run.log.write("density", step=state.step, layers=layer_densities(run.engine.module))
    if state.step % t.log_every == 0:
        run.log.say(f"step {state.step:>6}/{t.steps} | reselected: {change['changed_b']:.1%} of B and "
                    f"{change['changed_a']:.1%} of A changed in {change['seconds']:.2f} s")


def log_progress(run: Run, step: StepResult) -> None:
    """Every `train.log_every` steps and at the end: loss, throughput, memory and ETA."""
    state, t = run.state, run.cfg.train
    if not (state.step % t.log_every == 0 or state.step == t.steps):
        return
    step_time = (time.time() - run.window_start) / run.window_steps
    run.log.say(
        f"step {state.step:>6}/{t.steps} | loss {step.loss:.4f} | lr {step.lr:.2e} | grad norm {step.grad_norm:.3f} | "
        f"{run.tokens_per_step / step_time:,.0f} tok/s | rss {peak_rss_bytes() / 2**30:.2f} GiB | "
        f"eta {format_eta(step_time * (t.steps - state.step))}"
    )
    run.log.write("throughput", step=state.step, tokens_per_s=run.tokens_per_step / step_time, step_time_s=step_time,
                  peak_rss_bytes=peak_rss_bytes())
    run.window_start, run.window_steps = time.time(), 0


def evaluate(run: Run) -> None:
    """Every `train.eval_every` steps and at the end: the held-out loss."""
    state, t = run.state, run.cfg.train
    if not (state.step % t.eval_every == 0 or state.step == t.steps):
        return
    loss = run.last_heldout = heldout_loss(run.engine, run.plan.eval_batches, run.topo)
    run.log.say(f"step {state.step:>6}/{t.steps} | held-out loss {loss:.4f} | ppl {math.exp(loss):.2f}")
    run.log.write("heldout", step=state.step, loss=loss, perplexity=math.exp(loss))


def checkpoint(run: Run) -> None:
    """Every `checkpoint.every` steps and at the end: a checkpoint (collective, on every rank)."""
    cfg, state = run.cfg, run.state
    if not (state.step % cfg.checkpoint.every == 0 or state.step == cfg.train.steps):
        return
    saved = {**state.as_dict(), "train_seconds": _train_seconds(run)}
    path = save_checkpoint(
        cfg.checkpoint_dir, state.step, run.engine.module, run.optimizer, run.topo, saved, run.plan.config,
        run.plan.tokenizer_path, cfg.checkpoint.keep,
    )
    run.log.write("checkpoint", step=state.step, path=str(path))


def _train_seconds(run: Run) -> float:
    """Wall time of the whole run so far: this process's plus the resumed-from checkpoint's."""
    return run.state.train_seconds + time.time() - run.started


def finish(run: Run) -> dict[str, Any]:
    """The run's summary, written to the metrics log and said in one line."""
    cfg, state, memory, dense_bytes, heldout = run.cfg, run.state, run.memory, run.dense_bytes, run.last_heldout
    summary = {
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "heldout_loss": heldout,
        "heldout_perplexity": math.exp(heldout) if not math.isnan(heldout) else math.nan,
        "wall_s": time.time() - run.started,
        "train_wall_s": _train_seconds(run),
        "checkpoint": str(find_checkpoint(cfg.checkpoint_dir)) if cfg.checkpoint_dir.is_dir() else None,
        "sparsity": cfg.sparsity.method,
        "supar": cfg.sparsity.supar,
        "lr_groups": peak_rates(cfg),
        "init_std": init_stds(run.engine.module),
        "model_state_bytes": memory["total"] if memory else None,
        "model_state_parts": memory,
        "dense_model_state_bytes": dense_bytes,
        "memory_ratio": memory["total"] / dense_bytes if memory else None,
        "peak_rss_bytes": peak_rss_bytes(),
        # the GPU's high-water marks: what tensors held, which `sparse-lm plan`'s per-rank total predicts,
        # and what the caching allocator reserved for them (tools/gpu_check.sh puts both beside the plan)
        "peak_device_bytes": torch.cuda.max_memory_allocated() if run.topo.device.type == "cuda" else None,
        "peak_device_reserved_bytes": torch.cuda.max_memory_reserved() if run.topo.device.type == "cuda" else None,
    }
    run.log.write("summary", **summary)
    memory_note = ""
    if memory:
        memory_note = (f" | model state per rank {memory['total'] / 2**20:.2f} MiB vs "
                       f"{dense_bytes / 2**20:.2f} MiB dense (ratio {summary['memory_ratio']:.3f})")
    run.log.say(f"done: {state.step} steps | held-out loss {heldout:.4f} | "
                f"perplexity {summary['heldout_perplexity']:.2f}{memory_note} | checkpoint {summary['checkpoint']}")
    run.log.close()
    return summary
