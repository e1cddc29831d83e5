"""Typed, sectioned run configuration: YAML file + `--set section.field=value` overrides.

Every field is validated here, in one place, so that a bad value fails at start-up with a line that
names the field and the allowed range, instead of deep inside DeepSpeed an hour into a run. Each
field carries a one-line docstring under it: `sparse-lm pretrain --print-config` prints them beside
the values, so the configuration documents itself. Fields that are worked out from others are
`None` ("automatic") in a file and resolved when the config is built; `model.vocab_size` needs the
tokenizer and stays `None` until `model.llama.resolve_vocab`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sparse_lm.errors import UserError
from sparse_lm.methods.registry import DENSE, METHODS, method_of
from sparse_lm.parallel.layout import BLOCK_LINEAR_NAMES, block_linear_shapes, shard_shape

# The registry's names (methods/registry.py), so a new method is one line there.
SparsityMethod = Literal[tuple(METHODS)]
Granularity = Literal["element", "block"]
Complement = Literal["regenerate", "offload"]
Promote = Literal["any", "trained"]
# How the forward budget is split over layers (sparsity/allocation.py; each method's `allocations`).
Allocation = Literal["uniform", "global", "erk", "pipeline_balanced"]
Candidates = Literal["backward_set", "dense"]
Precision = Literal["auto", "fp32", "bf16"]
ResumePolicy = Literal["auto", "never", "must"]

ALLOCATIONS = typing.get_args(Allocation)


def llama_ffn_hidden(d_model: int) -> int:
    """Llama's FFN width for a model width: 8/3·d rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * d_model / 3 / 64)


@dataclass
class ModelConfig:
    """Llama-style decoder shape. `n_kv_heads` and `ffn_hidden` left automatic (None, or 0 as older
    configs say) are resolved on construction; `vocab_size` needs the tokenizer (`resolve_vocab`)."""

    vocab_size: int | None = None
    """Embedding and LM-head rows; null: the tokenizer's size rounded up to vocab_multiple."""
    vocab_multiple: int = 64
    """An automatic vocab_size is rounded up to a multiple of this (tensor-parallel and kernel friendly)."""
    d_model: int = 256
    """Hidden width of the residual stream."""
    n_layers: int = 4
    """Number of Transformer blocks."""
    n_heads: int = 4
    """Attention (query) heads; must divide d_model into an even head dimension."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); null: n_heads (multi-head attention)."""
    ffn_hidden: int | None = None
    """Width of the SwiGLU feed-forward layer; null: Llama's 8/3·d_model rounded up to a multiple of 64."""
    max_seq_len: int = 256
    """Longest sequence the rotary embedding tables cover; train.seq_len may not exceed it."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    tie_embeddings: bool = False
    """Share the token embedding with the LM head (not with parallel.pipeline > 1)."""
    init_std: float = 0.02
    """Standard deviation of the initial weights (residual outputs are scaled down by √(2·n_layers))."""

    def __post_init__(self) -> None:
        self.vocab_size = self.vocab_size or None
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.ffn_hidden = self.ffn_hidden or llama_ffn_hidden(self.d_model)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class SparsityConfig:
    """Which block linears are sparse and how (docs/design/topkast.md, spartan.md; `static` and `dense`
    are baselines)."""

    method: SparsityMethod = DENSE
    """dense: no sparsity; static: a fixed seeded random set of size D; topkast: Top-KAST; spartan: Spartan."""
    density: float = 0.1
    """D: fraction of each sparse layer in the forward set A (Spartan: the target cost fraction ρ)."""
    exploration: float = 0.1
    """M: extra fraction in the backward set B, which holds the top D + M and is all that is stored."""
    granularity: Granularity = "element"
    """Unit of selection: single weights, or block_size × block_size tiles."""
    block_size: int = 16
    """Side b of the b×b tiles with granularity: block."""
    reselect_every: int = 100
    """Steps between reselections of A and B."""
    penalty: float = 0.0
    """Top-KAST's exploration penalty λ: an extra gradient λ·θ on A and λ·θ/D on the rest of B (0: off)."""
    freeze_masks_after: float = 1.0
    """Fraction of train.steps after which A and B stop changing (1.0: never)."""
    complement: Complement = "regenerate"
    """Weights outside B: regenerate from the seed when selected again, or offload to host memory."""
    promote: Promote = "any"
    """Top-KAST: blocks A may take at a reselection: any of B (the paper), or only those trained in B before."""
    churn_cap: float | None = None
    """Top-KAST: the most of A one reselection may replace, cosine-decayed to 0 by freeze_masks_after (null: no cap)."""
    targets: list[str] = field(default_factory=lambda: list(BLOCK_LINEAR_NAMES))
    """Which block linears are sparse (the others stay dense)."""
    allocation: Allocation = "uniform"
    """How A's budget splits over layers: uniform, erk (static, RigL, Spartan), pipeline_balanced, global (Spartan)."""
    beta: float = 10.0
    """Spartan: β_target of the soft top-k, scaled by √(block elements)."""
    warmup_frac: float = 0.2
    """Spartan: fraction of train.steps over which the budget anneals from all of B to ρ and β ramps up."""
    finetune_frac: float = 0.2
    """Spartan: last fraction of train.steps trained with the hard mask frozen."""
    candidates: Candidates = "backward_set"
    """Spartan: blocks the soft top-k ranks: Top-KAST's backward set B, or every block (small scale only)."""
    update_fraction: float = 0.3
    """RigL: α, the fraction of A dropped and regrown at the first update, cosine-decayed to 0 by freeze_masks_after."""
    supar: bool = False
    """SμPar: a sparse linear's init scaled to a dense layer's forward variance and its Adam lr ×1/density."""

    @property
    def block(self) -> int:
        return self.block_size if self.granularity == "block" else 1


@dataclass
class ParallelConfig:
    """How the model is split over processes; the data-parallel size is what remains of the world."""

    tensor: int = 1
    """Tensor-parallel size (each linear split over this many ranks)."""
    pipeline: int = 1
    """Pipeline-parallel size (the blocks split into this many stages)."""
    zero_stage: int = 0
    """ZeRO stage: 0, or 1 to partition Adam state over data-parallel ranks."""
    timeout_s: int = 600
    """Bound in seconds on every collective: a dead or stuck rank becomes an error, not a hang."""
    shard_headroom: float = 0.25
    """Spare B slots per tensor-parallel shard beyond its fair share (a layer's top-k may be uneven)."""
    verify_replicas: bool = False
    """After every reselection, check with one all-reduce that all data-parallel replicas chose alike."""
    offload_optimizer: bool = False
    """ZeRO-Offload: fp32 masters and Adam moments in host memory, stepped by DeepSpeed's CPU Adam (needs ZeRO-1)."""


@dataclass
class DataConfig:
    """Where the prepared token files are, and how `prepare-data` builds them."""

    path: str = "data/stdlib"
    """Directory of prepared token files (from `sparse-lm prepare-data`)."""
    vocab_size: int = 4096
    """Size of the sentencepiece tokenizer `prepare-data` trains."""
    heldout_fraction: float = 0.02
    """Fraction of the documents `prepare-data` keeps out of training for evaluation."""


@dataclass
class TrainConfig:
    """The optimisation loop: schedule, batch, optimizer, logging and where results go."""

    steps: int = 200
    """Optimizer steps to train for."""
    seq_len: int = 256
    """Tokens per training sequence (at most model.max_seq_len)."""
    micro_batch: int = 8
    """Sequences per forward/backward pass on each data-parallel rank."""
    grad_accum: int = 1
    """Micro-batches accumulated into one optimizer step."""
    lr: float = 3e-3
    """Base peak learning rate, reached after warmup_steps; each parameter group's is lr × its lr_mult_*."""
    lr_mult_embedding: float = 1.0
    """Multiplier of lr for the token embedding (and the LM head when it is tied to it)."""
    lr_mult_head: float = 1.0
    """Multiplier of lr for the LM head (output projection)."""
    lr_mult_hidden: float = 1.0
    """Multiplier of lr for the block linears (a sparse one's is further ×1/density with sparsity.supar)."""
    lr_mult_norm: float = 1.0
    """Multiplier of lr for the RMSNorm gains."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay, as a fraction of lr."""
    warmup_steps: int = 20
    """Steps of linear learning-rate warm-up from 0."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    """Adam's first-moment decay."""
    beta2: float = 0.95
    """Adam's second-moment decay."""
    eps: float = 1e-8
    """Adam's epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold (0 disables clipping)."""
    seed: int = 1234
    """Seeds the initial weights, regenerated complements and data order."""
    precision: Precision = "auto"
    """Compute precision; auto: bf16 on a CUDA device, fp32 otherwise."""
    max_bad_steps: int = 5
    """Consecutive non-finite steps (each skipped) before the run stops."""
    activation_checkpointing: bool = False
    """Recompute each block's forward in backward: less activation memory for ~1/3 more compute."""
    log_every: int = 10
    """Steps between progress lines and metrics records."""
    eval_every: int = 50
    """Steps between held-out evaluations."""
    eval_batches: int = 8
    """Held-out micro-batches per evaluation."""
    out_dir: str = "runs/tiny"
    """Run directory: metrics.jsonl, the summary and (by default) the checkpoints."""
    monitor: dict = field(default_factory=dict)
    """DeepSpeed's monitors, fed the scalars of metrics.jsonl: {tensorboard: DIR, csv: DIR, wandb: PROJECT}."""


@dataclass
class CheckpointConfig:
    """When checkpoints are written and whether a run resumes from one."""

    dir: str = ""
    """Checkpoint root; empty: <train.out_dir>/checkpoints."""
    every: int = 100
    """Steps between checkpoints (one is also written at the end)."""
    keep: int = 3
    """How many of the newest checkpoints to keep."""
    resume: ResumePolicy = "auto"
    """auto: resume from the latest checkpoint if there is one; never: start fresh; must: fail without one."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.train.out_dir) / "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> RunConfig:
        for section in dataclasses.fields(self):
            _check_choices(section.name, getattr(self, section.name))
            _VALIDATORS[section.name](self)
        return self


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(RunConfig)[f.name] for f in dataclasses.fields(RunConfig)}


@functools.cache
def field_docs(section: type) -> dict[str, str]:
    """The one-line docstring under each field of a section dataclass, by field name."""
    body = ast.parse(inspect.getsource(section)).body[0].body
    return {node.target.id: doc.value.value for node, doc in itertools.pairwise(body)
            if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)}


def _fail(name: str, expected: str, got: Any) -> None:
    raise UserError(f"config field {name}: expected {expected}, got {got!r}")


def require(ok: bool, name: str, expected: str, got: Any) -> None:
    """Fail with the one-line config error naming `name` unless `ok` (also used by the methods' checks)."""
    if not ok:
        _fail(name, expected, got)


def _choices_text(choices: tuple) -> str:
    return f"one of: {', '.join(map(str, choices))}"


def _check_choices(section: str, values: Any) -> None:
    """Every `Literal` field holds one of its choices (also for configs built in Python)."""
    for name, hint in typing.get_type_hints(type(values)).items():
        if typing.get_origin(hint) is Literal:
            value = getattr(values, name)
            require(value in typing.get_args(hint), f"{section}.{name}", _choices_text(typing.get_args(hint)), value)


def _validate_model(cfg: RunConfig) -> None:
    m = cfg.model
    for name in ("d_model", "n_layers", "n_heads", "max_seq_len", "vocab_multiple"):
        require(getattr(m, name) >= 1, f"model.{name}", "an integer >= 1", getattr(m, name))
    for name in ("vocab_size", "n_kv_heads", "ffn_hidden"):
        value = getattr(m, name)
        require(value is None or value >= 1, f"model.{name}", "an integer >= 1, or null (automatic)", value)
    require(m.d_model % m.n_heads == 0, "model.n_heads", f"a divisor of model.d_model={m.d_model}", m.n_heads)
    require(m.head_dim % 2 == 0, "model.n_heads", "a value giving an even head dimension (RoPE rotates pairs)",
            m.n_heads)
    require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads", f"a divisor of model.n_heads={m.n_heads}", m.n_kv_heads)
    require(m.rope_theta > 0, "model.rope_theta", "a positive number", m.rope_theta)
    require(0 < m.norm_eps < 1, "model.norm_eps", "a number in (0, 1)", m.norm_eps)
    require(m.init_std > 0, "model.init_std", "a positive number", m.init_std)


def _validate_sparsity(cfg: RunConfig) -> None:
    m, s, p = cfg.model, cfg.sparsity, cfg.parallel
    require(0 < s.density <= 1, "sparsity.density", "a number in (0, 1]", s.density)
    require(s.exploration >= 0, "sparsity.exploration", "a number >= 0", s.exploration)
    require(s.density + s.exploration <= 1, "sparsity.exploration",
            f"at most 1 - sparsity.density = {1 - s.density:g} (B is the top D + M of a layer)", s.exploration)
    require(s.block_size >= 1, "sparsity.block_size", "an integer >= 1", s.block_size)
    require(s.reselect_every >= 1, "sparsity.reselect_every", "an integer >= 1", s.reselect_every)
    require(s.penalty >= 0, "sparsity.penalty", "a number >= 0", s.penalty)
    require(0 <= s.freeze_masks_after <= 1, "sparsity.freeze_masks_after", "a fraction of train.steps in [0, 1]",
            s.freeze_masks_after)
    require(bool(s.targets) and all(x in BLOCK_LINEAR_NAMES for x in s.targets), "sparsity.targets",
            f"a non-empty list drawn from {list(BLOCK_LINEAR_NAMES)}", s.targets)
    require(0 < s.update_fraction <= 1, "sparsity.update_fraction", "a number in (0, 1]", s.update_fraction)
    require(s.churn_cap is None or 0 < s.churn_cap <= 1, "sparsity.churn_cap", "a number in (0, 1], or null (no cap)",
            s.churn_cap)
    require(s.beta > 0, "sparsity.beta", "a positive number", s.beta)
    for name in ("warmup_frac", "finetune_frac"):
        require(0 <= getattr(s, name) <= 1, f"sparsity.{name}", "a fraction of train.steps in [0, 1]",
                getattr(s, name))
    require(s.warmup_frac + s.finetune_frac <= 1, "sparsity.finetune_frac",
            f"at most 1 - sparsity.warmup_frac = {1 - s.warmup_frac:g}", s.finetune_frac)
    method = method_of(s.method)
    method.validate(cfg)
    if not method.sparse or s.granularity != "block":
        return
    for dim, what in ((m.d_model, "model.d_model"), (m.n_kv_heads * m.head_dim, "the k/v width"),
                      (m.ffn_hidden, "the FFN width")):
        require(dim % s.block_size == 0, "sparsity.block_size", f"a divisor of {what}={dim}", s.block_size)
    if p.tensor > 1 and all(n % p.tensor == 0 for n in (m.n_heads, m.n_kv_heads, m.ffn_hidden)):
        for leaf, (rows, cols) in block_linear_shapes(m).items():
            shard = shard_shape(leaf, rows, cols, p.tensor)
            require(shard[0] % s.block_size == 0 and shard[1] % s.block_size == 0, "sparsity.block_size",
                    f"a divisor of every tensor-parallel shard (a block never straddles two ranks): {leaf} "
                    f"[{rows}, {cols}] is [{shard[0]}, {shard[1]}] on each of parallel.tensor={p.tensor} ranks",
                    s.block_size)


def _validate_parallel(cfg: RunConfig) -> None:
    m, p = cfg.model, cfg.parallel
    require(p.tensor >= 1, "parallel.tensor", "an integer >= 1", p.tensor)
    require(1 <= p.pipeline <= m.n_layers, "parallel.pipeline", f"an integer in [1, model.n_layers={m.n_layers}]",
            p.pipeline)
    if p.pipeline > 1:
        require(not m.tie_embeddings, "model.tie_embeddings",
                "false with parallel.pipeline > 1 (the embedding and the LM head live on different stages)",
                m.tie_embeddings)
    require(p.shard_headroom >= 0, "parallel.shard_headroom", "a number >= 0 (fraction of spare slots)",
            p.shard_headroom)
    if p.tensor > 1:
        vocab = (m.vocab_size, "model.vocab_size") if m.vocab_size else (m.vocab_multiple, "model.vocab_multiple")
        for value, what in ((m.n_heads, "model.n_heads"), (m.n_kv_heads, "the number of k/v heads"),
                            (m.ffn_hidden, "the FFN width"), vocab):
            require(value % p.tensor == 0, "parallel.tensor", f"a divisor of {what}={value}", p.tensor)
    require(p.timeout_s >= 1, "parallel.timeout_s", "an integer >= 1 (seconds)", p.timeout_s)
    require(p.zero_stage in (0, 1), "parallel.zero_stage",
            "0 or 1 (ZeRO-1 partitions Adam state over data-parallel ranks)", p.zero_stage)
    if p.offload_optimizer:
        require(p.zero_stage == 1, "parallel.offload_optimizer",
                "false unless parallel.zero_stage=1 (ZeRO-Offload moves ZeRO-1's partitions to the host)", True)


def _validate_data(cfg: RunConfig) -> None:
    d = cfg.data
    require(bool(d.path), "data.path", "a prepared data directory", d.path)
    require(260 <= d.vocab_size <= 2**31 - 1, "data.vocab_size",
            "an integer in [260, 2^31) (256 byte pieces + unk, bos, eos + merges)", d.vocab_size)
    require(0 < d.heldout_fraction < 1, "data.heldout_fraction", "a number in (0, 1)", d.heldout_fraction)


def _validate_train(cfg: RunConfig) -> None:
    m, t = cfg.model, cfg.train
    for name in ("steps", "seq_len", "micro_batch", "grad_accum", "log_every", "eval_every", "eval_batches"):
        require(getattr(t, name) >= 1, f"train.{name}", "an integer >= 1", getattr(t, name))
    require(t.seq_len <= m.max_seq_len, "train.seq_len", f"at most model.max_seq_len={m.max_seq_len}", t.seq_len)
    require(t.lr > 0, "train.lr", "a positive number", t.lr)
    for name in LR_MULTIPLIERS:
        require(getattr(t, name) > 0, f"train.{name}", "a positive number (a multiplier of train.lr)",
                getattr(t, name))
    require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "a number in [0, 1]", t.min_lr_ratio)
    require(t.warmup_steps >= 0, "train.warmup_steps", "an integer >= 0", t.warmup_steps)
    require(t.weight_decay >= 0, "train.weight_decay", "a number >= 0", t.weight_decay)
    for name in ("beta1", "beta2"):
        require(0 <= getattr(t, name) < 1, f"train.{name}", "a number in [0, 1)", getattr(t, name))
    require(t.eps > 0, "train.eps", "a positive number", t.eps)
    require(t.grad_clip >= 0, "train.grad_clip", "a number >= 0 (0 disables clipping)", t.grad_clip)
    require(t.max_bad_steps >= 1, "train.max_bad_steps", "an integer >= 1", t.max_bad_steps)
    require(0 <= t.seed < 2**31, "train.seed", "an integer in [0, 2^31)", t.seed)  # seeds torch generators
    require(bool(t.out_dir), "train.out_dir", "a directory path", t.out_dir)
    for key, value in t.monitor.items():
        require(key in MONITORS, f"train.monitor.{key}", f"one of {', '.join(MONITORS)}", key)
        require(isinstance(value, str) and bool(value), f"train.monitor.{key}", MONITORS[key], value)


def _validate_checkpoint(cfg: RunConfig) -> None:
    c = cfg.checkpoint
    require(c.every >= 1, "checkpoint.every", "an integer >= 1", c.every)
    require(c.keep >= 1, "checkpoint.keep", "an integer >= 1", c.keep)


LR_MULTIPLIERS = ("lr_mult_embedding", "lr_mult_head", "lr_mult_hidden", "lr_mult_norm")

MONITORS = {"tensorboard": "a directory for TensorBoard event files", "csv": "a directory for CSV files",
            "wandb": "a Weights & Biases project name"}


_VALIDATORS = {"model": _validate_model, "sparsity": _validate_sparsity, "parallel": _validate_parallel,
               "data": _validate_data, "train": _validate_train, "checkpoint": _validate_checkpoint}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check a YAML value against the field's type (ints are accepted for floats, null for `X | None`)."""
    if isinstance(hint, types.UnionType):
        if value is None:
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is Literal:
        require(value in typing.get_args(hint), name, _choices_text(typing.get_args(hint)), value)
    elif hint is bool:
        require(isinstance(value, bool), name, "true or false", value)
    elif hint is int:
        require(isinstance(value, int) and not isinstance(value, bool), name, "an integer", value)
    elif hint is float:
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        require(isinstance(value, (int, float)) and not isinstance(value, bool), name, "a number", value)
        value = float(value)
        require(math.isfinite(value), name, "a finite number", value)  # YAML's .inf / .nan, "inf", "nan"
    elif hint is str:
        require(isinstance(value, str), name, "a string", value)
    elif typing.get_origin(hint) is list:
        if isinstance(value, str):  # --set sparsity.targets=q_proj,v_proj
            value = [v.strip() for v in value.split(",") if v.strip()]
        require(isinstance(value, list) and all(isinstance(v, str) for v in value), name, "a list of names", value)
    elif hint is dict:
        require(isinstance(value, dict), name, "a mapping", value)
    return value


def _collect(values: dict[str, dict[str, Any]], tree: Any, origin: str) -> None:
    """Check `tree` (sections of fields) and merge its coerced values into `values`."""
    if not isinstance(tree, dict):
        raise UserError(f"{origin}: expected a mapping of sections (model, sparsity, ...), got {type(tree).__name__}")
    for section, fields in tree.items():
        if section not in SECTIONS:
            raise UserError(f"{origin}: unknown section {section!r}; expected one of {sorted(SECTIONS)}")
        if not isinstance(fields, dict):
            raise UserError(f"{origin}: section {section!r} must be a mapping, got {fields!r}")
        hints = typing.get_type_hints(SECTIONS[section])
        for key, value in fields.items():
            if key not in hints:
                raise UserError(f"{origin}: unknown field {section}.{key}; expected one of {sorted(hints)}")
            values[section][key] = _coerce(f"{section}.{key}", value, hints[key])


def _build(trees: list[tuple[Any, str]]) -> RunConfig:
    """Defaults ← each (tree, origin) in turn, then construction (resolving automatic fields) and validation."""
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for tree, origin in trees:
        _collect(values, tree, origin)
    return RunConfig(**{section: SECTIONS[section](**values[section]) for section in SECTIONS}).validate()


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["train.steps=200", "model.tie_embeddings=true"] into a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise UserError(f"--set {item!r}: expected section.field=value, e.g. train.steps=200")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise UserError(f"--set {item!r}: value is not valid YAML ({exc.__class__.__name__})") from None
        tree.setdefault(parts[0], {})[parts[1]] = value
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults ← YAML file ← `--set` overrides, then validation."""
    trees: list[tuple[Any, str]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path}: not found")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"config file {path}: invalid YAML{where}") from None
        trees.append((tree, f"config file {path}"))
    if overrides:
        trees.append((parse_overrides(overrides), "--set"))
    return _build(trees)


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """Rebuild a validated config from `RunConfig.to_dict()` (as stored in checkpoint manifests)."""
    return _build([(tree, "stored config")])
