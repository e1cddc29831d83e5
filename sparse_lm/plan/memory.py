"""Memory per rank of a run, predicted from its config's shapes alone (nothing of model size is built).

The model state follows what the run's engine holds (`train/memory.model_state_bytes` measures the
same parts from live tensors, and the tests compare the two):

* fp32 without ZeRO (a torch AdamW): fp32 weights, gradients and both moments, per rank whole;
* ZeRO-1, and bf16 (which always runs DeepSpeed's ZeRO-1 or, in a pipeline, its bf16 optimizer):
  the weights and gradients in the training dtype, whole on every rank, and the fp32 master copy
  and both moments split over the data-parallel ranks;
* ZeRO-Offload (`parallel.offload_optimizer`, ZeRO-1): the same, but the masters and moments in
  host memory, with the buffers DeepSpeed's step works through there (`offload_buffers`: the fp32
  gradient partition, a training-dtype copy of the partition and a staging buffer of the largest
  parameter). On the device the gradients pass through the reduce bucket (counted at the backward
  pass's end, `reduce_transient`) to the host, through a staging buffer of the largest parameter;
  with gradient accumulation they also stay there, in the training dtype, from the first
  micro-batch to the last (measured: DeepSpeed 0.19 reduces them only at the step's boundary).

A sparse linear stores its shard's `capacity` slots of b×b values (B, plus the tensor-parallel
headroom), an int32 index (int64 past 2^31 blocks) and a bool A-mask per slot, Spartan one int64
budget, with `complement: regenerate` and b ≥ 8 a cached fp32 θ₀ score per block of its shard, and
with `complement: offload` a dense fp32 copy of its shard in host memory.

Activations are what autograd saves per micro-batch (this model's own operations: RMSNorm keeps its
fp32 input and normalised output, attention runs a fused kernel that keeps q, k, v, its output and
the row log-sum-exp — no seq × seq matrix — and SwiGLU keeps its three [tokens, ffn] inputs and
product), times the micro-batches a pipeline stage holds under 1F1B: min(stages − stage,
micro-batches). With activation checkpointing a block keeps only its input, and one block's
activations are rebuilt at a time. The workspace is the largest transient of a step, counted on top:
the backward pass's gradients in flight and the sparse kernels' bounded workspaces, the optimizer
step's fp32 gradient partition, a reselection's scoring chunks. The optimizer step itself (torch's
fused AdamW, `train/engine.adamw`) updates in place and adds nothing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from sparse_lm.config import RunConfig
from sparse_lm.errors import UserError
from sparse_lm.methods.registry import DENSE, method_of
from sparse_lm.model.llama import resolve_vocab
from sparse_lm.parallel.layout import BLOCK_LINEAR_NAMES, block_linear_shapes, linear_name, shard_shape, stage_of
from sparse_lm.sparsity.kernels import GATHER_CHUNK_ELEMENTS, GATHER_TOKENS, MAX_TILE_ELEMENTS
from sparse_lm.sparsity.storage import CACHED_SCORES_MIN_BLOCK, SCORE_CHUNK_ELEMENTS, set_sizes, shard_capacity
from sparse_lm.train.engine import DEEPSPEED_BUCKET_ELEMENTS, skips_lone_all_reduce
from sparse_lm.train.param_groups import GROUPS

STATE_PARTS = ("parameters", "gradients", "master_weights", "optimizer_moments", "offload_buffers", "indices_masks",
               "score_caches", "rotary_tables")
OFFLOADED_PARTS = ("master_weights", "optimizer_moments", "offload_buffers")  # in host memory under ZeRO-Offload
# DeepSpeed's CPU Adam per stored weight: 0.63 ns on this project's 2-core CPU machine, quiet, both
# cores (tools/bench_offload.py, 50M fp32 weights; docs/bench/offload.md; 0.75 ns on one core). It is
# memory-bound (28 bytes read and written per weight), so a server host's bandwidth sets its rate.
CPU_ADAM_SECONDS_PER_WEIGHT = 0.63e-9


@dataclass(frozen=True)
class Layout:
    """How a run is spread and which optimizer holds its state (as `train.loop.make_engine` sets it up)."""

    tensor: int
    pipeline: int
    data: int
    zero_stage: int  # what DeepSpeed runs: bf16 without a pipeline always uses ZeRO-1
    bf16: bool
    checkpointing: bool
    offload: bool = False  # ZeRO-Offload: masters and moments in host memory

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.bf16 else 4

    @property
    def partitioned(self) -> bool:
        """fp32 masters and moments split over data-parallel ranks (ZeRO-1, or DeepSpeed's bf16 optimizer)."""
        return self.bf16 or self.zero_stage == 1

    @property
    def host_parts(self) -> tuple[str, ...]:
        """The parts in host memory: Top-KAST's offload store, and under ZeRO-Offload the optimizer's."""
        return ("offload_host", *(OFFLOADED_PARTS if self.offload else ()))

    def describe(self) -> str:
        return (f"tensor {self.tensor} × pipeline {self.pipeline} × data {self.data}, "
                f"{'bf16' if self.bf16 else 'fp32'}, ZeRO-{self.zero_stage}"
                f"{' (bf16 optimizer)' if self.bf16 and self.pipeline > 1 and self.zero_stage == 0 else ''}"
                f"{', optimizer offloaded to the host' if self.offload else ''}, "
                f"activation checkpointing {'on' if self.checkpointing else 'off'}")


def checkpointing_of(cfg: RunConfig) -> bool:
    return bool(getattr(cfg.train, "activation_checkpointing", False))


def layout_of(cfg: RunConfig, world: int | None = None) -> Layout:
    """The layout on `world` ranks (default: one data-parallel replica). `train.precision: auto`
    is read as bf16: a plan is for GPUs."""
    p = cfg.parallel
    model_ranks = p.tensor * p.pipeline
    world = model_ranks if world is None else world
    if world < 1 or world % model_ranks:
        raise UserError(f"--world {world}: expected a multiple of parallel.tensor × parallel.pipeline = {model_ranks}")
    bf16 = cfg.train.precision != "fp32"
    zero = 1 if bf16 and p.zero_stage == 0 and p.pipeline == 1 else p.zero_stage
    return Layout(p.tensor, p.pipeline, world // model_ranks, zero, bf16, checkpointing_of(cfg), p.offload_optimizer)


def resolved(cfg: RunConfig) -> RunConfig:
    """`cfg` with `model.vocab_size` resolved from `data.vocab_size` when automatic (as training does)."""
    if cfg.model.vocab_size:
        return cfg
    return dataclasses.replace(cfg, model=resolve_vocab(cfg.model, cfg.data.vocab_size))


def dense_of(cfg: RunConfig) -> RunConfig:
    """The same run with every linear dense."""
    return dataclasses.replace(cfg, sparsity=dataclasses.replace(cfg.sparsity, method=DENSE, allocation="uniform",
                                                                 supar=False))


@dataclass(frozen=True)
class SparseShard:
    """What one rank stores of one sparse linear."""

    rows: int  # the shard's [rows, cols]
    cols: int
    block: int
    capacity: int
    index_bytes: int
    budget_bytes: int
    score_cache_bytes: int
    offload_bytes: int

    @property
    def weights(self) -> int:
        return self.capacity * self.block**2


def sparse_shard(cfg: RunConfig, leaf: str, forward_blocks: int | None = None) -> SparseShard:
    """A `SparseLinear`'s storage on one rank, from the layer's global shape and its share of A
    (`forward_blocks`, None: uniform) — its constructor's sums."""
    s, tp = cfg.sparsity, cfg.parallel.tensor
    rows, cols = block_linear_shapes(cfg.model)[leaf]
    if tp > 1:
        rows, cols = shard_shape(leaf, rows, cols, tp)
    b = s.block
    n_blocks = (rows // b) * (cols // b)
    global_blocks = n_blocks * tp
    method = method_of(s.method)
    exploration = method.exploration(s)
    k_backward = set_sizes(s.density, exploration, global_blocks, forward_blocks)[1]
    capacity = shard_capacity(k_backward, tp, n_blocks, cfg.parallel.shard_headroom)
    index = 4 if n_blocks < 2**31 - 1 else 8
    caches = s.complement == "regenerate" and b >= CACHED_SCORES_MIN_BLOCK
    return SparseShard(rows, cols, b, capacity, capacity * (index + 1), method.extra_layer_bytes,
                       4 * n_blocks if caches else 0, 4 * rows * cols if s.complement == "offload" else 0)


def _is_sparse(cfg: RunConfig, leaf: str) -> bool:
    return method_of(cfg.sparsity.method).sparse and leaf in cfg.sparsity.targets


def layer_shards(cfg: RunConfig, layers) -> list[SparseShard]:
    """One rank's sparse linears of blocks `layers`, each sized at its allocation's share of A."""
    budgets = method_of(cfg.sparsity.method).forward_budgets(cfg)
    return [sparse_shard(cfg, leaf, budgets[linear_name(i, leaf)] if budgets else None)
            for i in layers for leaf in BLOCK_LINEAR_NAMES if _is_sparse(cfg, leaf)]


def stage_layers(cfg: RunConfig, stage: int) -> list[int]:
    m, p = cfg.model, cfg.parallel.pipeline
    return [i for i in range(m.n_layers) if stage_of(f"layers.{i}", m.n_layers, p) == stage]


def stage_contents(cfg: RunConfig, stage: int) -> dict[str, int]:
    """Elements optimised (in all and per optimizer parameter group, `train.param_groups`) and bytes
    of buffers one rank of `stage` holds."""
    m, tp, p = cfg.model, cfg.parallel.tensor, cfg.parallel.pipeline
    groups = dict.fromkeys(GROUPS, 0)
    buffers = caches = host = 0
    dims = block_linear_shapes(m)
    layers = stage_layers(cfg, stage)
    for shard in layer_shards(cfg, layers):
        groups["hidden_sparse"] += shard.weights
        buffers += shard.index_bytes + shard.budget_bytes
        caches += shard.score_cache_bytes
        host += shard.offload_bytes
    for leaf in BLOCK_LINEAR_NAMES:
        if not _is_sparse(cfg, leaf):
            rows, cols = dims[leaf]
            groups["hidden"] += len(layers) * rows * cols // tp
    groups["norm"] += 2 * m.d_model * len(layers)  # the two RMSNorm gains per block
    vocab_rows = m.vocab_size // tp
    if stage == 0:
        groups["embedding"] += vocab_rows * m.d_model
    if stage == p - 1:
        groups["norm"] += m.d_model
        groups["head"] += 0 if m.tie_embeddings else vocab_rows * m.d_model
    rotary_tables = len(layers) if p > 1 else 1  # a pipeline's block stages build one each
    return {"weights": sum(groups.values()), "groups": groups, "buffers": buffers, "caches": caches, "host": host,
            "rotary_elements": rotary_tables * 2 * m.max_seq_len * m.head_dim}


def largest_group_partition(cfg: RunConfig, layout: Layout, stage: int) -> int:
    """Elements of a rank's largest ZeRO partition of one parameter group: DeepSpeed's ZeRO-1 step
    flattens the fp32 gradients and runs the optimizer one group at a time, so its transients
    follow the largest group, not the whole model."""
    return max(math.ceil(w / layout.data) for w in stage_contents(cfg, stage)["groups"].values())


def model_state(cfg: RunConfig, layout: Layout, stage: int) -> dict[str, int]:
    """Bytes of each part of one rank's model state (`layout.host_parts` in host memory, the rest on the device)."""
    c = stage_contents(cfg, stage)
    w, e = c["weights"], layout.dtype_bytes
    dp = layout.data if layout.partitioned else 1
    part = math.ceil(w / dp)
    staging = e * largest_weight(cfg, layout) if layout.offload else 0
    offload = (4 + e) * part + staging if layout.offload else 0
    accumulated = w * e if cfg.train.grad_accum > 1 else 0
    return {
        "parameters": w * e,
        "gradients": accumulated + staging if layout.offload else w * (e if layout.partitioned else 4),
        "master_weights": 4 * part if layout.partitioned else 0,
        "optimizer_moments": 8 * part,
        "offload_buffers": offload,
        "indices_masks": c["buffers"],
        "score_caches": c["caches"],
        "rotary_tables": c["rotary_elements"] * e,
        "offload_host": c["host"],
    }


def in_flight(layout: Layout, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations a stage holds at once under 1F1B (one without a pipeline)."""
    return 1 if layout.pipeline == 1 else min(layout.pipeline - stage, micro_batches)


def block_activations(cfg: RunConfig, layout: Layout) -> int:
    """Bytes one Transformer block saves for its backward pass, per micro-batch, on one rank: two
    RMSNorms (fp32 input, normalised output, scaled output: (4 + 2e)·n·d each, not split by tensor
    parallelism), attention's q, k, v (k, v repeated to all heads), its output and the re-laid-out
    input of o_proj (5·e·n·d / T) with the fp32 log-sum-exp, and SwiGLU's gate, silu, up and product
    (4·e·n·f / T)."""
    m, t, tp, e = cfg.model, cfg.train, layout.tensor, layout.dtype_bytes
    n = t.micro_batch * t.seq_len
    return (2 * (4 + 2 * e) * n * m.d_model + e * n * (5 * m.d_model + 4 * m.ffn_hidden) // tp
            + 4 * n * m.n_heads // tp)


def activations(cfg: RunConfig, layout: Layout, stage: int, checkpointing: bool) -> dict[str, int]:
    """`saved`: bytes held for the backward passes in flight; `transient`: the most the backward
    pass allocates on top (gradients in flight, a checkpointed block's rebuilt activations)."""
    m, t, tp, e = cfg.model, cfg.train, layout.tensor, layout.dtype_bytes
    n = t.micro_batch * t.seq_len
    layers = len(stage_layers(cfg, stage))
    full = block_activations(cfg, layout)
    per_block = e * n * m.d_model if checkpointing else full
    saved = layers * per_block
    transient = e * n * (3 * m.ffn_hidden // tp + 2 * m.d_model) + (full if checkpointing and layers else 0)
    vocab = m.vocab_size // tp
    if stage == layout.pipeline - 1:  # final norm; the loss keeps fp32 log-probabilities of the vocabulary slice
        saved += (4 + 2 * e) * n * m.d_model + 4 * n * vocab
        transient = max(transient, (8 + (e if layout.bf16 else 0)) * n * vocab)
    if stage == 0:  # the embedding's gradient is dense
        transient = max(transient, e * vocab * m.d_model)
    flight = in_flight(layout, stage, t.grad_accum)
    pipe_buffers = 0 if layout.pipeline == 1 else 2 * max(2, flight) * e * n * m.d_model
    return {"saved": flight * saved + pipe_buffers, "transient": transient}


def kernel_workspace(cfg: RunConfig, layout: Layout) -> int:
    """The sparse products' largest transient: element mode scatters at most MAX_TILE_ELEMENTS of a
    shard densely; block mode gathers activations and products into workspaces of at most
    GATHER_CHUNK_ELEMENTS (and a [in, GATHER_TOKENS] transposed pass)."""
    e, widest = layout.dtype_bytes, 0
    for leaf in BLOCK_LINEAR_NAMES:
        if not _is_sparse(cfg, leaf):
            continue
        shard = sparse_shard(cfg, leaf)
        numel = shard.rows * shard.cols
        if shard.block == 1:
            widest = max(widest, min(numel, MAX_TILE_ELEMENTS) * e)
        else:
            widest = max(widest, (3 * min(GATHER_CHUNK_ELEMENTS, numel) + shard.cols * GATHER_TOKENS) * e)
    return widest


def reduce_transient(cfg: RunConfig, layout: Layout, stage: int) -> int:
    """The gradient reduction's copy at the end of the backward pass (the activations are freed by
    then, the gradients are not): ZeRO-1 copies every gradient into its reduce bucket, in the
    training dtype, of at most `DEEPSPEED_BUCKET_ELEMENTS` (the engine caps it at the rank's
    weights); without ZeRO, over more than one data-parallel replica, DeepSpeed's all-reduce
    flattens the fp32 gradients into buckets that close once they pass that size (a pipeline's
    bf16 optimizer reduces its fp32 copies so too, on one replica as well)."""
    w = stage_contents(cfg, stage)["weights"]
    if layout.zero_stage == 1:
        return layout.dtype_bytes * min(w, DEEPSPEED_BUCKET_ELEMENTS)
    if skips_lone_all_reduce(layout.zero_stage, layout.bf16, layout.data):
        return 0
    return 4 * min(w, DEEPSPEED_BUCKET_ELEMENTS + largest_weight(cfg, layout))


def largest_weight(cfg: RunConfig, layout: Layout) -> int:
    """Elements of a rank's largest parameter: the vocabulary shard or a sparse linear's slots."""
    return max([cfg.model.vocab_size // layout.tensor * cfg.model.d_model]
               + [shard.weights for shard in layer_shards(cfg, range(cfg.model.n_layers))])


def step_workspace(cfg: RunConfig, layout: Layout, stage: int) -> int:
    """What comes after the backward pass's activations are gone: the gradient reduction's copy;
    the optimizer step's transient, ZeRO's fp32 gradient partition of the group it is stepping
    (`largest_group_partition`; the fused AdamW over it, and without ZeRO over each parameter,
    allocates nothing; the ZeRO-0 gate's norm runs in small chunks; ZeRO-Offload keeps the
    partition on the host); and a reselection's scoring chunks.

    Under ZeRO-1 the reduce bucket is allocated at the backward pass's first gradient, so at its
    end (the embedding's backward) the bucket and every gradient of the stage are live at once,
    beyond the gradients the model state counts. Without offload the optimizer's partition covers
    as much; with offload, whose model state keeps only a staging buffer of gradients, this is
    the step's peak (measured: the 1.1B preset, docs/bench/scale_offload.md)."""
    partitioned = layout.partitioned and not layout.offload
    optimizer = 4 * largest_group_partition(cfg, layout, stage) if partitioned else 0
    reselect = 3 * 4 * SCORE_CHUNK_ELEMENTS if method_of(cfg.sparsity.method).sparse else 0
    reduce = reduce_transient(cfg, layout, stage)
    backward_end = 0
    if layout.zero_stage == 1:
        every_gradient = layout.dtype_bytes * stage_contents(cfg, stage)["weights"]
        backward_end = reduce + every_gradient - model_state(cfg, layout, stage)["gradients"]
    return max(reduce, optimizer, reselect, backward_end)


def rank_memory(cfg: RunConfig, layout: Layout, stage: int) -> dict:
    """One rank of `stage`: its parts (device and host), activations with and without checkpointing,
    and `total_bytes`, the device's fullest moment: model state + saved activations (per the config's
    checkpointing) + `workspace`, what the backward pass adds on top of them, or what the optimizer
    step (or a reselection) adds beyond the activations it follows."""
    state = model_state(cfg, layout, stage)
    full = activations(cfg, layout, stage, checkpointing=False)
    ckpt = activations(cfg, layout, stage, checkpointing=True)
    chosen = ckpt if layout.checkpointing else full
    kernels = kernel_workspace(cfg, layout)
    # The optimizer step and reselection run after the backward pass has freed the activations.
    workspace = max(chosen["transient"] + kernels, step_workspace(cfg, layout, stage) - chosen["saved"])
    parts = {**state, "activations": chosen["saved"], "workspace": workspace}
    device = {k: v for k, v in parts.items() if k not in layout.host_parts}
    return {
        "stage": stage,
        "parts": parts,
        "model_state_bytes": sum(state[k] for k in STATE_PARTS if k not in layout.host_parts),
        "host_bytes": sum(parts[k] for k in layout.host_parts),
        **({"offload": offload_step(cfg, layout, stage)} if layout.offload else {}),
        "activations_bytes": {"checkpointed": ckpt["saved"], "full": full["saved"]},
        "activation_transient_bytes": {"checkpointed": ckpt["transient"], "full": full["transient"]},
        "kernel_workspace_bytes": kernels,
        "in_flight_micro_batches": in_flight(layout, stage, cfg.train.grad_accum),
        "total_bytes": sum(device.values()),
    }


def offload_step(cfg: RunConfig, layout: Layout, stage: int) -> dict:
    """What ZeRO-Offload adds to every optimizer step of one rank: its partition's gradients go to
    the host in fp32 (4 bytes per weight) and its updated weights come back in the training dtype
    (DeepSpeed converts them on the host), and the CPU Adam steps the partition
    (`CPU_ADAM_SECONDS_PER_WEIGHT`; the copies can overlap the backward pass, the CPU Adam cannot
    overlap anything)."""
    part = math.ceil(stage_contents(cfg, stage)["weights"] / layout.data)
    return {"device_to_host_bytes": 4 * part, "host_to_device_bytes": layout.dtype_bytes * part,
            "cpu_adam_seconds": part * CPU_ADAM_SECONDS_PER_WEIGHT}


def plan_memory(cfg: RunConfig, layout: Layout) -> dict:
    """Every stage's rank, and the fullest one (`per_rank`)."""
    stages = [rank_memory(cfg, layout, stage) for stage in range(layout.pipeline)]
    return {"per_rank": max(stages, key=lambda r: r["total_bytes"]), "stages": stages}
