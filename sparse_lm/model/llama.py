"""A plain Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU, optional grouped-query attention.

The model only decides *shapes*; how its weights are stored and split is handed in:
* every projection inside a block is built by a `LinearFactory` (name, in_features, out_features
  — the whole layer's), so sparse and tensor-parallel linears replace `nn.Linear` without
  touching the blocks: a tensor-parallel factory returns this rank's shard, and attention simply
  sees fewer heads;
* the vocabulary (embedding, LM head, tied product, loss) comes from a `Vocabulary`: the whole of
  it by default, this rank's slice under tensor parallelism (`parallel.layers.VocabShard`).
`model.build` makes both from the run's config and topology; weights are written by `model.init`.
Names, the rotary convention (rotate-half) and the GQA head order follow Hugging Face's
`LlamaForCausalLM`, so export is a renaming of keys, not a numerical change.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparse_lm.config import ModelConfig
from sparse_lm.errors import UserError
from sparse_lm.parallel.layout import BLOCK_LINEARS, block_linear_shapes

LinearFactory = Callable[[str, int, int], nn.Module]


def dense_linear(name: str, in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=False)


class Vocabulary:
    """The token embedding, the LM head, the product with a tied embedding and the loss, over the
    whole vocabulary."""

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        return nn.Embedding(vocab_size, dim)

    def head(self, dim: int, vocab_size: int) -> nn.Module:
        return nn.Linear(dim, vocab_size, bias=False)

    def tied_logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean token loss, in fp32."""
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def add_linears(owner: nn.Module, cfg: ModelConfig, prefix: str, linear: LinearFactory) -> None:
    """Give a block's `self_attn` or `mlp` (`owner`, named `prefix`) its linears — those the
    list of a block's linears (`parallel.layout.BLOCK_LINEARS`) puts there, at their whole shapes."""
    part = prefix.rsplit(".", 1)[-1]
    for leaf, (rows, cols) in block_linear_shapes(cfg).items():
        if BLOCK_LINEARS[leaf] == part:
            owner.add_module(leaf, linear(f"{prefix}.{leaf}", cols, rows))


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
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        add_linears(self, cfg, prefix, linear)  # q_proj, k_proj, v_proj, o_proj
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
        add_linears(self, cfg, prefix, linear)  # gate_proj, up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One Transformer block. With `recompute` (activation checkpointing) a training forward keeps
    only the block's input: its inner activations are computed again during backward, from the
    same weights, masks and inputs, so gradients are unchanged and memory drops to one block's
    worth. Nothing in a block's forward draws random numbers or changes state, so the second
    forward is the first one exactly."""

    def __init__(self, cfg: ModelConfig, index: int, linear: LinearFactory, rotary: Rotary,
                 recompute: bool = False):
        super().__init__()
        prefix = f"layers.{index}"
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, f"{prefix}.self_attn", linear, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, f"{prefix}.mlp", linear)
        self.recompute = recompute

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        if self.recompute and cache is None and torch.is_grad_enabled():
            return checkpoint(self.residual, x, use_reentrant=False)
        return self.residual(x, cache)

    def residual(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Decoder-only LM. `forward(ids)` gives logits; `forward(ids, labels)` gives the mean token loss.
    `recompute`: activation checkpointing of every block (see `Block`)."""

    def __init__(self, cfg: ModelConfig, linear: LinearFactory = dense_linear, vocab: Vocabulary | None = None,
                 recompute: bool = False):
        super().__init__()
        if not cfg.vocab_size:
            raise ValueError("ModelConfig.vocab_size must be resolved (see resolve_vocab) before building")
        self.cfg = cfg
        self.vocab = vocab or Vocabulary()
        rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.embed_tokens = self.vocab.embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i, linear, rotary, recompute) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else self.vocab.head(cfg.d_model, cfg.vocab_size)

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
        return self.vocab.tied_logits(x, self.embed_tokens.weight)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logits(ids)
        if labels is None:
            return logits
        return self.vocab.loss(logits, labels)


def resolve_vocab(cfg: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    """The model's vocabulary: the tokenizer's, rounded up to `vocab_multiple` (for TP and kernels)."""
    if cfg.vocab_size:
        if cfg.vocab_size < tokenizer_vocab:
            raise UserError(
                f"config field model.vocab_size: expected at least the tokenizer's {tokenizer_vocab}, "
                f"got {cfg.vocab_size}"
            )
        return cfg
    size = cfg.vocab_multiple * math.ceil(tokenizer_vocab / cfg.vocab_multiple)
    return dataclasses.replace(cfg, vocab_size=size)
