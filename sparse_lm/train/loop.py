"""The pretraining loop: DeepSpeed engine, deterministic data, logging, periodic eval and checkpoints.

One function, `pretrain`, drives a run from config to final held-out loss; it is the same code under
a plain `sparse-lm pretrain`, the `deepspeed` launcher and `torchrun` (see launch/pretrain.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sparse_lm.atomic import check_writable
from sparse_lm.checkpoint.store import (find_checkpoint, load_checkpoint, read_latest, read_manifest, save_checkpoint,
                                        tokenized_alike)
from sparse_lm.config import RunConfig
from sparse_lm.data.packed import PackedSplit, load_meta
from sparse_lm.errors import UserError
from sparse_lm.termination import Terminated, stopped_by_sigterm
from sparse_lm.model import resolve_vocab
from sparse_lm.optim_state import link_partitions
from sparse_lm.model.build import build_model
from sparse_lm.parallel.state import DeepSpeedMPU, Topology, init_distributed, shutdown
from sparse_lm.sparsity.methods import make_schedule
from sparse_lm.sparsity.topkast import sparse_layers, verify_replicas
from sparse_lm.train import faults
from sparse_lm.train.guard import GuardedStep
from sparse_lm.train.batches import heldout_batches, train_sampler
from sparse_lm.train.memory import dense_equivalent_bytes, model_state_bytes
from sparse_lm.train.metrics import MetricsLog, format_eta, layer_densities, peak_rss_bytes
from sparse_lm.train.monitor import deepspeed_monitor_config
from sparse_lm.train.schedule import learning_rate


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linears, embeddings), not norm gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_engine(model: torch.nn.Module, cfg: RunConfig, topo: Topology):
    """deepspeed.initialize with a torch AdamW (no FusedAdam compile on CPU); returns (engine,
    optimizer, guard). A pipeline stage gets DeepSpeed's PipelineEngine (its topology is the
    module's); otherwise megatron-core's groups are the engine's `mpu`.

    Gradient clipping: with ZeRO-0 `GuardedStep` measures, skips and clips (see `train/guard.py`)
    and DeepSpeed's is off; under ZeRO-1 DeepSpeed clips. It is always written out, because
    DeepSpeed defaults `gradient_clipping` to 1.0 when unset.
    """
    import deepspeed

    t = cfg.train
    bf16 = t.precision == "bf16" or (t.precision == "auto" and topo.device.type == "cuda")
    optimizer = torch.optim.AdamW(
        _param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, foreach=False
    )
    # DeepSpeed's bf16 without ZeRO keeps its fp32 masters apart from the parameters, out of reach
    # of reselection (which rewrites slots) and checkpoints (which save the masters; every save
    # failed); ZeRO-1 links them to each parameter (`optim_state.partitioned`) on one rank as on
    # many, so a bf16 run uses it. A pipeline's bf16 optimizer links them already.
    zero_stage = 1 if bf16 and cfg.parallel.zero_stage == 0 and topo.pipeline == 1 else cfg.parallel.zero_stage
    guard = None
    if zero_stage == 0:
        guard = GuardedStep(optimizer, model, t.grad_clip, topo.tp_rank, _model_parallel_group(topo))
    ds_config = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip if guard is None else 0.0,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        **deepspeed_monitor_config(t.monitor),
    }
    extra = {} if topo.pipeline > 1 else {"mpu": DeepSpeedMPU()}
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model.to(topo.device), optimizer=optimizer, config=ds_config, dist_init_required=False, **extra
    )
    return engine, optimizer, guard


@dataclass
class RunState:
    """What a checkpoint must carry beyond tensors to continue exactly."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"step": self.step, "samples_seen": self.samples_seen, "tokens_seen": self.tokens_seen}


def _model_parallel_group(topo: Topology):
    """megatron-core's tensor × pipeline group, or None for a one-rank model."""
    if topo.tensor * topo.pipeline == 1:
        return None
    from sparse_lm.parallel.mcore import parallel_state

    return parallel_state.get_model_parallel_group()


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        from sparse_lm.parallel.mcore import parallel_state

        dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
    return tensor.tolist()


@torch.no_grad()
def heldout_loss(engine, batches: list[torch.Tensor], topo: Topology) -> float:
    """Mean token loss over the fixed held-out batches, split over data-parallel ranks (a pipeline
    evaluates all of them on every replica: its `eval_batch` averages over data-parallel ranks)."""
    if topo.pipeline > 1:
        losses = [float(engine.eval_batch(iter([(rows[:, :-1].to(topo.device), rows[:, 1:].to(topo.device))]),
                                          num_micro_batches=1)) for rows in batches]
        engine.train()
        return sum(losses) / len(losses)
    model = engine.module
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for i, rows in enumerate(batches):
        if i % topo.data != topo.dp_rank:
            continue
        rows = rows.to(topo.device)
        n = rows[:, 1:].numel()
        total += float(model(rows[:, :-1], rows[:, 1:])) * n
        count += n
    model.train(was_training)
    total, count = _all_reduce_sum([total, count], topo.device)
    return total / count if count else math.nan


def _resume_point(cfg: RunConfig) -> Path | None:
    root = cfg.checkpoint_dir
    mode = cfg.checkpoint.resume
    existing = read_latest(root) if root.is_dir() else None
    if existing is None and root.is_dir() and any(root.glob("step_*/manifest.json")):
        existing = find_checkpoint(root)
    if mode == "must" and existing is None:
        raise UserError(f"checkpoint.dir {root}: checkpoint.resume=must (or --resume) but no checkpoint is there")
    if mode == "never" and existing is not None:
        raise UserError(
            f"checkpoint.dir {root}: already holds checkpoints and checkpoint.resume=never would overwrite "
            "them; resume (checkpoint.resume=auto) or choose another checkpoint.dir"
        )
    return existing if mode != "never" else None


def pretrain(cfg: RunConfig) -> dict[str, Any]:
    """Train per `cfg`; returns the final summary (rank 0's view). A dead or stalled peer and a
    SIGTERM (under `cli.main`'s guard) become one-line `UserError`s; checkpoints stay whole either
    way, being written to a temporary name and renamed."""
    topo = init_distributed(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.timeout_s)
    try:
        return _pretrain(cfg, topo)
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


def _check_same_tokenizer(step_dir: Path, meta: dict[str, Any], data_dir: Path) -> None:
    if not tokenized_alike(read_manifest(step_dir), meta):
        raise UserError(
            f"data.path {data_dir}: tokenised with a different tokenizer than checkpoint {step_dir} was trained on; "
            f"prepare the data with `sparse-lm prepare-data --tokenizer {step_dir / 'tokenizer.model'}`"
        )


def _pretrain(cfg: RunConfig, topo: Topology) -> dict[str, Any]:
    t = cfg.train
    data_dir = Path(cfg.data.path)
    meta = load_meta(data_dir)
    train_split, heldout_split = PackedSplit(data_dir, "train"), PackedSplit(data_dir, "heldout")
    global_batch = t.micro_batch * t.grad_accum * topo.data
    sampler = train_sampler(train_split, t.seq_len, t.seed, global_batch)
    eval_batches = heldout_batches(heldout_split, t.seq_len, t.micro_batch, t.eval_batches, full_only=topo.pipeline > 1)

    if topo.is_main:
        check_writable(t.out_dir, "train.out_dir")
        check_writable(cfg.checkpoint_dir, "checkpoint.dir")
    cfg.model = resolve_vocab(cfg.model, meta["vocab_size"])  # stored resolved in checkpoints
    model = build_model(cfg, pipeline=topo.pipeline)
    engine, optimizer, guard = make_engine(model, cfg, topo)
    state = RunState()
    config_dict = cfg.to_dict()  # as checkpoints save it, and as a resume must match it
    resume_from = _resume_point(cfg)
    if resume_from is not None:
        _check_same_tokenizer(find_checkpoint(resume_from), meta, data_dir)
        manifest = load_checkpoint(resume_from, engine.module, optimizer, topo, config=config_dict)
        state = RunState(**manifest["state"])
    log = MetricsLog(Path(t.out_dir) / "metrics.jsonl", enabled=topo.is_main, start_step=state.step,
                     monitor=engine.monitor if engine.monitor.enabled else None)
    if resume_from is not None:
        log.say(f"resumed from {manifest['path']} at step {state.step}")
        log.write("resume", step=state.step, path=manifest["path"])

    if engine.zero_optimization_stage() != cfg.parallel.zero_stage:
        log.say(f"bf16: DeepSpeed ZeRO stage {engine.zero_optimization_stage()} (parallel.zero_stage="
                f"{cfg.parallel.zero_stage}), whose fp32 masters reselection and checkpoints can reach")
    n_params = sum(p.numel() for p in engine.module.parameters())
    layers = sparse_layers(engine.module)
    dense_equivalent = n_params + sum(layer.out_features * layer.in_features - layer.values.numel() for layer in layers)
    tokens_per_step = global_batch * t.seq_len
    sparse_note = ""
    if layers:
        forward = sum(layer.k_forward * layer.block**2 for layer in layers) / sum(l.global_blocks * l.block**2 for l in layers)
        sparse_note = (f" ({dense_equivalent / 1e6:.2f}M dense-equivalent; {len(layers)} {cfg.sparsity.method} linears, "
                       f"forward density {forward:.3f})")
    log.say(
        f"model: {n_params / 1e6:.2f}M stored parameters{sparse_note}, vocab {engine.module.cfg.vocab_size}; "
        f"ranks {topo.world} (tp {topo.tensor} pp {topo.pipeline} dp {topo.data}); "
        f"{tokens_per_step} tokens/step; {t.steps} steps; train tokens {train_split.n_tokens}"
    )
    tokenizer_path = data_dir / meta["tokenizer"]

    def checkpoint() -> None:
        path = save_checkpoint(
            cfg.checkpoint_dir, state.step, engine.module, optimizer, topo, state.as_dict(), config_dict,
            tokenizer_path, cfg.checkpoint.keep,
        )
        log.write("checkpoint", step=state.step, path=str(path))

    schedule = make_schedule(engine.module, cfg, group=_model_parallel_group(topo))
    schedule.start(state.step)
    if layers and state.step == 0:  # a resumed run has its step's record
        log.write("density", step=state.step, layers=layer_densities(engine.module))
    note = schedule.describe()
    if note:
        log.say(note)
    engine.train()
    started, window_start, window_steps = time.time(), time.time(), 0
    last_heldout = math.nan
    memory: dict[str, int] | None = None
    bad_streak = 0
    dense_bytes = dense_equivalent_bytes(engine.module)
    while state.step < t.steps:
        lr = learning_rate(state.step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        faults.maybe_fail_rank(state.step + 1)
        firsts = [state.samples_seen + micro * t.micro_batch * topo.data + topo.dp_rank * t.micro_batch
                  for micro in range(t.grad_accum)]
        if memory is None and guard is not None and (state.step >= 1 or t.steps == 1):
            guard.on_step = lambda: model_state_bytes(engine.module, optimizer)  # gradients and Adam state both live
        if topo.pipeline > 1:
            micro_batches = [tuple(x.to(topo.device) for x in sampler.batch(first, t.micro_batch)) for first in firsts]
            step_loss = float(engine.train_batch(iter(micro_batches)))  # averaged over replicas, on every stage
        else:
            loss_sum = 0.0
            for micro, first in enumerate(firsts):
                inputs, targets = sampler.batch(first, t.micro_batch)
                loss = engine(inputs.to(topo.device), targets.to(topo.device))
                if faults.nan_loss(state.step + 1):
                    loss = loss * math.nan
                engine.backward(loss)
                loss_sum += loss.item()
                if guard is None and memory is None and engine.is_gradient_accumulation_boundary() and (
                        state.step >= 1 or t.steps == 1):
                    memory = model_state_bytes(engine.module, optimizer)
                engine.step()
            (loss_total,) = _all_reduce_sum([loss_sum / t.grad_accum], topo.device)
            step_loss = loss_total / topo.data
        if state.step == 0 and engine.zero_optimization_stage():
            link_partitions(optimizer)
        if guard is not None:
            grad_norm, skipped = guard.norm, guard.skipped
            memory = memory or guard.measured
        else:  # ZeRO skips a non-finite step itself
            grad_norm = float(engine.get_global_grad_norm() or math.nan)
            skipped = not math.isfinite(grad_norm)
        state.step += 1
        state.samples_seen += global_batch
        state.tokens_seen += tokens_per_step
        window_steps += 1
        log.write("step", step=state.step, loss=step_loss, lr=lr, grad_norm=grad_norm, tokens=state.tokens_seen,
                  skipped=skipped)
        bad_streak = bad_streak + 1 if skipped or not math.isfinite(step_loss) else 0
        if skipped:
            log.say(f"step {state.step:>6}/{t.steps} | non-finite loss or gradients: update skipped "
                    f"({bad_streak} in a row, limit train.max_bad_steps={t.max_bad_steps})")
        if bad_streak >= t.max_bad_steps:
            last = read_latest(cfg.checkpoint_dir) if cfg.checkpoint_dir.is_dir() else None
            raise UserError(
                f"step {state.step}: {bad_streak} consecutive steps with non-finite loss or gradients "
                f"(train.max_bad_steps={t.max_bad_steps}); stopping. Last good checkpoint: {last or 'none'}; "
                "lower train.lr or check the data, then resume"
            )
        change = schedule.after_step(state.step, optimizer)
        if change is not None:
            if cfg.parallel.verify_replicas and topo.data > 1:
                from sparse_lm.parallel.mcore import parallel_state

                verify_replicas(schedule.layers, parallel_state.get_data_parallel_group(), state.step)
            log.write("reselect", step=state.step, **change)
            log.write("density", step=state.step, layers=layer_densities(engine.module))
            if state.step % t.log_every == 0:
                log.say(f"step {state.step:>6}/{t.steps} | reselected: {change['changed_b']:.1%} of B and "
                        f"{change['changed_a']:.1%} of A changed in {change['seconds']:.2f} s")

        if state.step % t.log_every == 0 or state.step == t.steps:
            elapsed = time.time() - window_start
            step_time = elapsed / window_steps
            log.say(
                f"step {state.step:>6}/{t.steps} | loss {step_loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                f"{tokens_per_step / step_time:,.0f} tok/s | rss {peak_rss_bytes() / 2**30:.2f} GiB | "
                f"eta {format_eta(step_time * (t.steps - state.step))}"
            )
            log.write("throughput", step=state.step, tokens_per_s=tokens_per_step / step_time, step_time_s=step_time,
                      peak_rss_bytes=peak_rss_bytes())
            window_start, window_steps = time.time(), 0
        paused = time.time()
        if state.step % t.eval_every == 0 or state.step == t.steps:
            last_heldout = heldout_loss(engine, eval_batches, topo)
            log.say(f"step {state.step:>6}/{t.steps} | held-out loss {last_heldout:.4f} | ppl {math.exp(last_heldout):.2f}")
            log.write("heldout", step=state.step, loss=last_heldout, perplexity=math.exp(last_heldout))
        if state.step % cfg.checkpoint.every == 0 or state.step == t.steps:
            checkpoint()
        window_start += time.time() - paused  # tok/s and the ETA measure training steps only

    summary = {
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "heldout_loss": last_heldout,
        "heldout_perplexity": math.exp(last_heldout) if not math.isnan(last_heldout) else math.nan,
        "wall_s": time.time() - started,
        "checkpoint": str(find_checkpoint(cfg.checkpoint_dir)) if cfg.checkpoint_dir.is_dir() else None,
        "sparsity": cfg.sparsity.method,
        "model_state_bytes": memory["total"] if memory else None,
        "model_state_parts": memory,
        "dense_model_state_bytes": dense_bytes,
        "memory_ratio": memory["total"] / dense_bytes if memory else None,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    log.write("summary", **summary)
    memory_note = ""
    if memory:
        memory_note = (f" | model state per rank {memory['total'] / 2**20:.2f} MiB vs {dense_bytes / 2**20:.2f} MiB dense "
                       f"(ratio {summary['memory_ratio']:.3f})")
    log.say(f"done: {state.step} steps | held-out loss {last_heldout:.4f} | perplexity {summary['heldout_perplexity']:.2f}"
            f"{memory_note} | checkpoint {summary['checkpoint']}")
    log.close()
    return summary
