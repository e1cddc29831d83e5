"""Typed, sectioned run configuration: YAML file + `--set section.field=value` overrides.

Every field is validated here, in one place, so that a bad value fails at start-up with a line that
names the field and the allowed range, instead of deep inside DeepSpeed an hour into a run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparse_lm.errors import UserError
from sparse_lm.parallel.layout import COLUMN_PARALLEL

# The linears inside a Transformer block, in forward order (Hugging Face Llama names).
BLOCK_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPARSITY_METHODS = ("dense", "static", "topkast", "spartan")
# How Spartan splits its budget over layers (docs/design/spartan.md, sparsity/allocation.py).
ALLOCATIONS = ("uniform", "global", "erk", "cost", "pipeline_balanced")


def block_linear_shapes(m: "ModelConfig") -> dict[str, tuple[int, int]]:
    """[rows (out), cols (in)] of each linear of a Transformer block, by name."""
    kv = m.kv_heads * m.head_dim
    return {"q_proj": (m.d_model, m.d_model), "k_proj": (kv, m.d_model), "v_proj": (kv, m.d_model),
            "o_proj": (m.d_model, m.d_model), "gate_proj": (m.ffn_dim, m.d_model), "up_proj": (m.ffn_dim, m.d_model),
            "down_proj": (m.d_model, m.ffn_dim)}


@dataclass
class ModelConfig:
    """Llama-style decoder shape. `vocab_size: 0` means: the tokenizer's size, rounded up."""

    vocab_size: int = 0
    vocab_multiple: int = 64
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0
    ffn_hidden: int = 0
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """Llama's rule when unset: 8/3·d rounded up to a multiple of 64."""
        if self.ffn_hidden:
            return self.ffn_hidden
        return 64 * math.ceil(8 * self.d_model / 3 / 64)


@dataclass
class SparsityConfig:
    """Which block linears are sparse and how (docs/design/topkast.md, spartan.md; `static` and `dense` are baselines).

    `density` is D (the forward set A; for Spartan the target cost fraction ρ), `exploration` M
    (B holds D + M). `block_size` applies to `granularity: block` (b×b tiles). `freeze_masks_after`
    is a fraction of `train.steps` after which A and B stop changing (1.0 = never; Top-KAST).
    Spartan only: `beta` (β_target, scaled by √(block elements)), `warmup_frac` (budget annealed from
    all of B to ρ, β ramped), `finetune_frac` (last fraction of steps with the hard mask frozen),
    `allocation` (how the total budget is split over layers, `sparsity/allocation.py`) and
    `candidates` (`backward_set`: Top-KAST's B; `dense`: every block, small scale only).
    """

    method: str = "dense"
    density: float = 0.1
    exploration: float = 0.1
    granularity: str = "element"
    block_size: int = 16
    reselect_every: int = 100
    penalty: float = 1e-4
    freeze_masks_after: float = 1.0
    complement: str = "regenerate"
    targets: list = field(default_factory=lambda: list(BLOCK_LINEAR_NAMES))
    allocation: str = "uniform"
    beta: float = 10.0
    warmup_frac: float = 0.2
    finetune_frac: float = 0.2
    candidates: str = "backward_set"

    @property
    def block(self) -> int:
        return self.block_size if self.granularity == "block" else 1


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    zero_stage: int = 0
    timeout_s: int = 600  # bound on every collective: a dead or stuck rank becomes an error, not a hang
    # Spare B slots per tensor-parallel shard beyond its fair share k_B/T (sparsity/storage.py): a
    # layer's exact top-k may put more of B on one shard than another.
    shard_headroom: float = 0.25
    # After every reselection, check that all data-parallel replicas picked the same sets (one
    # all-reduce of a checksum); off by default, replicas are deterministic by construction.
    verify_replicas: bool = False


@dataclass
class DataConfig:
    """Where the prepared token files are, and how `prepare-data` builds them."""

    path: str = "data/stdlib"
    vocab_size: int = 4096
    heldout_fraction: float = 0.02


@dataclass
class TrainConfig:
    steps: int = 200
    seq_len: int = 256
    micro_batch: int = 8
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1234
    precision: str = "auto"
    max_bad_steps: int = 5  # consecutive non-finite steps (skipped) before the run stops
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    out_dir: str = "runs/tiny"
    # DeepSpeed's monitors, fed the scalars of metrics.jsonl: {tensorboard: DIR, csv: DIR, wandb: PROJECT}
    monitor: dict = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    """`dir` empty means `<train.out_dir>/checkpoints`."""

    dir: str = ""
    every: int = 100
    keep: int = 3
    resume: str = "auto"


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

    def validate(self) -> "RunConfig":
        _validate(self)
        return self


def _fail(name: str, expected: str, got: Any) -> None:
    raise UserError(f"config field {name}: expected {expected}, got {got!r}")


def _require(ok: bool, name: str, expected: str, got: Any) -> None:
    if not ok:
        _fail(name, expected, got)


def _validate(cfg: RunConfig) -> None:
    m, s, p, d, t, c = cfg.model, cfg.sparsity, cfg.parallel, cfg.data, cfg.train, cfg.checkpoint
    for name in ("d_model", "n_layers", "n_heads", "max_seq_len", "vocab_multiple"):
        _require(getattr(m, name) >= 1, f"model.{name}", "an integer >= 1", getattr(m, name))
    for name in ("vocab_size", "n_kv_heads", "ffn_hidden"):
        _require(getattr(m, name) >= 0, f"model.{name}", "an integer >= 0 (0 = automatic)", getattr(m, name))
    _require(m.d_model % m.n_heads == 0, "model.n_heads", f"a divisor of model.d_model={m.d_model}", m.n_heads)
    _require(m.head_dim % 2 == 0, "model.n_heads", "a value giving an even head dimension (RoPE rotates pairs)", m.n_heads)
    _require(m.n_heads % m.kv_heads == 0, "model.n_kv_heads", f"a divisor of model.n_heads={m.n_heads}", m.n_kv_heads)
    _require(m.rope_theta > 0, "model.rope_theta", "a positive number", m.rope_theta)
    _require(0 < m.norm_eps < 1, "model.norm_eps", "a number in (0, 1)", m.norm_eps)
    _require(m.init_std > 0, "model.init_std", "a positive number", m.init_std)

    _require(s.method in SPARSITY_METHODS, "sparsity.method", f"one of: {', '.join(SPARSITY_METHODS)}", s.method)
    _require(0 < s.density <= 1, "sparsity.density", "a number in (0, 1]", s.density)
    _require(s.exploration >= 0, "sparsity.exploration", "a number >= 0", s.exploration)
    _require(s.density + s.exploration <= 1, "sparsity.exploration",
             f"at most 1 - sparsity.density = {1 - s.density:g} (B is the top D + M of a layer)", s.exploration)
    _require(s.granularity in ("element", "block"), "sparsity.granularity", "one of: element, block", s.granularity)
    _require(s.block_size >= 1, "sparsity.block_size", "an integer >= 1", s.block_size)
    _require(s.reselect_every >= 1, "sparsity.reselect_every", "an integer >= 1", s.reselect_every)
    _require(s.penalty >= 0, "sparsity.penalty", "a number >= 0", s.penalty)
    _require(0 <= s.freeze_masks_after <= 1, "sparsity.freeze_masks_after", "a fraction of train.steps in [0, 1]",
             s.freeze_masks_after)
    _require(s.complement in ("regenerate", "offload"), "sparsity.complement", "one of: regenerate, offload", s.complement)
    _require(bool(s.targets) and all(x in BLOCK_LINEAR_NAMES for x in s.targets), "sparsity.targets",
             f"a non-empty list drawn from {list(BLOCK_LINEAR_NAMES)}", s.targets)
    if s.method == "spartan":
        _require(s.allocation in ALLOCATIONS, "sparsity.allocation", f"one of: {', '.join(ALLOCATIONS)}", s.allocation)
    else:
        _require(s.allocation == "uniform", "sparsity.allocation",
                 f"uniform with sparsity.method={s.method} (other allocations are Spartan's)", s.allocation)
    _require(s.beta > 0, "sparsity.beta", "a positive number", s.beta)
    for name in ("warmup_frac", "finetune_frac"):
        _require(0 <= getattr(s, name) <= 1, f"sparsity.{name}", "a fraction of train.steps in [0, 1]", getattr(s, name))
    _require(s.warmup_frac + s.finetune_frac <= 1, "sparsity.finetune_frac",
             f"at most 1 - sparsity.warmup_frac = {1 - s.warmup_frac:g}", s.finetune_frac)
    _require(s.candidates in ("backward_set", "dense"), "sparsity.candidates", "one of: backward_set, dense", s.candidates)
    if s.method != "dense" and s.granularity == "block":
        ffn = m.ffn_dim
        for dim, what in ((m.d_model, "model.d_model"), (m.kv_heads * m.head_dim, "the k/v width"), (ffn, "the FFN width")):
            _require(dim % s.block_size == 0, "sparsity.block_size", f"a divisor of {what}={dim}", s.block_size)
        if p.tensor > 1 and m.n_heads % p.tensor == 0 and m.kv_heads % p.tensor == 0 and m.ffn_dim % p.tensor == 0:
            for leaf, (rows, cols) in block_linear_shapes(m).items():
                shard = (rows // p.tensor, cols) if leaf in COLUMN_PARALLEL else (rows, cols // p.tensor)
                _require(shard[0] % s.block_size == 0 and shard[1] % s.block_size == 0, "sparsity.block_size",
                         f"a divisor of every tensor-parallel shard (a block never straddles two ranks): {leaf} "
                         f"[{rows}, {cols}] is [{shard[0]}, {shard[1]}] on each of parallel.tensor={p.tensor} ranks",
                         s.block_size)

    _require(p.tensor >= 1, "parallel.tensor", "an integer >= 1", p.tensor)
    _require(1 <= p.pipeline <= m.n_layers, "parallel.pipeline", f"an integer in [1, model.n_layers={m.n_layers}]", p.pipeline)
    if p.pipeline > 1:
        _require(not m.tie_embeddings, "model.tie_embeddings",
                 "false with parallel.pipeline > 1 (the embedding and the LM head live on different stages)",
                 m.tie_embeddings)
    _require(p.shard_headroom >= 0, "parallel.shard_headroom", "a number >= 0 (fraction of spare slots)", p.shard_headroom)
    if p.tensor > 1:
        tp = p.tensor
        for value, what in ((m.n_heads, "model.n_heads"), (m.kv_heads, "the number of k/v heads"),
                            (m.ffn_dim, "the FFN width"), (m.vocab_size or m.vocab_multiple, "model.vocab_size" if m.vocab_size else "model.vocab_multiple")):
            _require(value % tp == 0, "parallel.tensor", f"a divisor of {what}={value}", tp)
    _require(p.timeout_s >= 1, "parallel.timeout_s", "an integer >= 1 (seconds)", p.timeout_s)
    _require(p.zero_stage in (0, 1), "parallel.zero_stage", "0 or 1 (ZeRO-1 partitions Adam state over data-parallel ranks)", p.zero_stage)

    _require(bool(d.path), "data.path", "a prepared data directory", d.path)
    _require(260 <= d.vocab_size <= 2**31 - 1, "data.vocab_size", "an integer in [260, 2^31) (256 byte pieces + unk, bos, eos + merges)", d.vocab_size)
    _require(0 < d.heldout_fraction < 1, "data.heldout_fraction", "a number in (0, 1)", d.heldout_fraction)

    for name in ("steps", "seq_len", "micro_batch", "grad_accum", "log_every", "eval_every", "eval_batches"):
        _require(getattr(t, name) >= 1, f"train.{name}", "an integer >= 1", getattr(t, name))
    _require(
        t.seq_len <= m.max_seq_len, "train.seq_len", f"at most model.max_seq_len={m.max_seq_len}", t.seq_len
    )
    _require(t.lr > 0, "train.lr", "a positive number", t.lr)
    _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "a number in [0, 1]", t.min_lr_ratio)
    _require(t.warmup_steps >= 0, "train.warmup_steps", "an integer >= 0", t.warmup_steps)
    _require(t.weight_decay >= 0, "train.weight_decay", "a number >= 0", t.weight_decay)
    for name in ("beta1", "beta2"):
        _require(0 <= getattr(t, name) < 1, f"train.{name}", "a number in [0, 1)", getattr(t, name))
    _require(t.eps > 0, "train.eps", "a positive number", t.eps)
    _require(t.grad_clip >= 0, "train.grad_clip", "a number >= 0 (0 disables clipping)", t.grad_clip)
    _require(t.max_bad_steps >= 1, "train.max_bad_steps", "an integer >= 1", t.max_bad_steps)
    _require(0 <= t.seed < 2**31, "train.seed", "an integer in [0, 2^31)", t.seed)  # seeds torch generators
    _require(t.precision in ("auto", "fp32", "bf16"), "train.precision", "one of: auto, fp32, bf16", t.precision)
    _require(bool(t.out_dir), "train.out_dir", "a directory path", t.out_dir)
    for key, value in t.monitor.items():
        _require(key in MONITORS, f"train.monitor.{key}", f"one of {', '.join(MONITORS)}", key)
        _require(isinstance(value, str) and bool(value), f"train.monitor.{key}", MONITORS[key], value)

    _require(c.every >= 1, "checkpoint.every", "an integer >= 1", c.every)
    _require(c.keep >= 1, "checkpoint.keep", "an integer >= 1", c.keep)
    _require(c.resume in ("auto", "never", "must"), "checkpoint.resume", "one of: auto, never, must", c.resume)


MONITORS = {"tensorboard": "a directory for TensorBoard event files", "csv": "a directory for CSV files",
            "wandb": "a Weights & Biases project name"}


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Check a YAML value against the dataclass default's type (ints are accepted for floats)."""
    kind = type(default)
    if kind is bool:
        _require(isinstance(value, bool), name, "true or false", value)
    elif kind is int:
        _require(isinstance(value, int) and not isinstance(value, bool), name, "an integer", value)
    elif kind is float:
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), name, "a number", value)
        value = float(value)
        _require(math.isfinite(value), name, "a finite number", value)  # YAML's .inf / .nan, "inf", "nan"
    elif kind is str:
        _require(isinstance(value, str), name, "a string", value)
    elif kind is list:
        if isinstance(value, str):  # --set sparsity.targets=q_proj,v_proj
            value = [v.strip() for v in value.split(",") if v.strip()]
        _require(isinstance(value, list) and all(isinstance(v, str) for v in value), name, "a list of names", value)
    elif kind is dict:
        _require(isinstance(value, dict), name, "a mapping", value)
    return value


def _apply(cfg: RunConfig, tree: dict[str, Any], origin: str) -> None:
    if not isinstance(tree, dict):
        raise UserError(f"{origin}: expected a mapping of sections (model, sparsity, ...), got {type(tree).__name__}")
    sections = {f.name for f in dataclasses.fields(cfg)}
    for section, values in tree.items():
        if section not in sections:
            raise UserError(f"{origin}: unknown section {section!r}; expected one of {sorted(sections)}")
        target = getattr(cfg, section)
        if not isinstance(values, dict):
            raise UserError(f"{origin}: section {section!r} must be a mapping, got {values!r}")
        known = {f.name: f for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in known:
                raise UserError(f"{origin}: unknown field {section}.{key}; expected one of {sorted(known)}")
            value = _coerce(f"{section}.{key}", value, getattr(target, key))
            setattr(target, key, value)


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
    cfg = RunConfig()
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
        _apply(cfg, tree, f"config file {path}")
    if overrides:
        _apply(cfg, parse_overrides(overrides), "--set")
    return cfg.validate()


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """Rebuild a validated config from `RunConfig.to_dict()` (as stored in checkpoint manifests)."""
    cfg = RunConfig()
    _apply(cfg, tree, "stored config")
    return cfg.validate()
