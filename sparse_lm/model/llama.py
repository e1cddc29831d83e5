"""A plain Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU, optional grouped-query attention.

The model only decides *shapes*; every projection inside a block is built by a `LinearFactory`
(name, in_features, out_features — the whole layer's), so sparse and tensor-parallel linears
replace `nn.Linear` without touching the blocks: a tensor-parallel factory returns this rank's
shard, and attention simply sees fewer heads. The vocabulary (embedding, LM head, loss) is split
over tensor-parallel ranks with megatron-core's vocab-parallel embedding and cross-entropy. Names, the rotary convention (rotate-half) and the GQA head order
follow Hugging Face's `LlamaForCausalLM`, so export is a renaming of keys, not a numerical change.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparse_lm.config import ModelConfig
from sparse_lm.errors import UserError
from sparse_lm.parallel.layers import ShardLinear, enter_region, shard_spec, sharded_modules, vocab_cross_entropy, vocab_embedding
from sparse_lm.parallel.layout import ShardSpec, canonical_name

LinearFactory = Callable[[str, int, int], nn.Module]

# Output projections get their init scaled by 1/sqrt(2·n_layers) so the residual stream stays O(1).
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


def dense_linear(name: str, in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """Rotate-half RoPE with a cached cos/sin table (a buffer that is not saved: it is derived)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """x: [batch, heads, seq, head_dim], at positions start, start + 1, ..."""
        seq = x.shape[-2]
        cos, sin = self.cos[start:start + seq].to(x.dtype), self.sin[start:start + seq].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, linear: LinearFactory, rotary: Rotary):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        d, kv_dim = cfg.d_model, cfg.kv_heads * cfg.head_dim
        self.q_proj = linear(f"{prefix}.q_proj", d, d)
        self.k_proj = linear(f"{prefix}.k_proj", d, kv_dim)
        self.v_proj = linear(f"{prefix}.v_proj", d, kv_dim)
        self.o_proj = linear(f"{prefix}.o_proj", d, d)
        self.rotary = rotary

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        """`cache` (generation): this layer's keys and values of the positions before x — an object
        with `length` and `append(k, v)` returning all keys and values so far (see generate/cache.py)."""
        b, t, _ = x.shape
        start = 0 if cache is None else cache.length
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q, start), self.rotary(k, start)
        if cache is not None:
            k, v = cache.append(k, v)
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # query i (position start + i) sees keys 0 .. start + i
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, linear: LinearFactory):
        super().__init__()
        self.gate_proj = linear(f"{prefix}.gate_proj", cfg.d_model, cfg.ffn_dim)
        self.up_proj = linear(f"{prefix}.up_proj", cfg.d_model, cfg.ffn_dim)
        self.down_proj = linear(f"{prefix}.down_proj", cfg.ffn_dim, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, linear: LinearFactory, rotary: Rotary):
        super().__init__()
        prefix = f"layers.{index}"
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, f"{prefix}.self_attn", linear, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, f"{prefix}.mlp", linear)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def make_embedding(cfg: ModelConfig) -> tuple[nn.Module, ShardSpec | None]:
    """The token embedding — this rank's vocabulary slice under tensor parallelism — and that slice."""
    spec = shard_spec("embed_tokens")
    if spec is None:
        return nn.Embedding(cfg.vocab_size, cfg.d_model), None
    return vocab_embedding(cfg.vocab_size, cfg.d_model, spec), spec


def make_head(cfg: ModelConfig) -> tuple[RMSNorm, nn.Module | None]:
    """Final norm and LM head (None when tied to the embedding), vocabulary-split like the embedding."""
    spec = shard_spec("lm_head")
    norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    if cfg.tie_embeddings:
        return norm, None
    if spec is None:
        return norm, nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
    return norm, ShardLinear(cfg.d_model, cfg.vocab_size // spec.size, spec)


class Llama(nn.Module):
    """Decoder-only LM. `forward(ids)` gives logits; `forward(ids, labels)` gives the mean token loss."""

    def __init__(self, cfg: ModelConfig, linear: LinearFactory = dense_linear):
        super().__init__()
        if not cfg.vocab_size:
            raise ValueError("ModelConfig.vocab_size must be resolved (see resolve_vocab) before building")
        self.cfg = cfg
        rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.embed_tokens, self.vocab_spec = make_embedding(cfg)
        self.layers = nn.ModuleList(Block(cfg, i, linear, rotary) for i in range(cfg.n_layers))
        self.norm, self.lm_head = make_head(cfg)

    def logits(self, ids: torch.Tensor, cache=None) -> torch.Tensor:
        """Logits over the vocabulary — this rank's slice of it under tensor parallelism. `cache`
        (generation): one per-layer cache per block (see `Attention.forward`); ids then continue
        the positions it holds."""
        x = self.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x) if cache is None else layer(x, cache[i])
        x = self.norm(x)
        if self.lm_head is not None:
            return self.lm_head(x)
        return F.linear(enter_region(x, self.vocab_spec), self.embed_tokens.weight)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logits(ids)
        if labels is None:
            return logits
        return vocab_cross_entropy(logits, labels, self.vocab_spec)


def init_weights(model: nn.Module, seed: int, sparse_init: Callable | None = None) -> None:
    """Normal(0, σ) for embeddings and linears, σ/√(2L) for residual outputs, ones for norms.

    Values come from the counter-based initialiser (`sparsity.init`): element g of parameter p is
    a function of (seed, p's name, g) only, so every rank, every parallel layout and a dense or
    sparse run of the same seed build the same θ₀. A sparse linear (any module with `initialize`)
    picks its sets from that θ₀ itself — `sparse_init(module, seed, stream, std)` if given.
    `model` is a `Llama` or one pipeline stage of it (`model.pipeline`); names are canonical
    (the single-process model's), so every stage regenerates the numbers the whole model would.
    """
    from sparse_lm.sparsity.init import counter_normal_rows, stream_id

    cfg = model.cfg
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)

    def std_of(name: str) -> float:
        return residual_std if any(f"{r}." in f"{name}." for r in RESIDUAL_OUTPUTS) else cfg.init_std

    sparse_prefixes = []
    specs = {canonical_name(name): spec for name, spec in sharded_modules(model)}
    with torch.no_grad():
        for name, module in model.named_modules():
            name = canonical_name(name)
            if hasattr(module, "initialize"):
                (sparse_init or type(module).initialize)(module, seed, stream_id(f"{name}.weight"), std_of(name))
                sparse_prefixes.append(f"{name}.")
        for name, param in model.named_parameters():
            name = canonical_name(name)
            if any(name.startswith(prefix) for prefix in sparse_prefixes):
                continue
            if name.endswith("layernorm.weight") or name == "norm.weight":
                param.fill_(1.0)
                continue
            rows, cols = param.shape if param.ndim == 2 else (1, param.numel())
            spec = specs.get(name.rsplit(".", 1)[0])  # a tensor-parallel shard regenerates its own slice
            (_, global_cols), (row0, col0) = (spec.global_shape((rows, cols)), spec.offset((rows, cols))) if spec else ((rows, cols), (0, 0))
            values = counter_normal_rows(seed, stream_id(name), global_cols, row0, col0, rows, cols, std_of(name), param.device)
            param.copy_(values.view(param.shape))


def resolve_vocab(cfg: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    """The model's vocabulary: the tokenizer's, rounded up to `vocab_multiple` (for TP and kernels)."""
    if cfg.vocab_size:
        if cfg.vocab_size < tokenizer_vocab:
            raise UserError(
                f"config field model.vocab_size: expected at least the tokenizer's {tokenizer_vocab}, got {cfg.vocab_size}"
            )
        return cfg
    size = cfg.vocab_multiple * math.ceil(tokenizer_vocab / cfg.vocab_multiple)
    return dataclasses.replace(cfg, vocab_size=size)
